"""civic eval against a real `vllm serve --model-impl civic`: token counts per method, KV blocks, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from civic_vllm import evaluation as E
from civic_vllm.budget import num_retained
from civic_vllm.cli import main
from civic_vllm.data import shapes
from civic_vllm.planner import kv_blocks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    return shapes.write_dataset(out, 120, seed=5, splits=["test"])["test"]  # 12 samples, 2 per task


def _run(server_url: str, model: str, data: Path, out: Path, method: str, ratio: str) -> dict:
    code = main(["eval", "--model", model, "--data", str(data), "--method", method, "--ratio", ratio,
                 "--server", server_url, "--out", str(out), "--predictions", str(out.with_suffix(".jsonl"))])
    assert code == 0
    return json.loads(out.read_text())


def test_eval_methods_reach_the_llm_with_the_budgeted_tokens(civic_server, tiny_model: str, data: Path,
                                                             tmp_path: Path) -> None:
    geometry = E.geometry_of(tiny_model)
    sizes = [Image.open(s.image_path).size for s in E.load_samples(data)]
    full_tokens = [geometry.tokens(*s) for s in sizes]
    n = len(sizes)

    full = _run(civic_server.url, tiny_model, data, tmp_path / "full.json", "full", "1")
    civic = _run(civic_server.url, tiny_model, data, tmp_path / "civic.json", "civic", "1/3")
    down = _run(civic_server.url, tiny_model, data, tmp_path / "down.json", "downscale", "1/3")

    assert full["n"] == civic["n"] == n == 12
    assert full["mean_visual_tokens"] == pytest.approx(sum(full_tokens) / n, abs=0.01)
    assert civic["mean_visual_tokens"] == pytest.approx(sum(num_retained(t, 1 / 3) for t in full_tokens) / n, abs=0.01)
    assert civic["mean_visual_tokens_before_retention"] == full["mean_visual_tokens"]
    expected_down = sum(geometry.downscale_max_pixels(*s, 1 / 3)[1] for s in sizes) / n
    assert down["mean_visual_tokens"] == pytest.approx(expected_down, abs=0.01)
    assert down["mean_visual_tokens"] <= civic["mean_visual_tokens"]
    # fewer visual tokens, fewer prompt tokens, by exactly the difference
    assert full["mean_prompt_tokens"] - civic["mean_prompt_tokens"] == pytest.approx(
        full["mean_visual_tokens"] - civic["mean_visual_tokens"], abs=0.01)
    assert full["block_size"] == 128
    assert civic["mean_kv_blocks"] <= full["mean_kv_blocks"]
    for res in (full, civic, down):
        assert set(res["per_task"]) == set(shapes.TASKS) and 0 <= res["accuracy"] <= 1
        assert res["baseline"]["accuracy"] > 0 and set(res["splits"]) <= {"small", "large"}
        assert "predictions" not in res
    preds = [json.loads(line) for line in (tmp_path / "civic.jsonl").read_text().splitlines()]
    assert len(preds) == n and sum(p["correct"] for p in preds) == round(civic["accuracy"] * n)
    # every request holds at least its prompt's blocks
    assert full["mean_kv_blocks"] >= kv_blocks(int(full["mean_prompt_tokens"]), 128) - 1


def test_server_side_rejection_stops_the_run_with_the_line(civic_server, tiny_model: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A request the server refuses (here an exit layer deeper than the tower) is an error, not a wrong answer."""
    Image.new("RGB", (256, 256), (250, 250, 250)).save(tmp_path / "a.png")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "a.png", "question": "How many objects are there?", "answer": "0",
                                "task": "count"}) + "\n")
    code = main(["eval", "--model", tiny_model, "--data", str(data), "--method", "civic", "--ratio", "0.5",
                 "--exit-layer", "99", "--server", civic_server.url, "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "line 1" in err and "HTTP 400" in err and "civic_exit_layer" in err
    assert not (tmp_path / "r.json").exists()
