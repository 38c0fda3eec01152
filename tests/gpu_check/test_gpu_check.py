"""benchmarks.gpu_check without CUDA: the whole script as `make gpu-check` runs it, with vLLM blocked, and its schema.

The script runs in a subprocess with ``sys.modules["vllm"] = None`` (as on the GPU machine, which has no vLLM) and
without TRITON_INTERPRET in its environment (the script must set it itself when CUDA is absent). About 20 s.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from civic_vllm.budget import num_retained

pytestmark = pytest.mark.gpu_check

ROOT = Path(__file__).resolve().parents[2]
NO_VLLM = ("import runpy, sys; sys.modules['vllm'] = None; sys.argv = ['gpu_check', *sys.argv[1:]]; "
           "runpy.run_module('benchmarks.gpu_check', run_name='__main__', alter_sys=True)")


def run_script(*args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHONPATH"] = str(ROOT)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU mode even where a GPU is present
    proc = subprocess.run([sys.executable, "-c", NO_VLLM, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    out = Path(args[args.index("--out") + 1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    return run_script("--out", str(tmp_path_factory.mktemp("gpu_check")))


def test_cpu_mode_says_so_and_passes(cpu_run):
    proc, report, md = cpu_run
    assert "CUDA is absent" in proc.stdout and "CUDA absent" in md
    assert gpu_check.validate_report(report) == []
    assert report["cuda"] is False and report["device"] == "cpu" and report["ok"] is True
    assert {name: part["status"] for name, part in report["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "pass")
    env = report["environment"]
    assert env["vllm"]["installed"] is False and env["gpu"] is None
    # benchmarks.serve and the adapter's vision module import vLLM names: placeholders stood in
    assert "vllm.model_executor.layers.attention.mm_encoder_attention" in env["vllm"]["placeholders"]
    assert report["budget_s"] == 420 and 0 < report["duration_s"] < report["budget_s"]


def test_kernels_ran_under_the_interpreter(cpu_run):
    _, report, _ = cpu_run
    part = report["parts"]["kernels"]
    assert part["kernels"] == {"triton": True, "gather_rows_interpreted": True,
                               "gather_merge_project_interpreted": True}
    cases = part["cases"]
    assert part["passed"] == len(cases) == len(gpu_check.gather_cases(False)) + len(gpu_check.merge_cases(False))
    assert {(c["op"], c["dtype"]) for c in cases} == {
        (op, dt) for op in ("gather_rows", "gather_merge_project") for dt in ("float32", "bfloat16")}
    for case in cases:
        if case["op"] == "gather_rows":
            assert case["exact"]
        else:
            assert case["max_err"] <= case["bound"] and case["K"] > 0


def test_call_site_took_the_cpu_path_and_matches_the_stock_merger(cpu_run):
    _, report, _ = cpu_run
    (case,) = report["parts"]["call_site"]["cases"]
    assert case["path"] == "gather_rows + stock merger"
    assert case["calls"] == case["expected_calls"] == {"gather_merge_project": 0, "gather_rows": 1}
    assert len(case["levels"]) == 1 + gpu_check.DEEPSTACK_LEVELS
    assert case["N"] == 49 and case["K"] == num_retained(49, 1 / 3)
    for level in case["levels"]:
        assert level["ok"] and level["max_abs_diff_vs_reference"] == 0.0  # the same math on CPU


def test_bench_rows(cpu_run):
    _, report, _ = cpu_run
    part = report["parts"]["bench"]
    assert part["backends"] == {"gather_rows": "torch", "gather_merge_project": "torch"}
    assert part["reference_rates"]["copy_gbs"] is None  # no GPU: no reference rates, no share of them
    ks = {str(r): num_retained(49, float(r)) for r in gpu_check.BENCH_RATIOS}
    merger = part["merger"]
    assert len(merger) == 2 * (1 + 2 * len(ks))  # two norms x (stock + 2 paths per ratio)
    for row in merger:
        k = 49 if row["path"].startswith("stock") else ks[row["ratio"]]
        assert row["K"] == k and row["N"] == 49 and row["C"] == 1024
        assert row["flops"] == 2 * k * row["D_out"] ** 2
        assert row["gbs"] == pytest.approx(row["min_bytes"] / (row["ms"] * 1e-3) / 1e9)
        assert row["of_spec_bandwidth"] is None
    fused = {r["ratio"]: r["min_bytes"] for r in merger if r["path"].startswith("fused") and r["norm"] == "per_patch"}
    unfused = {r["ratio"]: r["min_bytes"] for r in merger if r["path"].startswith("torch") and r["norm"] == "per_patch"}
    assert all(fused[r] < unfused[r] for r in ks) and fused["1/3"] < fused["1/2"] < fused["1"]
    gather = part["gather"]
    assert sorted((r["ratio"], r["path"]) for r in gather) == sorted(
        (r, p) for r in ks for p in ("gather_rows (one launch)", "index_select per tensor"))
    assert all(r["widths"] == [1024, 32, 32, 1024] for r in gather)


def test_prefill_next_to_the_planner(cpu_run):
    _, report, md = cpu_run
    part = report["parts"]["prefill"]
    assert part["preset"] == "tiny" and part["image_side"] == 128 and part["timer"] == "perf_counter"
    labels = ["full", "civic r=1/3 exit none", "civic r=1/3 exit 3"]  # exit 6 clipped below the tiny depth 4
    assert [c["label"] for c in part["configs"]] == labels and list(part["results"]) == labels
    assert part["rounds_done"] == 1 and set(part["rounds"][0]["times_s"]) == set(labels)
    assert part["results"]["full"]["kept_tokens"] == 64 and part["results"]["full"]["speedup_vs_full"] == 1.0
    for label in labels[1:]:
        entry = part["results"][label]
        assert entry["kept_tokens"] == num_retained(64, 1 / 3) and entry["speedup_vs_full"] > 0
        assert entry["flop_limit"] == part["planner_limits"][label]["prefill_speedup_limit"] > 1
    assert "| civic r=1/3 exit 3 | 22 |" in md


def test_budget_zero_skips_every_part_cleanly(tmp_path):
    _, report, md = run_script("--out", str(tmp_path), "--budget-s", "0")
    assert gpu_check.validate_report(report) == []
    for part in report["parts"].values():
        assert part["status"] == "skipped" and "budget" in part["reason"]
    assert "skipped" in md


def test_validate_report_finds_broken_reports(cpu_run):
    _, report, _ = cpu_run
    broken = []
    for mutate in (
        lambda r: r.pop("environment"),
        lambda r: r["parts"]["kernels"].update(status="green"),
        lambda r: r["parts"]["bench"]["merger"][0].pop("gbs"),
        lambda r: r["parts"]["prefill"]["results"]["full"].update(kept_tokens="64"),
        lambda r: r["parts"]["call_site"].update(status="error", reason=None),
        lambda r: r.update(ok=False),  # the parts all passed
        lambda r: r.update(schema_version=gpu_check.SCHEMA_VERSION + 1),
    ):
        r = copy.deepcopy(report)
        mutate(r)
        broken.append(gpu_check.validate_report(r))
    assert all(broken), broken


def test_accuracy_rejects_an_error_above_the_bound():
    import torch

    exact = torch.linspace(-1, 1, 11, dtype=torch.float64)
    reference = exact + 1e-3
    assert gpu_check.accuracy(exact + 1e-3, reference, exact, "bfloat16")["ok"]
    verdict = gpu_check.accuracy(exact + 1e-2, reference, exact, "bfloat16")
    assert not verdict["ok"] and verdict["max_err"] > verdict["bound"]


def test_steps_skip_what_the_budget_cannot_hold():
    steps = gpu_check.Steps(gpu_check.Budget(3600.0))
    assert steps.run("a", lambda: 1) == 1
    steps.last_s = 7200.0  # the previous step's length no longer fits
    assert steps.run("b", lambda: 2) is None and steps.skipped == ["b"]
    assert gpu_check.part_status([], steps.skipped) == "skipped"
    assert gpu_check.part_status([{"ok": True}, {"ok": False}], []) == "fail"


def test_placeholders_are_removed_after_import():
    before = {k for k in sys.modules if k == "vllm" or k.startswith("vllm.")}
    saved = sys.modules.get("vllm", "absent")
    sys.modules["vllm"] = None  # as if vLLM were not installed
    try:
        record: list[str] = []
        with gpu_check.vllm_placeholders(record):
            from vllm.some.module import Thing  # noqa: F401 - resolved by the placeholders

            assert Thing.__name__ == "Thing"
        assert record == ["vllm", "vllm.some", "vllm.some.module"]
        assert sys.modules["vllm"] is None and "vllm.some" not in sys.modules
    finally:
        if saved == "absent":
            del sys.modules["vllm"]
        else:
            sys.modules["vllm"] = saved
    assert {k for k in sys.modules if k == "vllm" or k.startswith("vllm.")} == before


def test_default_out_dir_keeps_cpu_runs_out_of_the_results(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_check.default_out_dir(True) == ROOT / "benchmarks" / "results" / "gpu"
    assert gpu_check.default_out_dir(False) == ROOT / "benchmarks" / "results" / "tmp" / "gpu_check"
    monkeypatch.setenv("OUT", "/somewhere")
    assert gpu_check.default_out_dir(False) == Path("/somewhere")


def test_scorer_falls_back_to_the_civic_policy_without_the_recipe_stack():
    def no_pydantic(*_args):
        raise ImportError("No module named 'pydantic'")

    probe = type("DepthProbe", (), {"random_scorer": staticmethod(no_pydantic), "SCORER_SEED": 0,
                                    "POLICY": "learned"})
    scorer, policy, note = gpu_check.scorer_for(probe, 128)
    assert scorer is None and policy == "civic" and "pydantic" in note
