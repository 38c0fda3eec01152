"""The civic-shapes training loop: inputs as serving builds them, per-answer loss, resume, export.

Runs on a micro model (a few seconds); accuracy is the long run's business, not a unit test's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from civic_vllm.cli.train import add_train_parser
from civic_vllm.data import shapes
from civic_vllm.training import train as T


@pytest.fixture(scope="module")
def encoder() -> T.ChatEncoder:
    return T.ChatEncoder(T.MICRO_PRESET)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 steps, then a resume to step 5 (which exports model/)."""
    work = tmp_path_factory.mktemp("train") / "run"
    recipe = T.Recipe(images_per_step=2, warmup_steps=2)
    common = dict(threads=1, eval_per_task=1, log_every=1, progress=False)
    T.train(work, max_steps=3, preset=T.MICRO_PRESET, recipe=recipe, export=False, **common)
    assert T.load_state(work)["step"] == 3
    T.train(work, max_steps=5, resume=True, **common)
    return work


def _chat(seed: int, kind: str) -> tuple[shapes.Scene, list[shapes.QA]]:
    rng = np.random.default_rng(seed)
    scene = shapes.sample_scene(rng, kind)
    return scene, shapes.scene_questions(rng, scene)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_encoding_matches_chat_template_and_processor(encoder: T.ChatEncoder, kind: str) -> None:
    """What the model is trained on is token for token what HF / vLLM serving will feed it."""
    scene, qas = _chat(0, kind)
    messages = []
    for k, qa in enumerate(qas):
        image = [{"type": "image"}] if k == 0 else []
        messages.append({"role": "user", "content": [*image, {"type": "text", "text": qa.question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": qa.answer}]})
    proc = encoder.processor
    for msgs, answers in ((messages, [q.answer for q in qas]), (messages[:1], None)):
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answers is None)
        ref = proc(text=[text], images=[scene.image], return_tensors="pt")
        enc = encoder.encode(scene.image, [q.question for q in qas][: len(msgs) // 2 or 1], answers)
        assert torch.equal(enc.input_ids, ref["input_ids"])
        assert torch.equal(enc.mm_token_type_ids, ref["mm_token_type_ids"].long())
        assert torch.equal(enc.pixel_values, ref["pixel_values"])
        assert torch.equal(enc.image_grid_thw, ref["image_grid_thw"])


def test_answer_spans_and_per_answer_loss(encoder: T.ChatEncoder) -> None:
    scene, qas = _chat(1, "single")  # includes a ~20-token box answer
    enc = encoder.encode(scene.image, [q.question for q in qas], [q.answer for q in qas])
    for k, qa in enumerate(qas):
        span = enc.input_ids[0, enc.answer_of == k].tolist()
        assert encoder.tokenizer.decode(span) == qa.answer + "<|im_end|>"
    model = T.build_model(T.MICRO_PRESET, seed=0)
    with torch.no_grad():
        got = T.answer_losses(model, enc)
        logits = model(**enc.model_inputs()).logits[0]
    ce = F.cross_entropy(logits[:-1], enc.input_ids[0, 1:], reduction="none")
    owner = enc.answer_of[1:]
    want = torch.stack([ce[owner == k].mean() for k in range(len(qas))])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lr_schedule() -> None:
    r = T.Recipe(lr=1e-3, warmup_steps=10, min_lr_frac=0.1)
    assert T.lr_factor(r, 0, 0.0) == pytest.approx(0.1)
    assert T.lr_factor(r, 9, 0.0) == pytest.approx(1.0)
    assert T.lr_factor(r, 100, 0.5) == pytest.approx(0.55)
    assert T.lr_factor(r, 100, 1.0) == pytest.approx(0.1)


def test_size_curriculum() -> None:
    recipe = T.Recipe(images_per_step=12, size_curriculum=[(0.2, 256 * 256), (0.5, 320 * 448)])
    rng = np.random.default_rng(0)

    def sizes(progress: float) -> set[tuple[int, int]]:
        return {scene.image.size for scene, _ in T.sample_chats(rng, recipe, progress)}

    assert sizes(0.1) == {(256, 256)}
    assert sizes(0.3) <= {(256, 256), (320, 448), (448, 320)} and len(sizes(0.3) | sizes(0.3)) > 1
    assert any(w * h > 320 * 448 for w, h in sizes(0.6) | sizes(0.6))


def test_checkpoint_resume_and_curve(run_dir: Path) -> None:
    state = T.load_state(run_dir)
    assert state["step"] == 5 and state["preset"]["name"] == T.MICRO_PRESET.name
    assert state["recipe"]["images_per_step"] == 2  # the saved recipe, not the default
    assert set(state) >= {"model", "optimizer", "data_rng", "torch_rng", "schedule"}
    records = [json.loads(line) for line in (run_dir / T.CURVE_FILE).read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5]  # resumed at 3, no step twice
    assert all({"cpu_min", "wall_min", "lr", "loss_by_task"} <= set(r) for r in losses)
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [3, 5]
    assert {"overall", "color", "count", "ground"} <= set(evals[-1]["eval"])


def test_resume_continues_the_same_data_stream(tmp_path: Path, run_dir: Path) -> None:
    """Interrupted at step 3 and resumed, a run has drawn the same samples as an uninterrupted one.

    (Weights differ: the first leg's schedule ran on a 3-step budget.)
    """
    straight = tmp_path / "straight"
    T.train(straight, max_steps=5, preset=T.MICRO_PRESET, recipe=T.Recipe(images_per_step=2, warmup_steps=2),
            eval_per_task=0, progress=False, export=False)
    assert T.load_state(straight)["data_rng"] == T.load_state(run_dir)["data_rng"]


def test_export_loads_in_hf(run_dir: Path) -> None:
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    out = run_dir / T.EXPORT_DIR
    assert (out / "model.safetensors").stat().st_size < 50e6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    model = Qwen3VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    trained = T.load_state(run_dir)["model"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name].to(torch.bfloat16).float())
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.encode("[12, 3") == T.ChatEncoder(T.MICRO_PRESET).tokenizer.encode("[12, 3")
    marker = json.loads((out / T.TRAIN_MARKER).read_text())
    assert marker["step"] == 5


def test_cli_parser(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--out", str(tmp_path), "--minutes", "2", "--resume", "--threads", "1",
                              "--lr", "5e-4", "--task-weight", "ground=2", "--size-curriculum", "0.1:65536,0.3:143360",
                              "--dense-weight", "0.25", "--init-from", "models/x"])
    got = (args.minutes, args.resume, args.threads, args.lr, args.task_weight, args.size_curriculum,
           args.dense_weight, args.init_from)
    assert got == (2.0, True, 1, 5e-4, [("ground", 2.0)], [(0.1, 65536), (0.3, 143360)], 0.25, "models/x")
    assert callable(args.handler)


# --------------------------------------------------------------------------------------
# Dense supervision of the visual tokens
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_object_index_mask_is_the_drawn_pixels(seed: int) -> None:
    scene = shapes.sample_scene(np.random.default_rng(seed), "multi")
    mask, pixels = shapes.object_index_mask(scene), np.asarray(scene.image)
    for k, obj in enumerate(scene.objects):
        assert (pixels[mask == k + 1] == shapes.COLORS[obj.color]).all()
    palette = np.array(list(shapes.COLORS.values()))
    assert not (pixels[mask == 0][:, None, :] == palette[None]).all(-1).any()  # backgrounds are light


@pytest.mark.parametrize("seed", range(8))
def test_dense_targets_label_every_object_and_only_what_covers_a_token(seed: int) -> None:
    scene = shapes.sample_scene(np.random.default_rng(seed), "multi")
    gh, gw = scene.height // 32, scene.width // 32
    t = T.dense_targets(scene, (gh, gw), 32)
    assert t.shape.shape == t.color.shape == (gh * gw,) and t.box.shape == (gh * gw, 4)
    mask = shapes.object_index_mask(scene)
    for k, obj in enumerate(scene.objects):
        sid, cid = 1 + shapes.SHAPES.index(obj.shape), 1 + list(shapes.COLORS).index(obj.color)
        owned = torch.nonzero((t.shape == sid) & (t.color == cid)).squeeze(1)
        assert len(owned) >= 1, f"object {obj} owns no token"  # small ones too
        assert torch.allclose(t.box[owned], torch.tensor(shapes.to_qwen_box(obj, scene.width, scene.height)) / 1000)
        for i in owned.tolist():  # raster order: token i sees rows 32*(i // gw).., columns 32*(i % gw)..
            cell = mask[32 * (i // gw):32 * (i // gw + 1), 32 * (i % gw):32 * (i % gw + 1)]
            assert (cell == k + 1).any()
    assert (t.shape == 0).sum() == (t.color == 0).sum() > 0
    # One centre token per object, each inside its object's box (boxes may share a token only if they overlap).
    flagged = torch.nonzero(t.centre).squeeze(1).tolist()
    assert 1 <= len(flagged) <= len(scene.objects) and set(t.centre.unique().tolist()) <= {0.0, 1.0}
    for i in flagged:
        x, y = 32 * (i % gw) + 16, 32 * (i // gw) + 16
        assert any(o.x - 16 <= x <= o.x + o.size + 16 and o.y - 16 <= y <= o.y + o.size + 16 for o in scene.objects)


def test_merged_tokens_are_in_raster_order_of_the_processor(encoder: T.ChatEncoder) -> None:
    """What dense_targets assumes: merged token i holds the 2x2 patches of grid cell (i // gw, i % gw)."""
    scene = shapes.sample_scene(np.random.default_rng(1), "multi", sizes=[(320, 448)])
    enc = encoder.encode(scene.image, ["What shape is it?"], None)
    _, h, w = (int(v) for v in enc.image_grid_thw[0])
    gw = w // 2
    rows = enc.pixel_values.reshape(-1, 4, 3, 2, 16, 16)[:, :, :, 0]  # token, patch, C, P, P (frame 0)
    pixels = np.asarray(scene.image).astype(np.float32) / 255.0
    for i in (0, 7, gw + 3, len(rows) - 1):
        r, c = i // gw, i % gw
        region = torch.from_numpy(pixels[32 * r:32 * r + 32, 32 * c:32 * c + 32]).permute(2, 0, 1)
        got = rows[i].mean(dim=(0, 2, 3)) * 0.5 + 0.5  # the processor normalises with mean = std = 0.5
        torch.testing.assert_close(got, region.mean(dim=(1, 2)), atol=2e-3, rtol=0)


def test_dense_supervision_trains_saves_resumes_and_is_not_exported(tmp_path: Path, run_dir: Path) -> None:
    work = tmp_path / "dense"
    recipe = T.Recipe(images_per_step=2, warmup_steps=2, dense_weight=0.5, init_from=str(run_dir / T.EXPORT_DIR))
    common = dict(preset=T.MICRO_PRESET, threads=1, eval_per_task=0, log_every=1, progress=False)
    T.train(work, max_steps=2, recipe=recipe, export=False, **common)
    state = T.load_state(work)
    assert state["recipe"]["dense_weight"] == 0.5 and set(state["dense_heads"]) >= {"shape.weight", "box.bias"}
    T.train(work, max_steps=3, resume=True, **common)
    losses = [json.loads(line)["loss_by_task"] for line in (work / T.CURVE_FILE).read_text().splitlines()]
    assert len(losses) == 3 and all({"dense_shape", "dense_color", "dense_centre"} <= set(r) for r in losses)
    assert all(np.isfinite(list(r.values())).all() for r in losses)
    from safetensors.torch import load_file

    exported = load_file(str(work / T.EXPORT_DIR / "model.safetensors"))
    assert set(exported) == set(state["model"])  # the heads are training-only


def test_init_from_starts_at_the_checkpoint_weights(tmp_path: Path, run_dir: Path) -> None:
    recipe = T.Recipe(images_per_step=1, lr=0.0, init_from=str(run_dir / T.EXPORT_DIR))
    T.train(tmp_path / "w", max_steps=1, preset=T.MICRO_PRESET, recipe=recipe, eval_per_task=0,
            progress=False, export=False)
    start = T.load_state(tmp_path / "w")["model"]
    trained = T.load_state(run_dir)["model"]
    for name, tensor in trained.items():
        torch.testing.assert_close(start[name], tensor.to(torch.bfloat16).float())
    with pytest.raises(FileNotFoundError, match="no weights to start from"):
        T.train(tmp_path / "x", max_steps=1, preset=T.MICRO_PRESET,
                recipe=T.Recipe(init_from=str(tmp_path / "nowhere")), eval_per_task=0, progress=False)


def test_a_state_from_before_a_recipe_field_resumes_as_it_ran(tmp_path: Path) -> None:
    """States written before dense supervision / independent presence existed continue without them."""
    work = tmp_path / "old"
    T.train(work, max_steps=1, preset=T.MICRO_PRESET, recipe=T.Recipe(images_per_step=1, dense_weight=0.0),
            eval_per_task=0, progress=False, export=False)
    state = T.load_state(work)
    for key in T.RECIPE_FIELDS_ADDED:
        del state["recipe"][key]
    torch.save(state, work / T.STATE_FILE)
    T.train(work, max_steps=2, resume=True, eval_per_task=0, progress=False, export=False)
    resumed = T.load_state(work)["recipe"]
    assert (resumed["dense_weight"], resumed["presence"], resumed["init_from"]) == (0.0, "pairs", None)
