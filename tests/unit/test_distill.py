"""civic distill on a micro model: the loss is aligned on answer tokens, only the chosen parameters learn."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from civic_vllm.cli import distill as distill_cli
from civic_vllm.cli import train as train_cli
from civic_vllm.data import shapes
from civic_vllm.recipe import CivicRecipe
from civic_vllm.training import distill as D
from civic_vllm.training import train as T


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("teacher") / "run"
    T.train(work, max_steps=2, preset=T.MICRO_PRESET, recipe=T.Recipe(images_per_step=2, warmup_steps=1),
            threads=1, eval_per_task=0, progress=False)
    return work / T.EXPORT_DIR


@pytest.fixture(scope="module")
def models(teacher_dir: Path):
    teacher, preset = D.load_hf_model(teacher_dir)
    return teacher, preset


def _chat(preset, seed: int, kind: str):
    rng = np.random.default_rng(seed)
    scene = shapes.sample_scene(rng, kind)
    qas = shapes.scene_questions(rng, scene)
    return T.ChatEncoder(preset).encode(scene.image, [q.question for q in qas], [q.answer for q in qas]), qas


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_kl_is_zero_at_full_retention_and_positive_when_pruned(models, kind: str) -> None:
    """At r = 1 the compact path is the full path: the answer-aligned KL must vanish."""
    teacher, preset = models
    enc, qas = _chat(preset, 3, kind)
    merge = preset.vision.spatial_merge_size
    recipe = D.DistillRecipe()
    kl_full, ce_full, _, _ = D.distill_losses(teacher, teacher, enc, 1.0, recipe, merge)
    assert kl_full.shape == (len(qas),) and float(kl_full.detach().abs().max()) < 1e-4
    reference = T.answer_losses(teacher, enc)  # the training loss of the same answers
    torch.testing.assert_close(ce_full, reference, atol=1e-4, rtol=1e-4)
    kl_pruned = D.distill_losses(teacher, teacher, enc, 0.15, recipe, merge).kl
    assert float(kl_pruned.detach().max()) > 1e-6


def test_a_downscale_student_reads_the_smaller_image_against_the_full_image_teacher(models) -> None:
    teacher, preset = models
    rng = np.random.default_rng(11)
    scene = shapes.sample_scene(rng, "single")
    qas = shapes.scene_questions(rng, scene)
    questions, answers = [q.question for q in qas], [q.answer for q in qas]
    encoder = T.ChatEncoder(preset)
    enc = encoder.encode(scene.image, questions, answers)
    small = encoder.encode(scene.image, questions, answers, size={"shortest_edge": 1024, "longest_edge": 128 * 128})
    assert small.mm_token_type_ids.sum() < enc.mm_token_type_ids.sum()
    recipe = D.DistillRecipe(policy="downscale")
    kl, ce, selection, _ = D.distill_losses(teacher, teacher, enc, 0.25, recipe, preset.vision.spatial_merge_size,
                                            student_enc=small)
    assert kl.shape == ce.shape == (len(qas),) and float(kl.detach().min()) > 0 and float(selection) == 0.0
    same = D.distill_losses(teacher, teacher, enc, 0.25, recipe, preset.vision.spatial_merge_size).kl
    assert float(same.abs().max()) < 1e-4  # the retentions keep every token of whatever image the student sees


@pytest.mark.parametrize("exit_context", [False, True])
def test_the_feature_loss_compares_each_kept_group_with_the_teachers_row_of_that_group(models,
                                                                                   exit_context: bool) -> None:
    """Zero at full retention; at an exit layer it equals the relative error computed by hand from the
    teacher's full-path rows of the groups the student kept (main and every DeepStack level), and it
    reaches the blocks after the exit layer."""
    import copy

    teacher, preset = models
    enc, _ = _chat(preset, 5, "multi")
    merge = preset.vision.spatial_merge_size
    vision = D.TeacherVision(teacher)
    recipe = D.DistillRecipe(feature_weight=1.0, exit_layer=1, exit_context=exit_context)
    full = D.distill_losses(teacher, teacher, enc, 1.0, recipe, merge, vision=vision)
    assert float(full.feature) < 1e-10
    student = copy.deepcopy(teacher)
    D.trainable_parameters(student, "vision")
    pruned = D.distill_losses(teacher, student, enc, 0.25, recipe, merge, vision=vision)
    assert float(pruned.feature) > 0  # tiny on a 2-step micro model, whose later blocks change rows little
    pruned.feature.backward()
    later_block = student.model.visual.blocks[-1].mlp.linear_fc1.weight.grad
    assert later_block is not None and float(later_block.abs().sum()) > 0

    # by hand: the student's compact rows against the teacher's rows of the same kept groups
    with torch.no_grad():
        out = teacher.model.visual(enc.pixel_values, grid_thw=enc.image_grid_thw)
        from civic_vllm.hf_compact import build_compact_batch

        retentions = D.student_retentions(enc, merge, 0.25, recipe)
        batch = build_compact_batch(student, enc.input_ids, enc.pixel_values, enc.image_grid_thw,
                                    enc.mm_token_type_ids, retentions)
        (kept,) = batch.kept_indices
        assert len(kept) == retentions[0].num_kept < retentions[0].num_tokens
        rows = [batch.inputs_embeds[0][batch.visual_pos_masks[0]], *batch.deepstack_embeds]
        targets = [out.pooler_output, *out.deepstack_features]
        assert len(rows) == len(targets) > 1
        by_hand = np.mean([float(((r - t[kept]) ** 2).sum() / (t[kept] ** 2).sum()) for r, t in zip(rows, targets)])
    assert float(pruned.feature) == pytest.approx(by_hand, rel=1e-4)
    vision.close()


def test_a_downscale_student_refuses_the_feature_loss(teacher_dir: Path, tmp_path: Path) -> None:
    recipe = D.DistillRecipe(policy="downscale", feature_weight=1.0, data=T.Recipe(images_per_step=1))
    with pytest.raises(ValueError, match="feature-weight"):
        D.distill(teacher_dir, tmp_path / "ds", recipe=recipe, max_steps=1, progress=False)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_proportional_attention_changes_the_student_only_where_tokens_were_dropped(models, kind: str) -> None:
    teacher, preset = models
    enc, _ = _chat(preset, 7, kind)
    merge = preset.vision.spatial_merge_size
    plain, weighted = D.DistillRecipe(), D.DistillRecipe(proportional_attention=True)
    for ratio, same in ((1.0, True), (0.25, False)):  # every token kept: each stands for itself, log 1 = 0
        a = D.distill_losses(teacher, teacher, enc, ratio, plain, merge).kl.detach()
        b = D.distill_losses(teacher, teacher, enc, ratio, weighted, merge).kl.detach()
        assert torch.allclose(a, b, atol=1e-6) == same, (ratio, a, b)


def test_a_proportional_attention_student_ships_no_serving_recipe(teacher_dir: Path, tmp_path: Path) -> None:
    """vLLM's attention takes no per-key bias: a recipe would serve the student without what it learnt."""
    from civic_vllm.recipe import read_recipe

    recipe = D.DistillRecipe(ratios=[0.5], exit_layer=1, proportional_attention=True, data=T.Recipe(images_per_step=1))
    out = D.distill(teacher_dir, tmp_path / "prop", recipe=recipe, max_steps=1, progress=False)
    assert read_recipe(out) is None
    assert json.loads((out / D.DISTILL_MARKER).read_text())["proportional_attention"] is True


