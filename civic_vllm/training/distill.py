"""``civic distill``: text-aligned KL distillation of the compact path.

Teacher: the full-token model, frozen. Student: the same weights run through CIVIC's compact
path (:mod:`civic_vllm.hf_compact`: retention on the vision tower, compact prompt, the same
positions vLLM's civic path uses) at a ratio drawn per chat from ``ratios``. Loss, on the
answer tokens only (the text the user reads): KL(teacher || student) of the next-token
distributions, averaged per answer then over answers, plus optionally ``ce_weight`` x the
answers' cross-entropy. Which parameters learn is a choice (``--params``):

* ``merger``  the patch merger and DeepStack mergers (the projection into the LLM),
* ``vision``  the whole vision tower (with an exit layer: also the blocks after it),
* ``all``     every parameter.

Which tokens the student keeps is ``--policy``: a training-free one (civic, pool, random), or
``learned``: a small scorer (:mod:`civic_vllm.retention.learned`) picks the tokens at the exit
layer and trains with the student, towards the training-free ``civic`` saliency of the teacher's
*final* vision states (retention there keeps accuracy), so an early selection learns to rank
tokens as a late one would (:func:`~civic_vllm.retention.learned.saliency_loss`); ``--straight-through``
also lets the KL and CE reach the scores through a gate on the kept rows. ``downscale``
fine-tunes the model on images shrunk to the ratio's token budget (as served), against the
teacher on the full image.

``--feature-weight W`` adds feature distillation of the kept groups (DynamicViT's recipe): the
student's merged rows of each kept group, main and every DeepStack level, against the teacher's
full-path rows of the same groups (:func:`feature_loss`). With an exit layer, the blocks after it
run on the kept groups only; the term teaches them to give those groups what the whole image
would have, which is what retention on the tower's output keeps (and what boxes need).

Long budgets run in pieces: every export also saves the training state (fp32 weights, optimizer
moments, data stream, steps and CPU-minutes; ``civic/distill_state.pt``), and ``--resume DIR``
continues that student to a larger ``--minutes`` total exactly where it stopped. A student saved
without that state resumes from its bf16 weights with fresh optimizer moments and a data stream
reseeded by its step count (recorded as such).

Data are civic-shapes chats generated on the fly, as in ``civic train``; the result is a
regular checkpoint directory that ``vllm serve ... --model-impl civic`` loads. A student trained
with retention records its recipe (ratio ``serve_ratio``, policy, exit layer, scorer) in its
config.json, and the server serves that recipe by default (:mod:`civic_vllm.recipe`).

``civic soup`` averages the weights of several students of one teacher (a uniform "model soup",
Wortsman et al. 2022): students fine-tuned from the same weights stay in one basin, and their
average reads the compact sequence better than either (measured in the README).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from civic_vllm.budget import num_retained
from civic_vllm.hf_compact import build_compact_batch, concatenated_indices, proportional_attention_mask
from civic_vllm.recipe import CivicRecipe, write_recipe
from civic_vllm.retention.learned import ScorerConfig, TokenScorer, prior_score, saliency_loss
from civic_vllm.retention.selection import GROUP_ROWS, ImageRetention
from civic_vllm.training import loop as loop_mod
from civic_vllm.training import train as tr

PARAM_CHOICES = ("merger", "vision", "all")
POLICY_CHOICES = ("civic", "pool", "random", "learned", "downscale")
DISTILL_MARKER = "civic_distill.json"
CURVE_FILE = "distill_curve.jsonl"  # KL / CE every log_every steps, inside the exported checkpoint
SCORER_FIELDS = ("scorer_lr", "scorer_weight", "scorer_sharpness", "straight_through")  # the learned policy's
STATE_FILE = "civic/distill_state.pt"  # what --resume needs; a subfolder, so vLLM's weight loader never sees it


@dataclass
class DistillRecipe:
    ratios: list[float] = field(default_factory=lambda: [0.5, 1 / 3, 0.25, 0.15])
    policy: str = "civic"
    exit_layer: int | None = None
    exit_context: bool = False  # the blocks after the exit layer also read the dropped groups
    serve_ratio: float = 1 / 3  # the ratio the exported checkpoint serves by default
    scorer_lr: float = 1e-4  # learned policy: the scorer's learning rate (1e-3 drifted from its prior in probes)
    scorer_weight: float = 1.0  # learned policy: weight of the saliency loss towards the late saliency
    scorer_sharpness: float = 6.0  # learned policy: softmax sharpness of the late-saliency target
    straight_through: bool = False  # learned policy: let the KL/CE reach the scores through a gate
    feature_weight: float = 0.0  # weight of the kept groups' feature distillation (0: off)
    # The student's language model weighs each kept key by the tokens it stands for (ToMe's
    # proportional attention, hf_compact.proportional_key_bias). HF path only: vLLM's attention takes
    # no per-key bias, so such a student gets no serving recipe.
    proportional_attention: bool = False
    params: str = "merger"
    lr: float = 1e-4
    ce_weight: float = 0.0
    temperature: float = 1.0
    warmup_steps: int = 20
    clip_norm: float = 1.0
    seed: int = 0
    # the data mix of civic train's recipe (images per step, single share, presence pairs)
    data: tr.Recipe = field(default_factory=tr.Recipe)


def trainable_parameters(model, which: str) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze ``which``; returns the parameters that learn."""
    if which not in PARAM_CHOICES:
        raise ValueError(f"--params must be one of {', '.join(PARAM_CHOICES)}, got {which!r}")
    visual = model.model.visual
    modules = {
        "merger": [visual.merger, *visual.deepstack_merger_list],
        "vision": [visual],
        "all": [model],
    }[which]
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def load_hf_model(path: str | Path):
    """An HF checkpoint (bf16 on disk) as an fp32 model, plus its preset."""
    from transformers import Qwen3VLForConditionalGeneration

    path = Path(path)
    marker = path / tr.TRAIN_MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint written by civic train (no {tr.TRAIN_MARKER})")
    preset = loop_mod._preset_from_dict(json.loads(marker.read_text())["preset"])
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    return model, preset


