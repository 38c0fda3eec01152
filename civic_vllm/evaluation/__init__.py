"""``civic eval``: civic-shapes accuracy through the real serving path (``vllm serve --model-impl civic``).

Any JSONL in the shared format is accepted (``id``, ``image`` relative to the JSONL file,
``question``, ``answer``, ``task``, optional ``box`` / ``size``), including sets this project
did not generate. Every sample is one OpenAI chat request (image, then question; greedy;
``max_tokens`` 24) whose per-request ``mm_processor_kwargs`` select the method:

* ``full``      every visual token (``civic_policy=full``);
* ``civic`` / ``pool`` / ``random``  the retention policy at ``civic_ratio=R``;
* ``downscale`` the image shrunk by the processor (per-request ``size.longest_edge``) to at
  most the K = round(R * N) tokens the retention policies keep, the closest such size;
* ``default``   no CIVIC setting at all: what the server serves by default (a checkpoint's CIVIC
  recipe, or the server's --mm-processor-kwargs); ``--ratio`` then only labels the result.

Video samples (a ``video`` field, an mp4 path relative to the JSONL, instead of ``image``; e.g.
``civic data synth --video``) are one chat of video, then question. Their methods: ``full``,
``civic`` (the temporal policy at ``civic_video_ratio=R``), ``subsample`` (the naive baseline:
the client keeps about R of the video's frame groups, evenly spread, and sends every token of
those) and ``default`` (e.g. a vanilla server with ``--video-pruning-rate``: EVS). Their token
count is the ``<|video_pad|>`` placeholders of the served prompt (``return_token_ids``), which
every server reports, civic or vanilla.

Visual tokens reaching the LLM are read from the plugin's counters on ``/metrics`` (so they are
what the server did, not what this file expects); KV blocks per request follow vLLM's allocation
``ceil((prompt + completion - 1) / block_size)`` (verified against a live server by the planner tests).

The package: samples (the data file, checked), methods (what one request sends), scoring
(accuracy, the majority baseline, the summary) and run (the requests, the server's counters, a
server sized to the data); ``civic eval``'s command line is :mod:`civic_vllm.cli.eval`.
"""

from __future__ import annotations

from civic_vllm.evaluation.methods import (
    FRAMES_PER_GROUP,
    MAX_TOKENS,
    METHODS,
    VIDEO_METHODS,
    ImageGeometry,
    chat_body,
    geometry_of,
    request_kwargs,
    subsample_frames,
    subsample_groups,
    video_content,
    video_request_kwargs,
)
from civic_vllm.evaluation.run import (
    RETAINED_METRIC,
    VISUAL_METRIC,
    EvalServerError,
    block_size_of,
    evaluate,
    served_model,
    server_config,
    video_pad_id,
    video_profile,
)
from civic_vllm.evaluation.samples import (
    REQUIRED_FIELDS,
    EvalDataError,
    Sample,
    load_samples,
    read_video,
)
from civic_vllm.evaluation.scoring import (
    majority_baseline,
    score,
    summary,
)

__all__ = [
    "EvalDataError",
    "EvalServerError",
    "FRAMES_PER_GROUP",
    "ImageGeometry",
    "MAX_TOKENS",
    "METHODS",
    "REQUIRED_FIELDS",
    "RETAINED_METRIC",
    "Sample",
    "VIDEO_METHODS",
    "VISUAL_METRIC",
    "block_size_of",
    "chat_body",
    "evaluate",
    "geometry_of",
    "load_samples",
    "majority_baseline",
    "read_video",
    "request_kwargs",
    "score",
    "served_model",
    "server_config",
    "subsample_frames",
    "subsample_groups",
    "summary",
    "video_content",
    "video_pad_id",
    "video_profile",
    "video_request_kwargs",
]