def test_learned_distillation_trains_the_scorer_and_ships_the_recipe(teacher_dir: Path, tmp_path: Path) -> None:
    from civic_vllm.recipe import load_scorer, read_recipe

    recipe = D.DistillRecipe(policy="learned", exit_layer=1, params="all", lr=1e-3, ratios=[0.25, 0.5],
                             serve_ratio=0.25, data=T.Recipe(images_per_step=1))
    out = D.distill(teacher_dir, tmp_path / "learned", recipe=recipe, max_steps=2, log_every=1, progress=False)
    served = read_recipe(out)
    assert (served.policy, served.exit_layer, served.ratio) == ("learned", 1, 0.25)
    scorer = load_scorer(out, served)
    assert float(scorer.out.weight.abs().sum()) > 0  # left its zero init: the losses reached it
    curve = [json.loads(line) for line in (out / D.CURVE_FILE).read_text().splitlines()]
    assert all(np.isfinite(r["select"]) and r["select"] > 0 for r in curve)
    plain = D.distill(teacher_dir, tmp_path / "pool", recipe=D.DistillRecipe(
        policy="pool", exit_layer=1, ratios=[0.5], data=T.Recipe(images_per_step=1)), max_steps=1, progress=False)
    assert read_recipe(plain) == CivicRecipe(ratio=1 / 3, policy="pool", exit_layer=1)
    full = D.distill(teacher_dir, tmp_path / "full", recipe=D.DistillRecipe(
        ratios=[1.0], data=T.Recipe(images_per_step=1)), max_steps=1, progress=False)
    assert read_recipe(full) is None  # trained without retention: a plain checkpoint


