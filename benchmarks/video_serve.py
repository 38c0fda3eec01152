"""Video serving benchmark: vanilla Qwen3-VL, vLLM's EVS pruning, CIVIC and uniform frame subsampling.

    python -m benchmarks.video_serve [--quick] [--preset bench] [--out benchmarks/results/video_serve.json]
    make bench-video [QUICK=1]

Four contenders on the same checkpoint, dtype, KV pool (bytes), batching and flags; prefix caching and
the multimodal processor cache off; every request carries its own freshly generated random video
(``benchmarks/video_load.py``), so no cache can hit:

* ``vanilla``: ``vllm serve`` with every video token;
* ``EVS q``: vanilla vLLM with ``--video-pruning-rate q`` (Efficient Video Sampling: keeps the first frame
  group whole and the most changed tokens of the others, ``max(N_t, int(N (1 - q)))`` tokens in all);
* ``civic r``: ``--model-impl civic`` with per-request ``civic_video_ratio`` r, chosen from EVS's *measured*
  kept count (``<|video_pad|>`` tokens in ``prompt_token_ids``) so civic keeps as many tokens or fewer;
* ``subsample 1/s``: the vanilla server, the client sends every s-th frame (the naive baseline).

Three servers (vanilla, EVS, civic) run side by side, each idle while another is measured. In order:
token counts per contender (non-streaming requests with ``return_token_ids``); per contender a warm-up, then
locust (``benchmarks/locust/video_locustfile.py``, the image suite's users, warm-up and records) at each
concurrency, ``/metrics`` sampled throughout; the paired TTFT probe at concurrency 1 (contenders alternating
one request at a time, rotating order, bootstrap CIs on ratios of medians); then vLLM's own
``vllm bench serve --dataset-name random-mm`` with a video bucket against each contender at concurrency 1
and 8. Measuring (:func:`measure`) writes ``state.json`` before any analysis; :func:`analyse` turns it into
the report (ratios civic/vanilla, civic/EVS, EVS/vanilla, subsample/vanilla and the acceptance checks) and
:func:`write_report` writes the JSON, PNG and markdown (``--from-state`` rebuilds them without measuring).

vLLM 0.32's EVS fails on its CPU backend (the runner never enables its multimodal-pruning path) and, with
transformers >= 5.10, on any backend (its M-RoPE recomputation misreads the prompt's outer vision-start marker);
the EVS server runs with ``benchmarks/evs_cpu/sitecustomize.py`` on its PYTHONPATH, which fixes both (see
that file). ``--civic-ratio`` fixes civic's ratio (e.g. 1/3 for the issue's KV check on a long video).
Exit status 0 when the tooling worked (whatever PASS/FAIL says), 1 when it could not measure.
Timings mean something only on an otherwise idle machine; the load average is recorded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import requests

from benchmarks.harness import BenchError as HarnessError
from benchmarks.harness import Geometry, add_served_model_args, evs_cpu_env, log, wait_idle
from benchmarks.load import model_id
from benchmarks.serve.analysis import div
from benchmarks.serve.cli import wait_for_quiet_machine
from benchmarks.serve.common import MAX_NUM_BATCHED_TOKENS, RESULTS, ROOT, Bounds, Run, fmt, relroot
from benchmarks.serve.probe import bootstrap_ratio_ci
from benchmarks.serve.run import measure_points, plan_pool, start_server_set, stop_servers
from benchmarks.serve.servers import client_cpus
from benchmarks.video_load import VideoWorkload
from civic_vllm.cost import kv_blocks, kv_tokens
from civic_vllm.model_factory import make_model, models_root
from civic_vllm.prometheus import metric_value
from civic_vllm.serving import ServerConfig, ServerError, vllm_executable

MERGED_PX = 32  # one merged token: patch 16 x spatial merge 2
TEMPORAL_PATCH = 2  # frames per frame group
TEXT_ALLOWANCE = 64  # prompt tokens besides the video placeholders and timestamps, for sizing the pool (template)
GROUP_TEXT_ALLOWANCE = 10  # per frame group: its timestamp "<15.5 seconds>" (6-8 tokens) + vision start and end
COUNT_REQUESTS = 2  # token-count requests per contender
PLACEHOLDER_GOAL = 0.36  # issue 19: video placeholders and KV blocks at r = 1/3 <= 0.36x vanilla
CIVIC_COUNTERS = ("civic:video_tokens_total", "civic:video_tokens_retained_total", "civic:videos_total")

FULL = Bounds(concurrency=(1, 8), warmup_s=10.0, duration_s=30.0, warmup_max_s=45.0, probe_rounds=4,
                    vision_reps=0, stop_timeout_s=60.0)
QUICK = Bounds(concurrency=(1, 8), warmup_s=3.0, duration_s=12.0, warmup_max_s=45.0, probe_rounds=2,
                     vision_reps=0, warm_requests=1, stop_timeout_s=60.0)
RANDOM_MM_PROMPTS = {"full": {1: 2, 8: 8}, "quick": {1: 2, 8: 8}}


class BenchError(HarnessError):
    pass



# --------------------------------------------------------------------------------------------
# What is compared
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoSpec:
    """The request shape: ``frames`` frames of ``width`` x ``height`` px (multiples of 32) at ``fps``."""

    name: str
    width: int
    height: int
    frames: int
    fps: float = 2.0

    @property
    def tokens_per_group(self) -> int:
        return (self.width // MERGED_PX) * (self.height // MERGED_PX)

    def groups(self, stride: int = 1) -> int:
        return math.ceil(len(range(0, self.frames, stride)) / TEMPORAL_PATCH)

    def video_tokens(self, stride: int = 1) -> int:
        """Merged video tokens vanilla Qwen3-VL gives the sent frames (N)."""
        return self.groups(stride) * self.tokens_per_group

    def prompt_bound(self) -> int:
        """Vanilla's prompt tokens at most (for max_model_len and the pool): video, timestamps, template."""
        return self.video_tokens() + TEXT_ALLOWANCE + GROUP_TEXT_ALLOWANCE * self.groups()


