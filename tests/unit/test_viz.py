"""`civic viz`: the kept tokens drawn over the image are exactly the K the budget gives."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from civic_vllm.budget import num_retained
from civic_vllm.cli.viz import add_viz_parser
from civic_vllm.model_factory import default_model_dir
from civic_vllm.viz import DIM, compute_retention, draw_retention

WIDTH, HEIGHT = 320, 256  # multiples of 32: the processor keeps the size, a 10 x 8 merged grid


@pytest.fixture(scope="module")
def tiny_model():
    return default_model_dir("tiny")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    # Bright everywhere (so a dimmed pixel always differs from the original) and varied.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([120 + (x * 131) // WIDTH, 120 + (y * 131) // HEIGHT,
                     120 + ((x + y) * 67) // (WIDTH + HEIGHT)], -1)
    noise = rng.integers(0, 4, size=base.shape)
    path = tmp_path_factory.mktemp("viz") / "input.png"
    Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(path)
    return path


def parse(argv):
    parser = argparse.ArgumentParser(prog="civic")
    add_viz_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def kept_cells_drawn(picture: Image.Image, top: int, reference: Image.Image, cell: int) -> set[int]:
    """Merged-token cells whose centre pixel is the resized image's (undimmed) pixel."""
    drawn = np.asarray(picture.convert("RGB"))[top:]
    ref = np.asarray(reference.convert("RGB"))
    rows, cols = ref.shape[0] // cell, ref.shape[1] // cell
    kept = set()
    for r in range(rows):
        for c in range(cols):
            y, x = r * cell + cell // 2, c * cell + cell // 2
            if np.array_equal(drawn[y, x], ref[y, x]):
                kept.add(r * cols + c)
            else:
                assert np.allclose(drawn[y, x], np.round(ref[y, x] * DIM), atol=1), "dropped cells are dimmed"
    return kept


def test_viz_cli_writes_the_map_with_k_kept_tokens(tiny_model, image_path, tmp_path):
    out = tmp_path / "map.png"
    args = parse(["viz", "--image", str(image_path), "--ratio", "0.3333", "--model", str(tiny_model),
                  "--out", str(out)])
    assert args.handler(args) == 0
    assert out.is_file()

    with Image.open(image_path) as img:
        result = compute_retention(tiny_model, img, 0.3333, "civic")
    assert result.grid_hw == (HEIGHT // 32, WIDTH // 32)
    assert result.num_kept == num_retained(result.num_tokens, 0.3333) == len(result.kept)
    expected, top = draw_retention(result)
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))
        drawn = kept_cells_drawn(written, top, result.image, result.cell_px)
    assert len(drawn) == result.num_kept
    assert drawn == set(result.kept.tolist())


@pytest.mark.parametrize("policy,ratio", [("pool", 0.25), ("random", 0.5), ("civic", 1.0)])
def test_viz_draws_exactly_k_kept_tokens(tiny_model, image_path, policy, ratio):
    with Image.open(image_path) as img:
        result = compute_retention(tiny_model, img, ratio, policy)
    k = num_retained(result.num_tokens, ratio)
    assert result.num_kept == k == len(result.kept)
    picture, top = draw_retention(result)
    assert policy in result.title() and f"K={k} of N={result.num_tokens}" in result.title()
    assert set(kept_cells_drawn(picture, top, result.image, result.cell_px)) == set(result.kept.tolist())


def test_viz_rejects_a_bad_ratio(tiny_model, image_path, tmp_path):
    args = parse(["viz", "--image", str(image_path), "--ratio", "1.5", "--model", str(tiny_model),
                  "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="ratio"):
        args.handler(args)
    assert not (tmp_path / "x.png").exists()