def test_trainable_parameter_choices(models) -> None:
    teacher, _ = models
    import copy

    model = copy.deepcopy(teacher)
    merger = D.trainable_parameters(model, "merger")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".merger." in n or "deepstack_merger_list" in n for n in names)
    assert len(merger) == len(names)
    D.trainable_parameters(model, "vision")
    assert all(p.requires_grad == n.startswith("model.visual.") for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="--params must be one of"):
        D.trainable_parameters(model, "lora")


def test_distill_trains_only_the_merger_and_exports_a_checkpoint(teacher_dir: Path, tmp_path: Path) -> None:
    out = D.distill(teacher_dir, tmp_path / "student", recipe=D.DistillRecipe(
        params="merger", lr=1e-2, ratios=[0.25], data=T.Recipe(images_per_step=1)), max_steps=3, log_every=1,
        progress=False)
    before, after = load_file(teacher_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".merger." in k or "deepstack_merger_list" in k for k in changed)
    info = json.loads((out / D.DISTILL_MARKER).read_text())
    assert info["steps"] == 3 and info["params"] == "merger"
    curve = [json.loads(line) for line in (out / D.CURVE_FILE).read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3] and all(np.isfinite(r["kl"]) for r in curve)
    assert info["curve"] == D.CURVE_FILE and sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    D.load_hf_model(out)  # loads as a checkpoint again (vLLM loading is covered in tests/e2e)

    # benchmarks.distill_params reuses a student only for exactly its recipe and a budget it met
    from benchmarks.distill_params import reusable

    assert reusable(out, str(teacher_dir), "merger", 1e-2, 0.0, minutes=0.0, ratios=[0.25])
    assert not reusable(out, str(teacher_dir), "merger", 1e-2, 0.0, minutes=0.0, ratios=D.DistillRecipe().ratios)
    assert not reusable(out, str(teacher_dir), "merger", 1e-2, 0.0, minutes=0.0, ratios=[0.25, 0.5])
    assert not reusable(out, str(teacher_dir), "all", 1e-2, 0.0, minutes=0.0, ratios=[0.25])
    assert not reusable(out, str(teacher_dir), "merger", 1e-4, 0.0, minutes=0.0, ratios=[0.25])
    assert not reusable(out, str(teacher_dir), "merger", 1e-2, 0.5, minutes=0.0, ratios=[0.25])
    assert not reusable(out, str(teacher_dir), "merger", 1e-2, 0.0, minutes=60.0, ratios=[0.25])
    assert not reusable(out, str(tmp_path), "merger", 1e-2, 0.0, minutes=0.0, ratios=[0.25])
    assert not reusable(tmp_path / "absent", str(teacher_dir), "merger", 1e-2, 0.0, minutes=0.0, ratios=[0.25])


def test_a_resumed_run_equals_one_run_of_the_total_budget(teacher_dir: Path, tmp_path: Path) -> None:
    recipe = D.DistillRecipe(params="merger", lr=1e-2, ratios=[0.25, 0.5], data=T.Recipe(images_per_step=1))
    whole = D.distill(teacher_dir, tmp_path / "whole", recipe=recipe, max_steps=4, log_every=1, progress=False)
    piece = D.distill(teacher_dir, tmp_path / "piece", recipe=recipe, max_steps=2, log_every=1, progress=False)
    resumed = D.distill(teacher_dir, piece, recipe=recipe, max_steps=4, log_every=1, progress=False, resume=piece)
    a, b = (torch.load(p / D.STATE_FILE, weights_only=False) for p in (whole, resumed))
    assert a["steps"] == b["steps"] == 4
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    info = json.loads((resumed / D.DISTILL_MARKER).read_text())
    assert info["steps"] == 4 and [p["steps"] for p in info["pieces"]] == [2] and info["pieces"][0]["state"]
    curve = [json.loads(line) for line in (resumed / D.CURVE_FILE).read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3, 4]

    # without its saved state a student still resumes, from its bf16 weights, and says so
    (resumed / D.STATE_FILE).unlink()
    again = D.distill(teacher_dir, tmp_path / "again", recipe=recipe, max_steps=5, progress=False, resume=resumed)
    info = json.loads((again / D.DISTILL_MARKER).read_text())
    assert info["steps"] == 5 and [p["state"] for p in info["pieces"]] == [True, False]

    # the learned policy's scorer settings change nothing for a civic student; its lr does
    D.distill(teacher_dir, tmp_path / "other", recipe=dataclasses.replace(recipe, scorer_lr=0.5), max_steps=6,
              progress=False, resume=again)
    with pytest.raises(ValueError, match="another recipe"):
        D.distill(teacher_dir, tmp_path / "other", recipe=dataclasses.replace(recipe, lr=1e-3),
                  max_steps=7, progress=False, resume=again)
    with pytest.raises(ValueError, match="distilled from"):
        D.distill(again, tmp_path / "other", recipe=recipe, max_steps=6, progress=False, resume=again)


