"""Train a small Qwen3-VL (HF ``Qwen3VLForConditionalGeneration``) from scratch on civic-shapes.

Why it looks like this (see /work/shared/synth-task.md, "Training notes"):

* data is generated on the fly from a saved ``numpy`` generator: no epochs, no overfitting,
  and a resumed run continues the very same stream;
* each image is one multi-turn chat of all its questions (3 for a single-object image, about 7
  for a multi-object one), so one vision pass teaches several answers;
* the loss is the token-mean cross-entropy *per answer*, then a (task-weighted) mean over the
  answers of the step: otherwise the 20 tokens of a box would drown the one-token answers;
* fp32 on one thread (bf16 autocast was 6.5x slower on this CPU);
* the schedule (linear warmup, cosine decay) runs on training CPU-seconds, because the budget
  is CPU time and step cost varies with image size;
* the state (model, AdamW, schedule position, data/torch RNG, step) is written atomically every
  few minutes and on SIGTERM / Ctrl-C, so ``--resume`` loses at most a few minutes;
* the exported directory is the same layout ``model_factory.make_model`` writes (same
  tokenizer, processor and chat template), with trained bf16 weights: HF and vLLM load it.

The token sequence is built here segment by segment (so answer spans are known exactly); a
unit test checks it equals what the chat template + ``Qwen3VLProcessor`` produce, which is what
serving will feed the model.

The pieces: :mod:`~civic_vllm.training.recipe` (presets, ``Recipe``), ``chats`` (token sequences),
``step`` (losses, dense supervision, one step), ``quick_eval`` and ``loop`` (state, export, the
run). This module keeps every public name of the pieces; ``civic train``'s command line is
:mod:`civic_vllm.cli.train` (``python -m civic_vllm.training.train`` runs it too).
"""

from __future__ import annotations

from civic_vllm.training.chats import (  # noqa: F401 - the module's names before the split
    ChatEncoder,
    Encoded,
)
from civic_vllm.training.loop import (  # noqa: F401 - the module's names before the split
    export_from_state,
    export_model,
    load_state,
    load_weights,
    train,
)
from civic_vllm.training.quick_eval import (  # noqa: F401 - the module's names before the split
    eval_samples,
    eval_video_samples,
    generate_answer,
    load_jsonl_samples,
    quick_eval,
)
from civic_vllm.training.recipe import (  # noqa: F401 - the module's names before the split
    CURVE_FILE,
    EVAL_SEED,
    EXPORT_DIR,
    MICRO_PRESET,
    PRESETS,
    RECIPE_FIELDS_ADDED,
    SHAPES_PRESET,
    STATE_FILE,
    TRAIN_MARKER,
    Recipe,
)
from civic_vllm.training.step import (  # noqa: F401 - the module's names before the split
    DENSE_MIN_COVER,
    DenseSupervision,
    DenseTargets,
    answer_losses,
    answer_targets,
    build_model,
    dense_targets,
    lr_factor,
    param_groups,
    per_answer_mean,
    sample_chats,
    train_step,
)

__all__ = [
    "SHAPES_PRESET", "MICRO_PRESET", "Recipe", "ChatEncoder", "Encoded", "train", "train_step",
    "quick_eval", "eval_samples", "export_model", "load_state", "answer_targets",
    "per_answer_mean",
]


if __name__ == "__main__":
    import sys

    from civic_vllm.cli.train import main

    sys.exit(main())
