"""The three servers (vanilla, EVS, civic) and what reads them besides locust: vLLM's own random-mm bench."""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

from benchmarks.harness import evs_cpu_env, log, wait_idle
from benchmarks.serve.common import MAX_NUM_BATCHED_TOKENS, ROOT
from benchmarks.video_serve.common import RANDOM_MM_PROMPTS, Contender, VideoRun, VideoSpec
from civic_vllm.serving import ServerConfig, vllm_executable


def server_configs(run: VideoRun, spec: VideoSpec, rate: Fraction) -> dict[str, ServerConfig]:
    """The three servers: identical but for the model class and EVS's flag (and its CPU shim)."""
    common = dict(model=str(run.model), max_model_len=run.max_model_len,
                  max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, images_per_prompt=1,
                  profile_image_size=(64, 64), videos_per_prompt=1,
                  profile_video_size=(spec.width, spec.height, spec.frames), dtype=run.dtype, kv_cache_gib=None,
                  kv_cache_bytes=run.pool_bytes, prefix_caching=False)
    shared_args = ["--mm-processor-cache-gb", "0"]  # no processor cache: every request is a prefill
    if run.args.block_size is not None:  # all three alike: finer blocks track the token counts closer
        shared_args += ["--block-size", str(run.args.block_size)]
    return {
        "vanilla": ServerConfig(civic=False, extra_args=shared_args, **common),
        "evs": ServerConfig(civic=False, extra_args=[*shared_args, "--video-pruning-rate", repr(float(rate))],
                            extra_env=evs_cpu_env(), **common),
        "civic": ServerConfig(civic=True, extra_args=shared_args, civic_defaults=civic_defaults(run), **common),
    }


def civic_defaults(run: VideoRun) -> dict:
    """The civic server's ``--mm-processor-kwargs``: the video exit layer when one is asked for."""
    layer = run.args.civic_video_exit_layer
    return {} if layer is None else {"civic_video_exit_layer": layer}


def random_mm_command(run: VideoRun, spec: VideoSpec, contender: Contender, users: int, prompts: int,
                      out: Path) -> list[str]:
    """``vllm bench serve --dataset-name random-mm`` with one video bucket (H, W, frames sent)."""
    frames = len(range(0, spec.frames, contender.stride))
    cmd = [vllm_executable(), "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
           "--base-url", run.servers[contender.server].url, "--model", run.served_model,
           "--tokenizer", str(run.model), "--dataset-name", "random-mm",
           "--random-mm-bucket-config", str({(spec.height, spec.width, frames): 1.0}),
           "--random-mm-base-items-per-request", "1",
           "--random-mm-limit-mm-per-prompt", json.dumps({"image": 0, "video": 1}),
           "--random-input-len", "16", "--random-output-len", str(run.max_tokens), "--ignore-eos",
           "--num-prompts", str(prompts), "--max-concurrency", str(users), "--seed", str(next(run.seeds)),
           "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    if contender.ratio is not None:
        ratio = float(contender.ratio)
        cmd += ["--extra-body", json.dumps({"mm_processor_kwargs": {"civic_ratio": ratio, "civic_video_ratio": ratio}})]
    return cmd


RANDOM_MM_FIELDS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                    "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                    "mean_tpot_ms", "median_e2el_ms")


def run_random_mm(run: VideoRun, spec: VideoSpec, contender: Contender, users: int) -> dict:
    prompts = RANDOM_MM_PROMPTS["quick" if run.args.quick else "full"][users]
    out = run.raw_dir / "random_mm" / f"{contender.slug}_c{users}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = random_mm_command(run, spec, contender, users, prompts, out)
    wait_idle(run.servers[contender.server], run.bounds)
    row: dict[str, Any] = {"contender": contender.label, "concurrency": users, "num_prompts": prompts,
                           "command": cmd[1:]}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {**row, "ok": False, "error": "vllm bench serve did not finish within 300 s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-1500:]
        log(f"  random-mm {contender.label} c={users}: exit {proc.returncode}\n{tail}")
        return {**row, "ok": False, "returncode": proc.returncode, "error": tail}
    result = json.loads(out.read_text())
    row.update({"ok": True, **{k: result.get(k) for k in RANDOM_MM_FIELDS}})
    if row["completed"]:
        row["input_tokens_per_request"] = row["total_input_tokens"] / row["completed"]
    log(f"  random-mm {contender.label} c={users}: {row.get('output_throughput') or 0:.1f} tok/s, "
        f"median TTFT {row.get('median_ttft_ms') or 0:.0f} ms, {row.get('input_tokens_per_request', 0):.0f} input tok")
    return row


def engine_error(log_text: str) -> str | None:
    """The first exception line a vLLM worker or engine logged (``...Error: ...``), without the log prefix."""
    for line in log_text.splitlines():
        if ("Worker" in line or "EngineCore" in line) and "Error: " in line and "Traceback" not in line:
            return line.split("] ", 1)[-1].strip()[:500]
    return None