def student_retentions(enc: tr.Encoded, merge: int, ratio: float, recipe: DistillRecipe) -> list[ImageRetention]:
    """The student's retention per image (downscale students keep every token of their smaller image)."""
    retentions = []
    for _, h, w in enc.image_grid_thw.tolist():
        grid = (h // merge, w // merge)
        if recipe.policy == "downscale":
            retentions.append(ImageRetention(grid_hw=grid, num_kept=grid[0] * grid[1], policy="full"))
            continue
        retentions.append(ImageRetention(grid_hw=grid, num_kept=num_retained(grid[0] * grid[1], ratio),
                                         policy=recipe.policy, exit_layer=recipe.exit_layer,
                                         exit_context=recipe.exit_context))
    return retentions


class TeacherVision:
    """Captures the teacher's vision tower output on every patch: the final block's rows (the late
    selection reads them) and the merged rows, main and each DeepStack level (the feature targets)."""

    def __init__(self, teacher) -> None:
        self.late_rows: torch.Tensor | None = None
        self.merged_levels: list[torch.Tensor] = []
        self._hook = teacher.model.visual.register_forward_hook(self._capture)

    def _capture(self, _module, _args, output) -> None:
        # Read the fields now: the caller replaces pooler_output with its per-image split afterwards.
        self.late_rows = output.last_hidden_state
        self.merged_levels = [output.pooler_output, *(output.deepstack_features or [])]

    def close(self) -> None:
        self._hook.remove()


def late_saliency_loss(late_rows: torch.Tensor, batch, retentions: Sequence[ImageRetention],
                       sharpness: float) -> torch.Tensor:
    """The learned scores' saliency loss towards the civic saliency of the teacher's final rows."""
    losses = []
    image_rows = late_rows.split([GROUP_ROWS * p.num_tokens for p in retentions])
    for rows, plan, scores in zip(image_rows, retentions, batch.scores):
        if scores is None:
            continue
        target = prior_score(rows.reshape(-1, GROUP_ROWS, rows.shape[-1]).mean(dim=1), plan.grid_hw)
        losses.append(saliency_loss(scores, target, sharpness))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def feature_loss(teacher_levels: Sequence[torch.Tensor], batch, retentions: Sequence[ImageRetention]) -> torch.Tensor:
    """Relative squared error of the student's kept merged rows against the teacher's rows of the same
    groups, averaged over the levels (main, then each DeepStack level): sum (s - t)^2 / sum t^2.

    Relative, so levels of different scale weigh alike and the weight reads as a share of the
    targets' energy. Zero when the student is the teacher at full retention.
    """
    groups = concatenated_indices(batch.kept_indices, [p.num_tokens for p in retentions])
    student_levels = [batch.inputs_embeds[0][batch.visual_pos_masks[0]], *batch.deepstack_embeds]
    losses = []
    for student_rows, teacher_rows in zip(student_levels, teacher_levels, strict=True):
        target = teacher_rows[groups].float()
        losses.append((student_rows.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


class Losses(NamedTuple):
    """One chat's distillation losses."""

    kl: torch.Tensor  # per answer, KL(teacher || student)
    ce: torch.Tensor  # per answer, the student's cross-entropy
    selection: torch.Tensor  # the learned scorer's saliency loss (0 without a scorer)
    feature: torch.Tensor  # the kept groups' feature loss (0 unless the recipe weighs it)


def distill_losses(teacher, student, enc: tr.Encoded, ratio: float, recipe: DistillRecipe, merge: int,
                   scorer: TokenScorer | None = None, vision: TeacherVision | None = None,
                   student_enc: tr.Encoded | None = None) -> Losses:
    """Per-answer KL(teacher || student) and cross-entropy of one chat, student at ``ratio``, the
    scorer's saliency loss (0 without a scorer) and the kept groups' feature loss (0 without
    ``recipe.feature_weight``). ``vision``: the teacher's captured tower output, needed by both.

    ``student_enc``: the student's own encoding of the chat (a downscaled image); the text is
    the same, so answer positions map across by text column.
    """
    pos, owner = tr.answer_targets(enc)
    with torch.no_grad():
        t_hidden = teacher.model(**enc.model_inputs(), use_cache=False).last_hidden_state[0]
        t_logp = F.log_softmax(teacher.lm_head(t_hidden[pos]) / recipe.temperature, dim=-1)

    s_enc = enc if student_enc is None else student_enc
    retentions = student_retentions(s_enc, merge, ratio, recipe)
    batch = build_compact_batch(student, s_enc.input_ids, s_enc.pixel_values, s_enc.image_grid_thw,
                                s_enc.mm_token_type_ids, retentions, scorer=scorer,
                                straight_through=recipe.straight_through and scorer is not None)
    mask = (proportional_attention_mask(batch, [plan.grid_hw for plan in retentions])
            if recipe.proportional_attention else None)
    s_hidden = student.model.language_model(
        input_ids=None, inputs_embeds=batch.inputs_embeds, position_ids=batch.position_ids, attention_mask=mask,
        visual_pos_masks=batch.visual_pos_masks, deepstack_visual_embeds=batch.deepstack_embeds,
    ).last_hidden_state[0]
    # Text columns survive compaction in order: full text column j -> compact text column j.
    image_id = student.config.image_token_id
    compact_of = torch.full((enc.input_ids.shape[1],), -1, dtype=torch.long)
    compact_of[torch.nonzero(enc.input_ids[0] != image_id).squeeze(1)] = torch.nonzero(
        batch.input_ids[0] != image_id).squeeze(1)
    s_pos = compact_of[pos]
    assert bool((s_pos >= 0).all()), "an answer target fell on an image column"
    s_logits = student.lm_head(s_hidden[s_pos])
    s_logp = F.log_softmax(s_logits / recipe.temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1) * recipe.temperature ** 2
    ce = F.cross_entropy(s_logits, enc.input_ids[0, pos + 1], reduction="none")
    selection = (late_saliency_loss(vision.late_rows, batch, retentions, recipe.scorer_sharpness)
                 if scorer is not None else torch.zeros(()))
    feature = (feature_loss(vision.merged_levels, batch, retentions) if recipe.feature_weight > 0
               else torch.zeros(()))
    return Losses(tr.per_answer_mean(kl, owner), tr.per_answer_mean(ce, owner), selection, feature)


def distill(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    recipe: DistillRecipe | None = None,
    minutes: float = 15.0,
    max_steps: int | None = None,
    threads: int = 1,
    log_every: int = 10,
    progress: bool = True,
    resume: str | Path | None = None,
) -> Path:
    """Distil for ``minutes`` training CPU-minutes (or ``max_steps``); export to ``out_dir``.

    ``resume``: a student of this teacher and recipe to continue; ``minutes`` and ``max_steps``
    are then totals over all its pieces.
    """
    from tqdm import tqdm

    recipe = recipe or DistillRecipe()
    torch.set_num_threads(threads)
    teacher, preset = load_hf_model(model_dir)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    previous = resumable_student(resume, model_dir, recipe) if resume is not None else None
    student = copy.deepcopy(teacher) if previous is None else load_hf_model(resume)[0]
    student.train()
    params = trainable_parameters(student, recipe.params)
    if recipe.policy not in POLICY_CHOICES:
        raise ValueError(f"policy must be one of {', '.join(POLICY_CHOICES)}, got {recipe.policy!r}")
    if recipe.exit_layer is not None and not (1 <= recipe.exit_layer <= preset.vision.depth):
        raise ValueError(f"exit layer must be in 1..{preset.vision.depth}, got {recipe.exit_layer}")
    if recipe.feature_weight < 0:
        raise ValueError(f"--feature-weight must be >= 0, got {recipe.feature_weight}")
    if recipe.feature_weight > 0 and recipe.policy == "downscale":
        raise ValueError("--feature-weight compares the same groups of the same image; a downscale "
                         "student sees another image (leave it at 0)")
    groups = [{"params": params, "base_lr": recipe.lr}]
    scorer = geometry = None
    vision = TeacherVision(teacher) if recipe.policy == "learned" or recipe.feature_weight > 0 else None
    if recipe.policy == "learned":
        scorer = TokenScorer(ScorerConfig(in_dim=preset.vision.hidden_size)).train()
        groups.append({"params": list(scorer.parameters()), "base_lr": recipe.scorer_lr})
    if recipe.policy == "downscale":
        from civic_vllm.evaluation import geometry_of

        geometry = geometry_of(str(model_dir))
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    encoder = tr.ChatEncoder(preset)
    merge = preset.vision.spatial_merge_size
    rng = np.random.default_rng([recipe.seed, 2])
    out = Path(out_dir)
    log_path = out.parent / f".{out.name}.{CURVE_FILE}"  # moved into the checkpoint at the end
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    budget = minutes * 60.0
    step, cpu = 0, 0.0
    pieces: list[dict] = []
    if previous is not None:
        step, cpu, pieces = previous["steps"], previous["cpu_min"] * 60.0, previous.get("pieces", [])
        rng = restore_state(Path(resume), student, scorer, optimizer, step)
        pieces = [*pieces, {"steps": step, "cpu_min": previous["cpu_min"], "state": rng is not None}]
        rng = rng or np.random.default_rng([recipe.seed, 2, step])
        log_path.write_text((Path(resume) / CURVE_FILE).read_text())
    window: dict[str, list[float]] = defaultdict(list)
    bar = tqdm(total=max_steps or round(minutes, 1), initial=step if max_steps else round(cpu / 60, 1),
               unit="step" if max_steps else "cpu-min", disable=not progress,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    with loop_mod._Stop() as stop:
        while not stop.requested and (step < max_steps if max_steps else cpu < budget):
            t0 = time.process_time()
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * min(1.0, (step + 1) / recipe.warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            chats = tr.sample_chats(rng, recipe.data, 1.0)
            n_answers = sum(len(qas) for _, qas in chats)
            for scene, qas in chats:
                questions, answers = [q.question for q in qas], [q.answer for q in qas]
                enc = encoder.encode(scene.image, questions, answers)
                ratio = float(recipe.ratios[int(rng.integers(len(recipe.ratios)))])
                student_enc = None
                if geometry is not None:  # downscale: the student sees the image at the ratio's budget
                    longest, _ = geometry.downscale_max_pixels(*scene.image.size, ratio)
                    size = {"shortest_edge": geometry.factor ** 2, "longest_edge": longest}
                    student_enc = encoder.encode(scene.image, questions, answers, size=size)
                kl, ce, selection, feature = distill_losses(teacher, student, enc, ratio, recipe, merge,
                                                            scorer=scorer, vision=vision, student_enc=student_enc)
                loss = (kl.sum() + recipe.ce_weight * ce.sum()) / n_answers
                (loss + (recipe.scorer_weight * selection + recipe.feature_weight * feature) / len(chats)).backward()
                window["kl"] += kl.tolist()
                window["ce"] += ce.tolist()
                if scorer is not None:
                    window["select"].append(float(selection.detach()))
                if recipe.feature_weight > 0:
                    window["feature"].append(float(feature.detach()))
            if recipe.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, recipe.clip_norm)
                if scorer is not None:
                    torch.nn.utils.clip_grad_norm_(scorer.parameters(), recipe.clip_norm)
            optimizer.step()
            step += 1
            cpu += time.process_time() - t0
            bar.update(1 if max_steps else round(min(cpu, budget) / 60, 1) - bar.n)
            if step % log_every == 0:
                rec = {"step": step, "cpu_min": round(cpu / 60, 3),
                       **{k: round(float(np.mean(v)), 4) for k, v in window.items()}}
                with log_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                bar.set_postfix(kl=f"{rec['kl']:.4f}", ce=f"{rec['ce']:.3f}", refresh=False)
                window.clear()
    bar.close()
    info = {"distill": {**asdict(recipe), "teacher": str(Path(model_dir).resolve()), "steps": step,
                        "cpu_min": round(cpu / 60, 3), "stopped_early": stop.requested,
                        "curve": CURVE_FILE, "pieces": pieces}}
    state = {"student": {k: v.detach().clone() for k, v in student.state_dict().items()},
             "scorer": scorer.state_dict() if scorer is not None else None,
             "optimizer": optimizer.state_dict(), "rng": rng.bit_generator.state, "steps": step}
    path = tr.export_model(student, preset, out, info)
    (path / DISTILL_MARKER).write_text(json.dumps(info["distill"], indent=2) + "\n")
    shutil.move(log_path, path / CURVE_FILE)
    if recipe.policy != "downscale" and min(recipe.ratios) < 1 and not recipe.proportional_attention:
        served = CivicRecipe(ratio=recipe.serve_ratio, policy=recipe.policy, exit_layer=recipe.exit_layer,
                             exit_context=recipe.exit_context, scorer=scorer.config if scorer is not None else None)
        write_recipe(path, served, scorer)
    (path / STATE_FILE).parent.mkdir(exist_ok=True)
    torch.save(state, path / STATE_FILE)
    return path


def resumable_student(student: str | Path, teacher: str | Path, recipe: DistillRecipe) -> dict:
    """The distill record of ``student`` after checking it continues ``teacher`` with ``recipe``."""
    marker = Path(student) / DISTILL_MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{student}: not a civic distill checkpoint (no {DISTILL_MARKER})")
    done = json.loads(marker.read_text())
    if done.get("teacher") != str(Path(teacher).resolve()):
        raise ValueError(f"{student} was distilled from {done.get('teacher')}, not {Path(teacher).resolve()}")
    wanted = json.loads(json.dumps(asdict(recipe)))  # as recorded: tuples become lists
    # a field the record lacks was added later; the student ran with its default then
    defaults = json.loads(json.dumps(asdict(DistillRecipe())))
    if recipe.policy != "learned":  # without a scorer its settings change nothing
        for name in SCORER_FIELDS:
            wanted.pop(name)
    differing = sorted(k for k, v in wanted.items() if done.get(k, defaults[k]) != v)
    if differing:
        raise ValueError(f"{student} was distilled with another recipe ({', '.join(differing)} differ)")
    return done


def restore_state(student_dir: Path, student, scorer, optimizer, step: int) -> np.random.Generator | None:
    """Load the fp32 weights, optimizer moments and data stream saved with ``student_dir``.

    Returns the data stream, or None when the checkpoint has no saved state (then the bf16
    weights already loaded, a fresh optimizer and a stream the caller reseeds carry on). A
    learned student without state loads its scorer from the checkpoint.
    """
    path = student_dir / STATE_FILE
    if not path.is_file():
        if scorer is not None:
            from civic_vllm.recipe import load_scorer, read_recipe

            scorer.load_state_dict(load_scorer(student_dir, read_recipe(student_dir)).state_dict())
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["steps"] != step:
        raise ValueError(f"{path} is from step {state['steps']}, the checkpoint from step {step}")
    student.load_state_dict(state["student"])
    if scorer is not None:
        scorer.load_state_dict(state["scorer"])
    optimizer.load_state_dict(state["optimizer"])
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    return rng


def soup(students: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Uniform weight average of ``students`` (civic distill outputs of one teacher) at ``out_dir``.

    Averaged in fp32 and exported like a student; ``civic_distill.json`` lists the ingredients'
    recipes and their curves are kept as ``distill_curve.<i>.jsonl``.
    """
    paths = [Path(s).resolve() for s in students]
    if len(paths) < 2:
        raise ValueError("a soup needs at least two students")
    if len(set(paths)) < len(paths):
        raise ValueError("a student is listed twice (weight it by training another one instead)")
    recipes = []
    for path in paths:
        marker = path / DISTILL_MARKER
        if not marker.is_file():
            raise FileNotFoundError(f"{path} is not a student written by civic distill (no {DISTILL_MARKER})")
        recipes.append(json.loads(marker.read_text()))
    teachers = sorted({r["teacher"] for r in recipes})
    if len(teachers) > 1:
        raise ValueError(f"students of different teachers cannot be averaged: {', '.join(teachers)}")
    model, preset = load_hf_model(paths[0])
    total = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for path in paths[1:]:
        other, other_preset = load_hf_model(path)
        if other_preset != preset:
            raise ValueError(f"{path} has another model shape than {paths[0]}")
        for k, v in other.state_dict().items():
            total[k] += v
        del other
    model.load_state_dict({k: v / len(paths) for k, v in total.items()})
    curves = [f"distill_curve.{i}.jsonl" for i in range(len(paths))]
    info = {"soup_of": [{"student": str(p), **r} for p, r in zip(paths, recipes)], "teacher": teachers[0],
            "steps": sum(r["steps"] for r in recipes), "cpu_min": round(sum(r["cpu_min"] for r in recipes), 3),
            "curves": curves}
    out = tr.export_model(model, preset, out_dir, {"distill": info})
    (out / DISTILL_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    for path, name in zip(paths, curves):
        if (path / CURVE_FILE).is_file():
            shutil.copyfile(path / CURVE_FILE, out / name)
    return out


if __name__ == "__main__":  # python -m civic_vllm.training.distill = civic distill (civic_vllm.cli.distill)
    from civic_vllm.cli.distill import main

    sys.exit(main())