@dataclass(frozen=True)
class Contender:
    """One compared configuration, duck-typed for run_point / warm_up / paired_probe: ``server`` names
    the server, ``ratio`` is civic_video_ratio (civic only), ``stride`` the client's frame subsampling."""

    name: str  # vanilla | evs | civic | subsample
    server: str  # vanilla | evs | civic
    ratio: Fraction | None = None
    stride: int = 1
    prune_rate: Fraction | None = None
    default: bool = False  # run_point records it (recipe defaults do not apply here)

    @property
    def label(self) -> str:
        return {"vanilla": "vanilla", "evs": f"EVS q={self.prune_rate}", "civic": f"civic r={self.ratio}",
                "subsample": f"subsample 1/{self.stride}"}[self.name]

    @property
    def slug(self) -> str:
        return self.name


def evs_kept(tokens_per_group: int, groups: int, rate: float) -> int:
    """vLLM's EVS token count (vllm/multimodal/video_prune/evs.py): the first frame group at least."""
    return max(tokens_per_group, int(tokens_per_group * groups * (1 - rate)))


def civic_kept(tokens_per_group: int, groups: int, ratio: Fraction) -> int:
    """CIVIC's video tokens: K_t = ceil(r N_t) per frame group (civic_vllm.budget.num_retained)."""
    return groups * max(1, math.ceil(ratio * tokens_per_group))


