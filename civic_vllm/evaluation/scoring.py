"""Scoring ``civic eval``'s outputs: accuracy overall, per task and object size, the majority baseline."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from civic_vllm.data import shapes
from civic_vllm.evaluation.samples import Sample


def _mean(values: Sequence[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def majority_baseline(samples: Sequence[Sample]) -> dict[str, Any]:
    """Accuracy of always giving each task's most common answer (scored like the model)."""
    by_task: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_task[s.record["task"]].append(s)
    answers, per_task, hits = {}, {}, []
    for task, group in sorted(by_task.items()):
        answer = Counter(s.record["answer"].strip().lower() for s in group).most_common(1)[0][0]
        ok = [shapes.is_correct(s.record, answer) for s in group]
        answers[task], per_task[task] = answer, _mean(ok)
        hits += ok
    return {"accuracy": _mean(hits), "per_task": per_task, "answers": answers}


def score(samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, Any]:
    """Overall, per task, and small / large (single-object samples with ``size``)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, output in zip(samples, outputs, strict=True):
        ok = shapes.is_correct(sample.record, output)
        task = sample.record["task"]
        hits["overall"].append(ok)
        hits[task].append(ok)
        if (split := sample.size_split) is not None:
            hits[split].append(ok)
            hits[f"{task}_{split}"].append(ok)
    tasks = sorted({s.record["task"] for s in samples})
    return {
        "accuracy": _mean(hits["overall"]),
        "per_task": {t: _mean(hits[t]) for t in tasks},
        "per_task_n": {t: len(hits[t]) for t in tasks},
        "splits": {k: _mean(hits[k]) for k in ("small", "large") if hits[k]},
        "splits_n": {k: len(hits[k]) for k in ("small", "large") if hits[k]},
        "per_task_split": {k: _mean(v) for k, v in sorted(hits.items()) if k.endswith(("_small", "_large"))},
    }


def summary(result: dict[str, Any]) -> str:
    base = result["baseline"]
    lines = [f"{result['method']} r={result['ratio']:.3g}  n={result['n']}  accuracy {result['accuracy']:.3f} "
             f"(most-common-answer baseline {base['accuracy']:.3f})  visual tokens {result['mean_visual_tokens']:.1f}"
             f"  KV blocks {result['mean_kv_blocks']:.2f}"
             + (f"  video tokens {result['mean_video_tokens']:.1f}" if "mean_video_tokens" in result else "")]
    for task, acc in result["per_task"].items():
        lines.append(f"  {task:<10} {acc:.3f}  (baseline {base['per_task'][task]:.3f}, n={result['per_task_n'][task]})")
    for key, acc in result["per_task_split"].items():
        lines.append(f"  {key:<16} {acc:.3f}")
    return "\n".join(lines)
