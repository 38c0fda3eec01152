"""civic eval's data loading, scoring and method settings (the serving path is in tests/e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from civic_vllm import evaluation as E
from civic_vllm.budget import num_retained


def _write(tmp_path: Path, lines: list[str | dict], image: str | None = "img.png") -> Path:
    if image:
        Image.new("RGB", (64, 64), (200, 200, 200)).save(tmp_path / image)
    path = tmp_path / "data.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = {"id": "a", "image": "img.png", "question": "What color is the shape?", "answer": "red", "task": "color",
        "size": 20}


def test_loads_foreign_files_with_relative_paths_and_blank_lines(tmp_path: Path) -> None:
    sub = tmp_path / "pics"
    sub.mkdir()
    Image.new("RGB", (32, 32)).save(sub / "x.png")
    ground = {"image": "pics/x.png", "question": "Where?", "answer": "[1, 2, 30, 40]", "task": "ground"}
    count = {"image": "pics/x.png", "question": "How many objects are there?", "answer": 3, "task": "count"}
    samples = E.load_samples(_write(tmp_path, [GOOD, "", ground, count]))
    assert [s.line for s in samples] == [1, 3, 4]
    assert samples[1].record["box"] == [1.0, 2.0, 30.0, 40.0]  # taken from the answer when no "box"
    assert samples[1].record["id"] == "line3" and samples[2].record["answer"] == "3"
    assert samples[0].size_split == "small" and samples[1].size_split is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"data.jsonl:2: not valid JSON"),
        ("[1, 2]", r"data.jsonl:2: expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "answer"}), r"data.jsonl:2: missing field\(s\) answer"),
        (json.dumps({**GOOD, "image": "nope.png"}), r"data.jsonl:2: image 'nope.png' not found"),
        (json.dumps({**GOOD, "task": "ground", "answer": "somewhere"}), r"data.jsonl:2: a ground sample needs 'box'"),
        (json.dumps({**GOOD, "size": -3}), r"data.jsonl:2: field 'size'"),
        (json.dumps({**GOOD, "question": ""}), r"data.jsonl:2: field 'question'"),
    ],
)
def test_bad_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(E.EvalDataError, match=message):
        E.load_samples(_write(tmp_path, [GOOD, line]))


def test_unreadable_image_and_empty_or_missing_file(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(E.EvalDataError, match=r"data.jsonl:1: image 'broken.png' cannot be read"):
        E.load_samples(_write(tmp_path, [{**GOOD, "image": "broken.png"}], image=None))
    with pytest.raises(E.EvalDataError, match="no samples"):
        E.load_samples(_write(tmp_path, ["", "  "]))
    with pytest.raises(E.EvalDataError, match="no such data file"):
        E.load_samples(tmp_path / "missing.jsonl")


def test_score_and_majority_baseline(tmp_path: Path) -> None:
    recs = [
        {**GOOD, "answer": "red"}, {**GOOD, "answer": "red", "size": 100}, {**GOOD, "answer": "blue", "size": 100},
        {"image": "img.png", "question": "Where?", "answer": "[0, 0, 100, 100]", "task": "ground", "size": 60},
    ]
    samples = E.load_samples(_write(tmp_path, recs))
    res = E.score(samples, ["Red", "blue", "blue", "[0, 0, 90, 100]"])
    assert res["accuracy"] == 0.75 and res["per_task"] == {"color": 0.6667, "ground": 1.0}
    assert res["splits"] == {"small": 1.0, "large": 0.6667} and res["per_task_split"]["color_large"] == 0.5
    base = E.majority_baseline(samples)
    assert base["answers"]["color"] == "red" and base["per_task"] == {"color": 0.6667, "ground": 1.0}
    assert base["accuracy"] == 0.75


GEOMETRY = E.ImageGeometry(patch_size=16, merge_size=2, min_pixels=65_536, max_pixels=16_777_216)


@pytest.mark.parametrize("size", [(448, 448), (512, 384), (320, 448), (1000, 333), (256, 256)])
@pytest.mark.parametrize("ratio", [0.5, 1 / 3, 0.25, 0.15])
def test_downscale_hits_the_retention_budget_from_below(size: tuple[int, int], ratio: float) -> None:
    full = GEOMETRY.tokens(*size)
    budget = num_retained(full, ratio)
    longest, tokens = GEOMETRY.downscale_max_pixels(*size, ratio)
    assert tokens <= budget and tokens == GEOMETRY.tokens(*size, longest, GEOMETRY.factor ** 2)
    assert tokens >= 0.6 * budget  # the closest size under the budget, not a far smaller one
    # no larger cap stays within the budget
    f2 = GEOMETRY.factor ** 2
    assert GEOMETRY.tokens(*size, longest + f2, f2) > budget or longest // f2 >= full


def test_request_kwargs_per_method() -> None:
    assert E.request_kwargs("full", 1.0, None, (448, 448), None) == {"civic_policy": "full"}
    assert E.request_kwargs("pool", 0.25, 2, (448, 448), None) == {"civic_policy": "pool", "civic_ratio": 0.25,
                                                                   "civic_exit_layer": 2}
    kw = E.request_kwargs("downscale", 1 / 3, None, (448, 448), GEOMETRY)
    assert kw["civic_policy"] == "full" and kw["size"]["shortest_edge"] == 1024
    assert E.request_kwargs("downscale", 1.0, None, (448, 448), GEOMETRY) == {"civic_policy": "full"}


def test_evaluate_rejects_bad_settings_before_any_request() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        E.evaluate([], "http://127.0.0.1:9", method="crop")
    with pytest.raises(ValueError, match="use --ratio 1"):
        E.evaluate([], "http://127.0.0.1:9", method="full", ratio=0.5)
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        E.evaluate([], "http://127.0.0.1:9", method="civic", ratio=0.0)


def test_block_size_from_metrics() -> None:
    text = '# HELP x\nvllm:cache_config_info{block_size="128",cache_dtype="auto"} 1.0\n'
    assert E.block_size_of(text) == 128 and E.block_size_of("vllm:other 1\n") is None


def test_cli_reports_data_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from civic_vllm.cli import main

    data = _write(tmp_path, [GOOD, "{oops"])
    code = main(["eval", "--model", str(tmp_path), "--data", str(data), "--method", "civic", "--ratio", "1/3",
                 "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "data.jsonl:2: not valid JSON" in err
    with pytest.raises(SystemExit):
        main(["eval", "--data", str(data), "--method", "civic", "--ratio", "2", "--out", "x.json"])
