"""The object/ring token masks of benchmarks.object_recall (pure grid maths)."""

import torch

from benchmarks.object_recall import box_tokens, ring_of


def test_box_tokens_cover_every_cell_the_box_touches():
    # 4x8 grid: cells are 250 x 125 units; the box spans columns 1..2 (125..375) and row 1 (250..500)
    mask = box_tokens([130, 260, 370, 490], (4, 8))
    assert mask.sum() == 2 and mask[1, 1] and mask[1, 2]
    # a box on cell borders takes exactly those cells; a sliver still takes one cell
    assert box_tokens([0, 0, 500, 500], (4, 4)).sum() == 4
    assert box_tokens([999, 999, 1000, 1000], (4, 4))[3, 3] and box_tokens([999, 999, 1000, 1000], (4, 4)).sum() == 1


def test_ring_is_the_8_neighbourhood_outside_the_object():
    obj = torch.zeros(5, 5, dtype=torch.bool)
    obj[2, 2] = True
    ring = ring_of(obj)
    assert ring.sum() == 8 and not ring[2, 2] and not (ring & obj).any()
    obj[0, 0] = True  # a corner cell has 3 neighbours; (1, 1) is already in the ring
    assert ring_of(obj).sum() == 8 + 2
