"""civic eval on a civic-shapes-video JSONL against a real `vllm serve --model-impl civic` (tiny model):
video tokens per method (full, civic r=1/3, uniform frame subsampling) and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import video_span_text

from civic_vllm import evaluation as E
from civic_vllm.budget import num_retained_per_group
from civic_vllm.cli import main
from civic_vllm.data import shapes_video
from civic_vllm.serving import VllmServer

pytestmark = pytest.mark.e2e

PATCH = 32  # pixels a merged token sees (16-px patches, 2x2 merge)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes-video")
    return shapes_video.write_video_dataset(out, 60, seed=7, splits=["test"])["test"]  # 6 videos


@pytest.fixture(scope="module")
def server(tiny_model: str, data: Path):
    """The server civic eval itself would start for this data (its video profile sized to the data)."""
    config = E.server_config(tiny_model, E.load_samples(data), max_num_batched_tokens=1024)
    assert config.videos_per_prompt == 1 and config.profile_video_size is not None
    with VllmServer(config) as srv:
        yield srv


def _run(url: str, model: str, data: Path, out: Path, method: str, ratio: str) -> dict:
    code = main(["eval", "--model", model, "--data", str(data), "--method", method, "--ratio", ratio,
                 "--server", url, "--out", str(out), "--concurrency", "2"])
    assert code == 0
    return json.loads(out.read_text())


def test_eval_on_video_data_counts_the_video_tokens_of_each_method(server, tiny_model: str, data: Path,
                                                                  tmp_path: Path) -> None:
    recs = [s.record for s in E.load_samples(data)]
    groups = [math.ceil(r["frames"] / 2) for r in recs]
    per_group = [(r["width"] // PATCH) * (r["height"] // PATCH) for r in recs]
    n = len(recs)

    full = _run(server.url, tiny_model, data, tmp_path / "full.json", "full", "1")
    civic = _run(server.url, tiny_model, data, tmp_path / "civic.json", "civic", "1/3")
    sub = _run(server.url, tiny_model, data, tmp_path / "sub.json", "subsample", "1/3")

    assert full["video_tokens"] == [g * t for g, t in zip(groups, per_group)]
    assert civic["video_tokens"] == [  # r counts the whole span: timestamps and markers too
        g * num_retained_per_group((g, r["height"] // 16, r["width"] // 16), 2, 1 / 3,
                                   text_tokens=video_span_text(tiny_model, r["frames"], shapes_video.FPS))
        for g, r in zip(groups, recs)]
    assert sub["video_tokens"] == [len(E.subsample_groups(r["frames"], 1 / 3)) * t for r, t in zip(recs, per_group)]
    for res in (full, civic, sub):
        assert res["n"] == res["videos"] == n and 0 <= res["accuracy"] <= 1
        assert set(res["per_task"]) <= set(shapes_video.VIDEO_TASKS) and res["mean_kv_blocks"] > 0
        assert res["mean_video_tokens"] == pytest.approx(sum(res["video_tokens"]) / n, abs=0.01)
    assert civic["mean_kv_blocks"] <= full["mean_kv_blocks"] and civic["mean_video_tokens"] < full["mean_video_tokens"]
    assert full["mean_prompt_tokens"] - civic["mean_prompt_tokens"] == pytest.approx(
        full["mean_video_tokens"] - civic["mean_video_tokens"], abs=0.01)