def matching_ratio(kept: int, tokens_per_group: int, groups: int) -> Fraction:
    """The largest civic_video_ratio r = k / N_t whose kept count groups * ceil(r N_t) is <= ``kept``
    (at least 1 token a group)."""
    per_group = max(1, min(tokens_per_group, kept // groups))
    return Fraction(per_group, tokens_per_group)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class VideoRun(Run):
    """Run with video requests: the same points, probe and warm-up code drive it."""

    def workload(self, spec: VideoSpec, config: Contender, **kw: Any) -> VideoWorkload:
        return VideoWorkload(video_size=(spec.width, spec.height), frames=spec.frames, stride=config.stride,
                             fps=spec.fps, max_tokens=kw.pop("max_tokens", self.max_tokens),
                             ratio=None if config.ratio is None else float(config.ratio),
                             seed=kw.pop("seed", None) or next(self.seeds), **kw)


def server_configs(run: VideoRun, spec: VideoSpec, rate: Fraction) -> dict[str, ServerConfig]:
    """The three servers: identical but for the model class and EVS's flag (and its CPU shim)."""
    common = dict(model=str(run.model), max_model_len=run.max_model_len,
                  max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, images_per_prompt=1,
                  profile_image_size=(64, 64), videos_per_prompt=1,
                  profile_video_size=(spec.width, spec.height, spec.frames), dtype=run.dtype, kv_cache_gib=None,
                  kv_cache_bytes=run.pool_bytes, prefix_caching=False)
    no_cache = ["--mm-processor-cache-gb", "0"]
    return {
        "vanilla": ServerConfig(civic=False, extra_args=no_cache, **common),
        "evs": ServerConfig(civic=False, extra_args=[*no_cache, "--video-pruning-rate", repr(float(rate))],
                            extra_env=evs_cpu_env(), **common),
        "civic": ServerConfig(civic=True, extra_args=no_cache, **common),
    }


def count_tokens(run: VideoRun, spec: VideoSpec, contender: Contender, video_token_id: int) -> list[dict]:
    """Prompt and video tokens of COUNT_REQUESTS fresh requests (non-streaming, ``return_token_ids``)."""
    wl = run.workload(spec, contender, max_tokens=1)
    server = run.servers[contender.server]
    rows = []
    for _ in range(COUNT_REQUESTS):
        body = {**wl.body(run.served_model), "stream": False, "return_token_ids": True}
        body.pop("stream_options", None)
        response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=run.bounds.request_timeout_s)
        if response.status_code != 200:
            raise BenchError(f"token count for {contender.label}: HTTP {response.status_code} "
                             f"{response.text[:300]}\n{server.log_tail()}")
        ids = response.json()["prompt_token_ids"]
        rows.append({"contender": contender.label, "prompt_tokens": len(ids),
                     "video_tokens": ids.count(video_token_id)})
    log(f"  {contender.label}: video tokens {[r['video_tokens'] for r in rows]}, prompt {rows[0]['prompt_tokens']}")
    return rows


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


def whole_run(records: Path) -> dict | None:
    """One locust point over its whole run (test start to the last completion, warm-up included): completed
    requests, their output tokens and TTFTs. On a slow CPU a point's measuring window can close before any
    request of the first wave completes; this is the figure that still compares. Requests cut off at the stop
    are not counted (conservative)."""
    if not records.exists():
        return None
    start, done = None, []
    for line in records.read_text().splitlines():
        d = json.loads(line)
        if d.get("event") == "test_start":
            start = d["t"]
        elif "event" not in d and d.get("ok") and d.get("e2e") is not None:
            done.append(d)
    if start is None or not done:
        return None
    elapsed = max(d["start"] + d["e2e"] for d in done) - start
    tokens = sum(d["completion_tokens"] for d in done)
    ttft = [d["tok"][0][0] for d in done if d["tok"]]
    return {"requests_completed": len(done), "output_tokens": tokens, "elapsed_s": elapsed,
            "output_tok_per_s": tokens / elapsed if elapsed > 0 else None,
            "req_per_s": len(done) / elapsed if elapsed > 0 else None,
            "ttft_p50_s": statistics.median(ttft) if ttft else None}


def add_whole_run(state: dict) -> None:
    """Each point's ``whole_run`` from its records file (kept under benchmarks/results/tmp/)."""
    for p in state["points"]:
        if p.get("whole_run") is None:
            p["whole_run"] = whole_run(ROOT / p["files"]["records"])


def measure(run: VideoRun, spec: VideoSpec, rate: Fraction, stride: int) -> dict:
    """Start the servers; token counts, locust points, the paired probe and random-mm; stop the servers."""
    from transformers import AutoConfig

    video_token_id = AutoConfig.from_pretrained(str(run.model)).video_token_id
    state: dict[str, Any] = {"counts": [], "random_mm": [], "final_civic": {}}
    try:
        start_server_set(run, server_configs(run, spec, rate))
        run.client_cpus = client_cpus(run.server_info["vanilla"]["binding"], run.args.client_cpus)
        run.served_model = model_id(requests, run.servers["vanilla"].url)
        vanilla, evs = Contender("vanilla", "vanilla"), Contender("evs", "evs", prune_rate=rate)
        subsample = Contender("subsample", "vanilla", stride=stride)
        log("token counts (fresh videos, prompt_token_ids)")
        for contender in (vanilla, subsample):
            state["counts"] += count_tokens(run, spec, contender, video_token_id)
        state["evs"] = {"label": evs.label, "ok": True, "error": None,
                        "kept_by_formula": evs_kept(spec.tokens_per_group, spec.groups(), float(rate))}
        try:
            state["counts"] += count_tokens(run, spec, evs, video_token_id)
            evs_count = min(r["video_tokens"] for r in state["counts"] if r["contender"] == evs.label)
        except BenchError as exc:  # vLLM's EVS fails on its CPU backend (see the notes)
            state["evs"].update(ok=False, error=engine_error(run.servers["evs"].log_text()) or str(exc)[:500])
            log(f"  EVS failed: {state['evs']['error']}; civic's ratio from vLLM's EVS count formula, EVS not timed")
            run.servers.pop("evs").stop()
            evs_count = state["evs"]["kept_by_formula"]
        ratio = run.args.civic_ratio or matching_ratio(evs_count, spec.tokens_per_group, spec.groups())
        civic = Contender("civic", "civic", ratio=ratio)
        state["counts"] += count_tokens(run, spec, civic, video_token_id)
        if ratio != Fraction(1, 3):  # the issue's placeholder check is at r = 1/3
            state["counts"] += count_tokens(run, spec, Contender("civic", "civic", ratio=Fraction(1, 3)),
                                            video_token_id)
        run.configs = run.probe_configs = [vanilla, *([evs] if state["evs"]["ok"] else []), civic, subsample]
        measure_points(run, spec)
        if not run.args.no_random_mm:
            log("vllm bench serve --dataset-name random-mm")
            for contender in run.configs:
                for users in (1, 8):
                    state["random_mm"].append(run_random_mm(run, spec, contender, users))
        text = run.servers["civic"].metrics()
        state["final_civic"] = {k: metric_value(text, k) for k in CIVIC_COUNTERS}
    finally:
        stop_servers(run)
        partial = {**state, "points": run.points, "probe": run.probe}  # kept if the run fails part-way
        (run.raw_dir / "partial.json").write_text(json.dumps(partial, default=str) + "\n")
    state["contenders"] = [{"label": c.label, "name": c.name, "server": c.server,
                            "ratio": None if c.ratio is None else str(c.ratio), "stride": c.stride,
                            "prune_rate": None if c.prune_rate is None else str(c.prune_rate)} for c in run.configs]
    return state


# --------------------------------------------------------------------------------------------
# Analysis (pure: state dict in, report dict out)
# --------------------------------------------------------------------------------------------

PAIRS = (("civic", "vanilla"), ("civic", "evs"), ("evs", "vanilla"), ("subsample", "vanilla"))


def labels_by_name(state: dict) -> dict[str, str]:
    return {c["name"]: c["label"] for c in state["contenders"]}


def token_summary(state: dict) -> dict[str, dict]:
    """Per counted configuration: median video and prompt tokens, KV blocks held at the first token
    (prompt) and at the last step (prompt + max_tokens - 1)."""
    block = state["block_size"]
    out = {}
    for label in dict.fromkeys(r["contender"] for r in state["counts"]):
        rows = [r for r in state["counts"] if r["contender"] == label]
        video = int(statistics.median(r["video_tokens"] for r in rows))
        prompt = int(statistics.median(r["prompt_tokens"] for r in rows))
        out[label] = {"video_tokens": video, "prompt_tokens": prompt, "kv_blocks_prompt": kv_blocks(prompt, block),
                      "kv_blocks_end": kv_blocks(kv_tokens(prompt, state["max_tokens"]), block)}
    return out


def paired_ratio(probe: list[dict], num: str, den: str, key: str = "client_ttft_s") -> dict:
    """Ratio of medians num/den of ``key`` over the probe rounds both have, with the paired bootstrap CI."""
    by_round: dict[int, dict[str, float]] = {}
    for row in probe:
        if row.get(key) is not None:
            by_round.setdefault(row["round"], {})[row["config"]] = row[key]
    rounds = sorted(r for r, v in by_round.items() if num in v and den in v)
    a, b = [by_round[r][num] for r in rounds], [by_round[r][den] for r in rounds]
    if not rounds:
        return {"ratio": None, "ci95": None, "rounds": 0}
    return {"ratio": statistics.median(a) / statistics.median(b), "ci95": bootstrap_ratio_ci(a, b),
            "rounds": len(rounds), "num_median_s": statistics.median(a), "den_median_s": statistics.median(b)}


def point(points: list[dict], label: str, users: int) -> dict | None:
    return next((p for p in points if p["config"] == label and p["concurrency"] == users), None)


def throughput_ratio(points: list[dict], num: str, den: str, users: int, key: str = "output_tok_per_s") -> float | None:
    a, b = point(points, num, users), point(points, den, users)
    if a is None or b is None:
        return None
    return div(a["client"][key], b["client"][key])


def ratio_table(state: dict) -> list[dict]:
    """Every PAIRS ratio: paired probe TTFT (client and server) at concurrency 1, then per concurrency the
    locust throughput (output tok/s, req/s) and TTFT p50 ratios, video tokens and KV blocks."""
    names = labels_by_name(state)
    tokens = token_summary(state)
    rows = []
    for num, den in PAIRS:
        if num not in names or den not in names:
            continue
        a, b = names[num], names[den]
        row: dict[str, Any] = {"pair": f"{num}/{den}", "num": a, "den": b,
                               "probe_ttft": paired_ratio(state["probe"], a, b),
                               "probe_server_ttft": paired_ratio(state["probe"], a, b, "server_ttft_s"),
                               "video_tokens": div(tokens[a]["video_tokens"], tokens[b]["video_tokens"]),
                               "kv_blocks_end": div(tokens[a]["kv_blocks_end"], tokens[b]["kv_blocks_end"])}
        for users in sorted({p["concurrency"] for p in state["points"]}):
            pa, pb = point(state["points"], a, users), point(state["points"], b, users)
            wa, wb = (pa or {}).get("whole_run") or {}, (pb or {}).get("whole_run") or {}
            row[f"c{users}"] = {
                "output_tok_per_s": throughput_ratio(state["points"], a, b, users),
                "req_per_s": throughput_ratio(state["points"], a, b, users, "req_per_s"),
                "ttft_p50": div(pa["client"]["ttft_p50_s"], pb["client"]["ttft_p50_s"]) if pa and pb else None,
                "whole_run_output_tok_per_s": div(wa.get("output_tok_per_s"), wb.get("output_tok_per_s")),
            }
        rows.append(row)
    return rows


def check(name: str, value: float | None, goal: str, passed: bool | None, detail: str = "") -> dict:
    return {"name": name, "value": value, "goal": goal, "pass": passed, "detail": detail}


def acceptance(state: dict, ratios: list[dict]) -> list[dict]:
    """Issue 19's serving checks, from the measurements."""
    by_pair = {r["pair"]: r for r in ratios}
    tokens = token_summary(state)
    names = labels_by_name(state)
    checks = []
    civic, vanilla = tokens[names["civic"]], tokens[names["vanilla"]]
    evs_state = state.get("evs") or {"ok": True}
    if evs_state["ok"]:
        evs_kept_tokens, source = tokens[names["evs"]]["video_tokens"], "measured"
    else:
        evs_kept_tokens, source = evs_state["kept_by_formula"], "vLLM's EVS formula; the EVS server failed"
    checks.append(check("civic keeps no more video tokens than EVS", civic["video_tokens"] / evs_kept_tokens,
                        "civic/EVS video tokens <= 1", civic["video_tokens"] <= evs_kept_tokens,
                        f"civic {civic['video_tokens']} vs EVS {evs_kept_tokens} ({source}; "
                        f"vanilla {vanilla['video_tokens']})"))
    loaded = sorted(u for u in {p["concurrency"] for p in state["points"]} if u >= 8)
    if "civic/evs" not in by_pair:
        why = f"not measured: EVS failed on this backend: {evs_state.get('error')}"
        checks.append(check("civic at least as fast as EVS, TTFT at concurrency 1 (paired probe)", None,
                            "civic/EVS median TTFT <= 1", None, why))
        checks.append(check("civic faster than EVS under load (output tok/s, every concurrency >= 8)", None,
                            "civic/EVS > 1", None, why))
    else:
        ttft = by_pair["civic/evs"]["probe_ttft"]
        checks.append(check("civic at least as fast as EVS, TTFT at concurrency 1 (paired probe)", ttft["ratio"],
                            "civic/EVS median TTFT <= 1", None if ttft["ratio"] is None else ttft["ratio"] <= 1.0,
                            f"95% CI {fmt_ci(ttft).partition(' ')[2] or 'n/a'}, {ttft['rounds']} rounds"))
        values = [by_pair["civic/evs"][f"c{u}"]["output_tok_per_s"]
                  or by_pair["civic/evs"][f"c{u}"]["whole_run_output_tok_per_s"] for u in loaded]
        worst = min((v for v in values if v is not None), default=None)
        checks.append(check("civic faster than EVS under load (output tok/s, every concurrency >= 8)", worst,
                            "civic/EVS > 1", None if worst is None or None in values else worst > 1.0,
                            f"concurrency {loaded}: {[fmt(v) for v in values]}"))
    third = next((v for k, v in tokens.items() if k == "civic r=1/3"), None)
    if third is not None:
        ratio = third["video_tokens"] / vanilla["video_tokens"]
        checks.append(check("video placeholders at r = 1/3 vs vanilla", ratio, f"<= {PLACEHOLDER_GOAL}",
                            ratio <= PLACEHOLDER_GOAL, f"{third['video_tokens']} vs {vanilla['video_tokens']}"))
        blocks = third["kv_blocks_end"] / vanilla["kv_blocks_end"]
        limit = (vanilla["prompt_tokens"] - vanilla["video_tokens"] + third["video_tokens"] + state["max_tokens"]) / (
            vanilla["prompt_tokens"] + state["max_tokens"])
        checks.append(check("KV blocks per request at r = 1/3 vs vanilla (prompt + output, last step)", blocks,
                            f"<= {PLACEHOLDER_GOAL}", blocks <= PLACEHOLDER_GOAL,
                            f"{third['kv_blocks_end']} vs {vanilla['kv_blocks_end']} blocks of {state['block_size']}; "
                            f"text + output tokens do not shrink: token-level floor (T+K+O)/(T+N+O) = {limit:.3f}; "
                            f"at the first token {third['kv_blocks_prompt']} vs {vanilla['kv_blocks_prompt']}"))
    return checks


def metrics_blocks(state: dict) -> dict[str, int | None]:
    """KV blocks one request held at most, from /metrics: vllm:kv_cache_usage_perc's maximum over the
    concurrency-1 window (one request at a time) x the usable blocks. Sampled every poll, so a lower bound."""
    usable = state.get("pool", {}).get("usable_blocks")
    out = {}
    for c in state["contenders"]:
        p = point(state["points"], c["label"], 1)
        peak = p and p["server"].get("kv_usage_max")
        out[c["label"]] = round(peak * usable) if peak is not None and usable else None
    return out


def analyse(state: dict) -> dict:
    ratios = ratio_table(state)
    return {"tokens": token_summary(state), "kv_blocks_from_metrics_c1": metrics_blocks(state), "ratios": ratios,
            "acceptance": acceptance(state, ratios)}


# --------------------------------------------------------------------------------------------
# Report: JSON, PNG, markdown
# --------------------------------------------------------------------------------------------


def fmt_ci(r: dict) -> str:
    if r.get("ratio") is None:
        return "n/a"
    ci = r.get("ci95")
    return f"{r['ratio']:.3f}" + (f" ({ci[0]:.3f}..{ci[1]:.3f})" if ci else "")


def plot(state: dict, report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c["label"] for c in state["contenders"]]
    colours = dict(zip(labels, ["#777777", "#d62728", "#1f77b4", "#2ca02c"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    medians = [statistics.median([r["client_ttft_s"] for r in state["probe"] if r["config"] == x] or [math.nan])
               for x in labels]
    ax.bar(labels, medians, color=[colours[x] for x in labels])
    ax.set_ylabel("TTFT, s (median, paired probe, c=1)")
    ax.set_title("time to first token")
    ax = axes[1]
    users = sorted({p["concurrency"] for p in state["points"]})
    for x in labels:
        ys = [(point(state["points"], x, u) or {}).get("client", {}).get("output_tok_per_s") for u in users]
        ax.plot(users, [math.nan if y is None else y for y in ys], "o-", label=f"{x} (window)", color=colours[x])
        ws = [((point(state["points"], x, u) or {}).get("whole_run") or {}).get("output_tok_per_s") for u in users]
        ax.plot(users, [math.nan if y is None else y for y in ws], "s--", label=f"{x} (whole run)", color=colours[x],
                alpha=0.6)
    ax.set_xticks(users)
    ax.set_xlabel("concurrency (locust users)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput")
    ax.legend(fontsize=8)
    ax = axes[2]
    tok = report["tokens"]
    shown = [x for x in tok]
    xs = range(len(shown))
    ax.bar([i - 0.2 for i in xs], [tok[x]["video_tokens"] for x in shown], 0.4, label="video tokens")
    ax2 = ax.twinx()
    ax2.bar([i + 0.2 for i in xs], [tok[x]["kv_blocks_end"] for x in shown], 0.4, color="#ff7f0e",
            label=f"KV blocks ({state['block_size']} tok) per request")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(shown, rotation=20, fontsize=8)
    ax.set_ylabel("video tokens per request")
    ax2.set_ylabel("KV blocks per request (last step)")
    ax.set_title("tokens and KV blocks")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle(f"Video serving, {state['preset']} ({state['dtype']}), {state['spec']['frames']} frames of "
                 f"{state['spec']['width']}x{state['spec']['height']}" + (" (QUICK)" if state["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(state: dict, report: dict) -> str:
    spec = state["spec"]
    lines = [f"# Video serving benchmark{' (QUICK run)' if state['quick'] else ''}", "",
             f"* Model: `{state['preset']}` preset ({state['dtype']}), `{state['command']}`, {state['created']}, "
             f"{state['duration_s']:.0f} s; load average {state['load_start'][0]:.2f} at the start.",
             f"* Workload: one fresh random video per request, {spec['frames']} frames of {spec['width']}x"
             f"{spec['height']} at {spec['fps']:g} fps, {state['max_tokens']} output tokens (ignore_eos); prefix "
             "caching and the multimodal processor cache off.",
             f"* KV pool (every server): {state['pool']['num_blocks']} blocks x {state['block_size']} tokens.", ""]
    lines += ["## Tokens per request", "", "| configuration | video tokens | prompt tokens | KV blocks (first token) | "
              "KV blocks (last step) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['video_tokens']} | {v['prompt_tokens']} | {v['kv_blocks_prompt']} | {v['kv_blocks_end']} |"
              for k, v in report["tokens"].items()]
    lines += ["", "KV blocks from `/metrics` (peak `vllm:kv_cache_usage_perc` x usable blocks, concurrency 1): "
              + ", ".join(f"{k} {fmt(v, 'd')}" for k, v in report["kv_blocks_from_metrics_c1"].items()) + "."]
    evs = state.get("evs") or {"ok": True}
    if not evs["ok"]:
        lines += ["", f"**EVS ({evs['label']}) could not be served on this backend**: the engine died on the first "
                  f"video request with `{evs['error']}`. Its video tokens by vLLM's own formula: "
                  f"{evs['kept_by_formula']} (civic's ratio is chosen from it); EVS is not timed."]
    users = sorted({p["concurrency"] for p in state["points"]})
    lines += ["", "## Ratios", "", "| ratio | TTFT c=1 (paired probe, 95% CI) | server TTFT c=1 | "
              + " | ".join(f"tok/s c={u} (window) | tok/s c={u} (whole run) | TTFT p50 c={u}" for u in users)
              + " | video tokens | KV blocks |", "|---" * (5 + 3 * len(users)) + "|"]
    for r in report["ratios"]:
        cells = [f"{fmt(r[f'c{u}']['output_tok_per_s'])} | "
                 f"{fmt(r[f'c{u}'].get('whole_run_output_tok_per_s'))} | {fmt(r[f'c{u}']['ttft_p50'])}"
                 for u in users]
        lines.append(f"| {r['num']} / {r['den']} | {fmt_ci(r['probe_ttft'])} | {fmt_ci(r['probe_server_ttft'])} | "
                     + " | ".join(cells) + f" | {fmt(r['video_tokens'])} | {fmt(r['kv_blocks_end'])} |")
    lines += ["", "## Locust points", "",
              "Window: the measuring window after the warm-up; whole run: test start to the last completion, "
              "warm-up included (completed requests only).", "",
              "| configuration | c | TTFT p50 s | TTFT p95 s | req/s | output tok/s | KV usage max | requests | "
              "whole run: requests, output tok/s, TTFT p50 s |", "|---|---|---|---|---|---|---|---|---|"]
    for p in state["points"]:
        c, s = p["client"], p["server"]
        lines.append(f"| {p['config']} | {p['concurrency']} | {fmt(c['ttft_p50_s'])} | "
                     f"{fmt(c['ttft_p95_s'])} | {fmt(c['req_per_s'])} | "
                     f"{fmt(c['output_tok_per_s'], '.1f')} | "
                     f"{fmt(s['kv_usage_max'], '.0%')} | {c['requests_completed']} | "
                     f"{(p.get('whole_run') or {}).get('requests_completed', 0)}, "
                     f"{fmt((p.get('whole_run') or {}).get('output_tok_per_s'), '.2f')}, "
                     f"{fmt((p.get('whole_run') or {}).get('ttft_p50_s'))} |")
    if state["random_mm"]:
        lines += ["", "## vllm bench serve --dataset-name random-mm (video bucket)", "",
                  "| configuration | c | prompts | ok | input tok/request | output tok/s | req/s | median TTFT ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in state["random_mm"]:
            lines.append(f"| {r['contender']} | {r['concurrency']} | {r['num_prompts']} | "
                         f"{'yes' if r['ok'] else 'no: ' + r['error'].strip().splitlines()[-1][:200]} | "
                         f"{fmt(r.get('input_tokens_per_request'), '.0f')} | "
                         f"{fmt(r.get('output_throughput'), '.1f')} | {fmt(r.get('request_throughput'))} | "
                         f"{fmt(r.get('median_ttft_ms'), '.0f')} |")
    lines += ["", "## Acceptance (issue 19, serving)", ""]
    for c in report["acceptance"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["pass"]]
        lines.append(f"* **{verdict}** {c['name']}: {fmt(c['value'])}, needs {c['goal']} ({c['detail']})")
    lines += ["", "## Notes", ""] + [f"* {n}" for n in state["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "EVS on CPU: the EVS server runs with benchmarks/evs_cpu/sitecustomize.py on its PYTHONPATH, which fixes two "
    "faults of vLLM 0.32 + transformers 5.19: CPUModelRunner.load_model never sets is_multimodal_pruning_enabled "
    "(`split_with_sizes expects split_sizes to sum exactly to 4101 ...`), and EVS's M-RoPE recomputation "
    "(vllm/multimodal/video_prune/evs.py:323) mistakes the outer <|vision_start|> that transformers >= 5.10 keeps "
    "before a video's first timestamp for the first frame's (`The expanded size of the tensor (0) must match the "
    "existing size ...`; not CPU specific). Where EVS still fails, the error it logged is under `evs` and the report "
    "compares civic with EVS's token count from vLLM's own formula only (EVS is then not timed).",
    "EVS keeps max(N_t, int(N (1 - q))) tokens (the first frame group whole) and, unlike civic, keeps Qwen3-VL's "
    "M-RoPE positions of dropped tokens (4x position storage); civic's ratio is chosen from EVS's measured count "
    "(from vLLM's formula where the EVS server fails) unless --civic-ratio fixes it (see `command`).",
    "random-mm writes its videos at 30 fps and Qwen3-VL samples 2 frames a second (at least 4 frames), so its "
    "requests carry fewer video tokens than the locust workload (see input tok/request); the subsample row sends "
    "the bucket's frames / stride.",
]


def write_report(state: dict, out_json: Path) -> dict:
    report = analyse(state)
    full = {"benchmark": "video_serve", **{k: v for k, v in state.items() if k not in ("probe", "timeseries")},
            **report, "probe": state["probe"]}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(full, indent=1, default=str) + "\n")
    plot(state, report, out_json.with_suffix(".png"))
    out_json.with_suffix(".md").write_text(markdown(state, report))
    log(f"wrote {relroot(out_json)} (+ .png, .md)")
    return full


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_video(text: str) -> tuple[int, int, int]:
    """WxHxFRAMES, e.g. 384x384x12."""
    try:
        w, h, f = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"video must be WxHxFRAMES, got {text!r}") from None
    if w % MERGED_PX or h % MERGED_PX or f < TEMPORAL_PATCH:
        raise argparse.ArgumentTypeError(f"video sides must be multiples of {MERGED_PX} and frames >= 2, got {text!r}")
    return w, h, f


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_served_model_args(parser, "bench", "short bounds (also: QUICK=1 in the environment)")
    parser.add_argument("--video", type=parse_video, default=(256, 256, 12), help="WxHxFRAMES (default 256x256x12)")
    parser.add_argument("--pruning-rate", type=Fraction, default=Fraction(2, 3), help="EVS's --video-pruning-rate")
    parser.add_argument("--civic-ratio", type=Fraction, default=None,
                        help="civic's civic_video_ratio (default: the largest that keeps no more tokens than EVS)")
    parser.add_argument("--stride", type=int, default=3, help="subsampling baseline: every N-th frame (3)")
    parser.add_argument("--concurrency", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                        help="locust user counts (default 1,8)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per point (30; QUICK 12)")
    parser.add_argument("--probe-rounds", type=int, default=None, help="paired TTFT probe rounds (4; QUICK 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--client-cpus", default="reserved", help="pin locust: 'reserved', 'none' or a list '1'")
    parser.add_argument("--no-random-mm", action="store_true", help="skip vllm bench serve --dataset-name random-mm")
    parser.add_argument("--out", type=Path, default=None, help="JSON path; .png and .md beside it")
    parser.add_argument("--idle-wait", type=float, default=300.0,
                        help="seconds to wait for an idle machine first (the load average is recorded either way)")
    parser.add_argument("--from-state", type=Path, default=None, help="rebuild the report from a run's state.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quick = args.quick or os.environ.get("QUICK", "").strip().lower() in ("1", "true", "yes", "on")
    out_json = (args.out or RESULTS / ("video_serve_quick.json" if args.quick else "video_serve.json")).resolve()
    if args.from_state:
        state = json.loads(args.from_state.read_text())
        add_whole_run(state)
        write_report(state, out_json)
        return 0
    started = time.monotonic()
    load_start = wait_for_quiet_machine(args.idle_wait)
    bounds = QUICK if args.quick else FULL
    overrides = {k: v for k, v in {"concurrency": args.concurrency, "duration_s": args.duration,
                                   "probe_rounds": args.probe_rounds}.items() if v is not None}
    bounds = Bounds(**{**asdict(bounds), **overrides})
    model = Path(args.model).resolve() if args.model else make_model(args.preset, models_root() / args.preset)
    width, height, frames = args.video
    spec = VideoSpec(f"video-{width}x{height}x{frames}", width, height, frames)
    raw_dir = RESULTS / "tmp" / f"{out_json.stem}-raw-{time.strftime('%Y%m%d-%H%M%S')}"
    raw_dir.mkdir(parents=True, exist_ok=True)
    run = VideoRun(args=args, bounds=bounds, model=model, dtype=args.dtype, specs=[spec], configs=[], probe_configs=[],
                   out_json=out_json, out_dir=raw_dir, raw_dir=raw_dir, max_tokens=args.max_tokens,
                   seeds=itertools.count(int(time.time()) % 100000))
    longest = spec.prompt_bound()
    pool = plan_pool(Geometry.from_checkpoint(model, args.dtype), longest, longest, args.max_tokens)
    run.max_model_len, run.pool_bytes = pool["max_model_len"], pool["pool_bytes"]
    log(f"model {model} ({args.dtype}); {'QUICK' if args.quick else 'full'} run; {spec.name}; pool {pool}; "
        f"load average {load_start[0]:.2f}")
    state = measure(run, spec, args.pruning_rate, args.stride)
    state.update({
        "version": 1, "quick": args.quick, "preset": args.preset if not args.model else str(model), "model": str(model),
        "dtype": args.dtype, "spec": asdict(spec), "bounds": asdict(bounds), "max_tokens": args.max_tokens,
        "pruning_rate": str(args.pruning_rate), "stride": args.stride, "pool_plan": pool,
        "pool": run.server_info["vanilla"]["pool"], "block_size": run.server_info["vanilla"]["pool"]["block_size"],
        "servers": run.server_info, "client_cpus": run.client_cpus, "points": run.points, "probe": run.probe,
        "timeseries": run.timeseries, "notes": NOTES + run.notes, "load_start": load_start, "load_end": os.getloadavg(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.video_serve " + " ".join(sys.argv[1:] if argv is None else argv)
                   + (" (QUICK=1)" if args.quick else ""),
        "duration_s": round(time.monotonic() - started, 1),
    })
    add_whole_run(state)
    (raw_dir / "state.json").write_text(json.dumps(state, default=str) + "\n")
    log(f"measurements saved to {relroot(raw_dir / 'state.json')}")
    write_report(json.loads((raw_dir / "state.json").read_text()), out_json)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (HarnessError, ServerError) as exc:
        print(f"benchmarks.video_serve: could not measure: {exc}", file=sys.stderr)
        sys.exit(1)
