"""benchmarks/evs_cpu/sitecustomize.py: the patch that lets vLLM's EVS recompute Qwen3-VL's M-RoPE positions
on the prompt layout of transformers >= 5.10 (outer <|vision_start|> before a video's first timestamp).

The shim is loaded under another module name, so it installs no import hook in this process; the patch goes
onto a subclass of vLLM's Qwen3VLForConditionalGeneration (vLLM's own class is not touched) and runs vLLM's
real position code (vllm/multimodal/video_prune/evs.py) on a synthetic EVS request. vLLM private API: compat.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.compat

SHIM = Path(__file__).resolve().parents[2] / "benchmarks" / "evs_cpu" / "sitecustomize.py"
VS, VE, IMG, VID = 90, 91, 92, 93  # vision_start, vision_end, image pad, video pad
TS = [40, 41, 42, 43, 44, 45]  # a timestamp, "<0.5 seconds>": 6 text tokens (civic-shapes-video-tiny's tokenizer)
SHORT, LONG = [1, 2, 3], list(range(1, 11))  # text before the video: fewer / more tokens than a timestamp
SUFFIX = [7, 8]
KEPT_PER_FRAME = [4, 1, 0, 3]  # EVS's retained tokens of each frame group (a frame may lose all)


@pytest.fixture(scope="module")
def shim():
    spec = importlib.util.spec_from_file_location("evs_cpu_shim", SHIM)
    module = importlib.util.module_from_spec(spec)
    meta_path = list(sys.meta_path)
    spec.loader.exec_module(module)
    assert sys.meta_path == meta_path  # no hook outside an EVS server
    return module


def media() -> tuple[list[int], torch.Tensor]:
    """The EVS prompt's video segment (vLLM puts every kept placeholder in the first frame, the model's
    embedding spreads them per frame) and the 5 position channels the model appends to that embedding:
    t, h, w, is_vision_start, is_video (vllm/model_executor/models/qwen3_vl.py, _get_expanded_positions)."""
    ids = []
    for f in range(len(KEPT_PER_FRAME)):
        ids += TS + [VS] + [VID] * (sum(KEPT_PER_FRAME) if f == 0 else 0) + [VE]
    cols, cur = [], 0
    for kept in KEPT_PER_FRAME:
        for token in TS + [VS]:
            cols.append([cur, cur, cur, int(token == VS), 0])
            cur += 1
        for i in range(kept):
            cols.append([cur, cur + i // 2, cur + i % 2, 0, 1])
        cur = max(max(c[0:3]) for c in cols) + 1
        cols.append([cur, cur, cur, 0, 0])  # vision_end
        cur += 1
    pos = torch.tensor(cols).T
    assert pos.shape[1] == len(ids)
    return ids, pos


def model_class(shim):
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    class Patched(Qwen3VLForConditionalGeneration):
        pass

    shim._patch_qwen3_vl(types.SimpleNamespace(Qwen3VLForConditionalGeneration=Patched))
    model = Patched.__new__(Patched)  # no weights: only .config is read
    object.__setattr__(model, "config", types.SimpleNamespace(
        vision_start_token_id=VS, vision_end_token_id=VE, image_token_id=IMG, video_token_id=VID))
    return Qwen3VLForConditionalGeneration, model


def recompute(fn, ids: list[int], pos: torch.Tensor):
    embedding = torch.cat([torch.zeros(pos.shape[1], 2), pos.T.float()], dim=1)  # hidden 2 + 5 channels
    start = torch.arange(len(ids)).expand(3, -1).clone()  # text prefix: 1-D positions
    _, positions, delta = fn(input_ids=list(ids), multimodal_embeddings=[embedding], mrope_positions=start,
                             num_computed_tokens=0)
    return positions, delta


def test_hide_outer_vision_starts_keeps_frame_and_image_markers(shim):
    seg, _ = media()
    ids = SHORT + [VS] + seg + [VE] + [VS, IMG, IMG, VE] + SUFFIX
    hidden = shim.hide_outer_vision_starts(ids, vision_start=VS, vision_end=VE, placeholders=(IMG, VID))
    assert [i for i, (a, b) in enumerate(zip(ids, hidden)) if a != b] == [len(SHORT)]
    assert hidden[len(SHORT)] == shim.HIDDEN and isinstance(hidden, list)
    tensor = shim.hide_outer_vision_starts(torch.tensor(ids), vision_start=VS, vision_end=VE, placeholders=(IMG, VID))
    assert tensor.tolist() == hidden
    old_style = SHORT + seg + SUFFIX  # transformers < 5.10: nothing to hide, the same object back
    unchanged = shim.hide_outer_vision_starts(old_style, vision_start=VS, vision_end=VE, placeholders=(IMG, VID))
    assert unchanged is old_style


@pytest.mark.parametrize("prefix", [SHORT, LONG], ids=["short-prefix", "long-prefix"])
def test_evs_positions_on_the_transformers5_layout_match_the_layout_evs_was_written_for(shim, prefix):
    vllm_class, model = model_class(shim)
    seg, pos = media()
    old_ids = prefix + seg + SUFFIX  # the layout evs.py expects (no outer markers)
    new_ids = prefix + [VS] + seg + [VE] + SUFFIX  # transformers >= 5.10 keeps the template's markers
    old, old_delta = recompute(vllm_class.recompute_mrope_positions.__get__(model), old_ids, pos)
    new, new_delta = recompute(model.recompute_mrope_positions, new_ids, pos)

    p, m = len(prefix), len(seg)
    assert new[:, : p + 1].tolist() == torch.arange(p + 1).expand(3, -1).tolist()  # prefix, outer start
    assert torch.equal(new[:, p + 1 : p + 1 + m], old[:, p : p + m] + 1)  # the video, one further on
    assert torch.equal(new[:, p + 1 : p + 1 + m], pos[0:3] + p + 1)  # exactly the model's positions
    assert new[:, p + 1 + m].tolist() == [new[:, : p + 1 + m].max().item() + 1] * 3  # outer vision_end
    assert torch.equal(new[:, p + 2 + m :], old[:, p + m :] + 2)  # the text after it
    assert new_delta == old_delta


def test_without_the_patch_vllm_fails_on_the_transformers5_layout(shim):
    """What the patch removes (vLLM 0.32 + transformers 5.19): with less text before the video than a
    timestamp has tokens, EVS's start index goes negative and the request fails (the benchmark's error);
    with more, it fails silently: positions start one timestamp too early, from a wrapped-around base.
    Should this test fail, vLLM has fixed the layout mismatch and the qwen3_vl patch can go."""
    vllm_class, model = model_class(shim)
    unpatched = vllm_class.recompute_mrope_positions.__get__(model)
    seg, pos = media()
    with pytest.raises(RuntimeError, match="expanded size of the tensor"):
        recompute(unpatched, SHORT + [VS] + seg + [VE] + SUFFIX, pos)
    positions, _ = recompute(unpatched, LONG + [VS] + seg + [VE] + SUFFIX, pos)
    p, m = len(LONG), len(seg)
    assert not torch.equal(positions[:, p + 1 : p + 1 + m], pos[0:3] + p + 1)
