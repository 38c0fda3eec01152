"""The run: resumable state written atomically, export to a checkpoint directory, the training loop."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from civic_vllm import model_factory as mf
from civic_vllm.model_factory import ModelPreset, TextDims, VisionDims
from civic_vllm.training.chats import ChatEncoder
from civic_vllm.training.quick_eval import eval_samples, eval_video_samples, quick_eval
from civic_vllm.training.recipe import (
    CURVE_FILE,
    EXPORT_DIR,
    RECIPE_FIELDS_ADDED,
    SHAPES_PRESET,
    STATE_FILE,
    TRAIN_MARKER,
    Recipe,
)
from civic_vllm.training.step import DenseSupervision, build_model, lr_factor, param_groups, train_step


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _preset_from_dict(d: dict[str, Any]) -> ModelPreset:
    def dims(cls, values: dict[str, Any]):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    return ModelPreset(name=d["name"], text=dims(TextDims, d["text"]), vision=dims(VisionDims, d["vision"]),
                       description=d.get("description", ""))


def load_state(work_dir: str | Path) -> dict[str, Any]:
    """The resumable state a run wrote to ``work_dir`` (everything but tensors is plain data)."""
    return torch.load(Path(work_dir) / STATE_FILE, map_location="cpu", weights_only=False)


def export_model(model, preset: ModelPreset, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """A clean checkpoint dir (config, bf16 safetensors, tokenizer, processor, chat template).

    Files other than the weights are written by the model factory, so the tokenizer and
    processor are byte-identical to the random-weight checkpoints'. ``civic_train.json``
    (not the factory's marker) records the training, so ``make_model`` never overwrites it.
    Built in a sibling temp dir and renamed into place.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not (out / TRAIN_MARKER).exists():
        raise FileExistsError(f"{out} exists and was not written by civic train; not touching it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        mf.write_checkpoint(preset, tmp, seed=0, weights=False, dtype="bfloat16")
        tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / TRAIN_MARKER).write_text(json.dumps({"preset": asdict(preset), **(info or {})}, indent=2) + "\n")
        mf.make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class _Stop:
    """SIGTERM sets a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _Stop:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, *_: Any) -> None:
        self.requested = True

    def __exit__(self, *_: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_curve(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (their steps are re-run)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def train(
    model_dir_out: str | Path,
    *,
    minutes: float = 150.0,
    resume: bool = False,
    threads: int = 1,
    recipe: Recipe | None = None,
    preset: ModelPreset = SHAPES_PRESET,
    max_steps: int | None = None,
    eval_every_min: float = 5.0,
    eval_per_task: int = 25,
    checkpoint_every_min: float = 5.0,
    log_every: int = 20,
    export: bool = True,
    progress: bool = True,
) -> Path:
    """Train until ``minutes`` training CPU-minutes (or ``max_steps``) are spent; return the work dir.

    ``model_dir_out`` is a working directory: ``state.pt`` (resumable), ``curve.jsonl``
    (learning curve), ``model/`` (exported checkpoint, written at the end). With ``resume``
    the recipe and model shape come from ``state.pt``; ``minutes`` / ``max_steps`` may extend
    the budget (the cosine then stretches from where it is).
    """
    from tqdm import tqdm

    torch.set_num_threads(threads)
    work = Path(model_dir_out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    curve = work / CURVE_FILE
    if resume and not (work / STATE_FILE).exists():
        raise FileNotFoundError(f"nothing to resume: {work / STATE_FILE} does not exist")
    state = load_state(work) if resume else None
    if state is not None:
        # A state written before a recipe field existed ran without it: resume it the same way.
        recipe = Recipe(**{**RECIPE_FIELDS_ADDED, **state["recipe"]})
        preset = _preset_from_dict(state["preset"])
    elif (work / STATE_FILE).exists():
        raise FileExistsError(f"{work / STATE_FILE} exists: pass resume=True (--resume) or use another directory")
    recipe = recipe or Recipe()
    model = build_model(preset, recipe.seed)
    if state is None and recipe.init_from:
        load_weights(model, recipe.init_from)
    groups = param_groups(model, recipe)
    dense = DenseSupervision(model, preset) if recipe.dense_weight > 0 else None
    if dense is not None:
        groups.append({"params": list(dense.parameters()), "weight_decay": 0.0, "lr_mult": 1.0, "name": "dense_heads"})
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng([recipe.seed, 1])
    step, train_cpu, total_cpu, wall = 0, 0.0, 0.0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        if dense is not None:
            missing = set(dense.state_dict()) - set(state["dense_heads"])
            if missing:
                raise ValueError(f"{work / STATE_FILE} was written by a civic train without the dense heads "
                                 f"{sorted(missing)}; continue it with that version or start a new run")
            dense.load_state_dict(state["dense_heads"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"])
        step, train_cpu, total_cpu, wall = state["step"], state["train_cpu_s"], state["total_cpu_s"], state["wall_s"]
        _truncate_curve(curve, step)
    else:
        curve.write_text("")
        (work / "recipe.json").write_text(json.dumps(
            {"recipe": asdict(recipe), "preset": asdict(preset), "minutes": minutes, "max_steps": max_steps,
             "params": sum(p.numel() for p in model.parameters())}, indent=2) + "\n")
    budget_s = minutes * 60.0
    encoder = ChatEncoder(preset)
    evalset: list[tuple[Any, dict[str, Any]]] = eval_samples(eval_per_task) if eval_per_task > 0 else []
    if eval_per_task > 0 and recipe.p_video > 0:
        evalset += eval_video_samples(eval_per_task)

    def progress_of(step: int, cpu: float) -> float:
        return max(cpu / budget_s, step / max_steps if max_steps else 0.0)

    def save() -> None:
        _atomic_torch_save({
            "version": 1, "step": step, "train_cpu_s": train_cpu, "total_cpu_s": total_cpu, "wall_s": wall,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": {"budget_minutes": minutes, "max_steps": max_steps, "progress": progress_of(step, train_cpu)},
            "data_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "recipe": asdict(recipe), "preset": asdict(preset),
            **({"dense_heads": dense.state_dict()} if dense is not None else {}),
        }, work / STATE_FILE)

    def stamp() -> dict[str, Any]:
        return {"step": step, "cpu_min": round(train_cpu / 60, 3), "cpu_min_total": round(total_cpu / 60, 3),
                "wall_min": round(wall / 60, 3)}

    def run_eval() -> None:
        t0 = time.process_time()
        res = quick_eval(model, encoder, evalset)
        _append_jsonl(curve, {**stamp(), "eval": res["acc"], "examples": res["examples"],
                              "eval_cpu_s": round(time.process_time() - t0, 1)})
        bar.write(f"[eval step {step} @ {train_cpu / 60:.1f} cpu-min] {res['acc']}")

    next_eval = (math.floor(train_cpu / 60 / eval_every_min) + 1) * eval_every_min * 60
    window: dict[str, list[float]] = defaultdict(list)
    cpu0, wall0 = time.process_time(), time.monotonic()
    last_ckpt = wall0
    bar = tqdm(total=round(budget_s / 60, 1), initial=round(min(train_cpu, budget_s) / 60, 1), unit="cpu-min",
               disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 60.0, dynamic_ncols=True)

    def done() -> bool:
        return train_cpu >= budget_s or (max_steps is not None and step >= max_steps)

    with _Stop() as stop:
        while not done() and not stop.requested:
            t0 = time.process_time()
            frac = progress_of(step, train_cpu)
            factor = lr_factor(recipe, step, frac)
            for g in optimizer.param_groups:
                g["lr"] = recipe.lr * g["lr_mult"] * factor
            for task, losses in train_step(model, optimizer, encoder, rng, recipe, frac, dense).items():
                window[task].extend(losses)
            step += 1
            dt = time.process_time() - t0
            train_cpu += dt
            bar.update(round(min(train_cpu, budget_s) / 60, 1) - bar.n)
            now_cpu, now_wall = time.process_time(), time.monotonic()
            total_cpu += now_cpu - cpu0
            wall += now_wall - wall0
            cpu0, wall0 = now_cpu, now_wall
            if step % log_every == 0 or done():
                by_task = {t: round(float(np.mean(v)), 4) for t, v in sorted(window.items())}
                loss = float(np.mean([v for t, v in by_task.items() if not t.startswith("dense_")]))
                _append_jsonl(curve, {**stamp(), "lr": recipe.lr * factor, "loss": round(loss, 4),
                                      "loss_by_task": by_task})
                bar.set_postfix(step=step, loss=f"{loss:.3f}", lr=f"{recipe.lr * factor:.2e}", refresh=False)
                window.clear()
            if evalset and (train_cpu >= next_eval or done()):
                run_eval()
                next_eval = (math.floor(train_cpu / 60 / eval_every_min) + 1) * eval_every_min * 60
            if time.monotonic() - last_ckpt >= checkpoint_every_min * 60 or done():
                save()
                last_ckpt = time.monotonic()
            total_cpu += time.process_time() - cpu0  # eval / checkpoint time
            wall += time.monotonic() - wall0
            cpu0, wall0 = time.process_time(), time.monotonic()
        if stop.requested:
            save()
            bar.write(f"stopped at step {step}; state saved, continue with --resume")
    bar.close()
    if export and done():
        export_model(model, preset, work / EXPORT_DIR, {"recipe": asdict(recipe), **stamp()})
    return work


def load_weights(model, checkpoint_dir: str | Path) -> None:
    """Load an exported checkpoint's weights (bf16 on disk) into the fp32 training model."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no weights to start from: {path} does not exist")
    tensors = load_file(str(path))
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)


def export_from_state(work_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export the model of a (possibly running) run's last checkpoint, without training."""
    state = load_state(work_dir)
    preset = _preset_from_dict(state["preset"])
    model = build_model(preset, 0)
    model.load_state_dict(state["model"])
    info = {"recipe": state["recipe"], "step": state["step"], "cpu_min": round(state["train_cpu_s"] / 60, 3)}
    return export_model(model, preset, out_dir or Path(work_dir) / EXPORT_DIR, info)
