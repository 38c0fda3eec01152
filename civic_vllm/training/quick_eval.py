"""Quick evaluation during training: greedy HF generate on the full-token model."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from civic_vllm.client import video_data_url
from civic_vllm.data import shapes, shapes_video
from civic_vllm.training.chats import ChatEncoder
from civic_vllm.training.recipe import EVAL_SEED


def eval_samples(n_per_task: int, seed: int = EVAL_SEED) -> list[tuple[Image.Image, dict[str, Any]]]:
    """A fixed held-out set: ``n_per_task`` samples of every task, as (image, JSONL record)."""
    rng = np.random.default_rng(seed)
    out = []
    for task in shapes.TASKS:
        for i in range(n_per_task):
            image, qa = shapes.generate_sample(rng, task)
            out.append((image, shapes.record(f"e{task}{i:04d}", "", qa)))
    return out


def eval_video_samples(n_per_task: int, seed: int = EVAL_SEED + 1) -> list[tuple[str, dict[str, Any]]]:
    """A fixed held-out video set: ``n_per_task`` samples of every video task, as (mp4 data URL, record)."""
    rng = np.random.default_rng(seed)
    out = []
    for task in shapes_video.VIDEO_TASKS:
        for i in range(n_per_task):
            scene, qa = shapes_video.generate_video_sample(rng, task)
            out.append((video_data_url(scene.frames, shapes_video.FPS),
                        shapes_video.video_record(f"e{task}{i:04d}", "", scene, qa)))
    return out


def load_jsonl_samples(path: str | Path) -> list[tuple[Image.Image, dict[str, Any]]]:
    """A civic-shapes JSONL file (image paths relative to it) as (image, record) pairs."""
    path = Path(path)
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(Image.open(path.parent / r["image"]).convert("RGB"), r) for r in recs]


@torch.inference_mode()
def generate_answer(model, encoder: ChatEncoder, image: Image.Image | str, question: str,
                    max_new_tokens: int = 24) -> str:
    """Greedy answer about an image, or a video (``image``: an mp4 data URL)."""
    if isinstance(image, str):
        enc = encoder.encode_video(image, [question], None)
    else:
        enc = encoder.encode(image, [question], None)
    model.model.rope_deltas = None  # it persists across generate calls
    out = model.generate(
        **enc.model_inputs(), attention_mask=torch.ones_like(enc.input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=encoder.im_end, pad_token_id=encoder.pad_id,
    )
    return encoder.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def quick_eval(model, encoder: ChatEncoder,
               samples: Sequence[tuple[Image.Image | str, dict[str, Any]]]) -> dict[str, Any]:
    """Accuracy overall, per task, and small/large (by ``size``) for single-object tasks."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    examples: dict[str, str] = {}
    for image, rec in samples:
        text = generate_answer(model, encoder, image, rec["question"])
        ok = shapes.is_correct(rec, text)
        hits[rec["task"]].append(ok)
        hits["overall"].append(ok)
        if "size" in rec:
            hits[f"{rec['task']}_{'small' if rec['size'] <= shapes.SMALL_MAX else 'large'}"].append(ok)
        examples.setdefault(rec["task"], f"{rec['answer']} -> {text!r}")
    model.train(was_training)
    acc = {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}
    return {"acc": acc, "n": len(samples), "examples": examples}