def test_soup_is_the_mean_of_its_students(teacher_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    recipe = dict(params="merger", lr=1e-2, ratios=[0.25], data=T.Recipe(images_per_step=1))
    a = D.distill(teacher_dir, tmp_path / "a", recipe=D.DistillRecipe(**recipe, seed=1), max_steps=2, progress=False)
    b = D.distill(teacher_dir, tmp_path / "b", recipe=D.DistillRecipe(**recipe, seed=2, ce_weight=1.0), max_steps=2,
                  progress=False)
    out = D.soup([a, b], tmp_path / "soup")
    wa, wb, ws = (load_file(p / "model.safetensors") for p in (a, b, out))
    assert ws.keys() == wa.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert differing  # the students differ, so the soup is not a copy of either
    for k in wa:  # bf16 on disk: the mean of two bf16 values, rounded once
        mean = ((wa[k].float() + wb[k].float()) / 2).to(torch.bfloat16)
        torch.testing.assert_close(ws[k], mean, atol=0, rtol=0)
    info = json.loads((out / D.DISTILL_MARKER).read_text())
    assert [i["student"] for i in info["soup_of"]] == [str(a), str(b)]
    assert [i["ce_weight"] for i in info["soup_of"]] == [0.0, 1.0] and info["steps"] == 4
    assert all((out / name).read_text() == (src / D.CURVE_FILE).read_text()
               for name, src in zip(info["curves"], (a, b)))
    D.load_hf_model(out)

    with pytest.raises(ValueError, match="at least two"):
        D.soup([a], tmp_path / "x")
    with pytest.raises(ValueError, match="listed twice"):
        D.soup([a, a], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a student written by civic distill"):
        D.soup([a, teacher_dir], tmp_path / "x")
    other = json.loads((b / D.DISTILL_MARKER).read_text())
    (b / D.DISTILL_MARKER).write_text(json.dumps({**other, "teacher": "/elsewhere"}))
    with pytest.raises(ValueError, match="different teachers"):
        D.soup([a, b], tmp_path / "x")
    assert not (tmp_path / "x").exists()

    from civic_vllm.cli import main as civic

    assert civic(["soup", "--out", str(tmp_path / "x"), str(a), str(b)]) == 2  # a clear line, not a traceback
    assert "civic soup: error: students of different teachers" in capsys.readouterr().err


def test_distill_params_candidates() -> None:
    # A CE-weight sweep names each student by parameters and weight; a single weight keeps the plain name.
    import argparse

    from benchmarks.distill_params import _weights, candidate_label

    assert _weights("0.5, 1.5,3") == [0.5, 1.5, 3.0]
    for bad in ("", "x", "1,-1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="weights >= 0"):
            _weights(bad)
    assert candidate_label("all", 1.5, sweep_ce=True) == "all-ce1.5"
    assert candidate_label("all", 3.0, sweep_ce=True) == "all-ce3"
    assert candidate_label("merger", 0.5, sweep_ce=False) == "merger"


def test_module_entry_points_parse_like_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    for main, prog in ((distill_cli.main, "civic_vllm.training.distill"),
                       (train_cli.main, "civic_vllm.training.train")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0 and f"python -m {prog}" in capsys.readouterr().out
        with pytest.raises(SystemExit) as exit_info:
            main([])  # --out is required
        assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
