"""benchmarks.proportional_attention: which retention a checkpoint is probed at, the variants, the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import proportional_attention as P

FLAGS = argparse.Namespace(ratio=0.25, policy="pool", exit_layer=2, exit_context=False)


def _distilled(tmp_path: Path, **recipe) -> Path:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "civic_distill.json").write_text(json.dumps(recipe))
    return tmp_path


def test_a_student_is_probed_as_it_was_distilled_and_a_full_token_one_by_the_flags(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    student = _distilled(tmp_path / "s", ratios=[0.5, 0.25], policy="civic", exit_layer=1, exit_context=True,
                         serve_ratio=1 / 3, proportional_attention=True)
    got = P.retention_of(str(student), FLAGS)
    assert (got["ratio"], got["exit_layer"], got["exit_context"], got["from"]) == (1 / 3, 1, True, "distill recipe")
    assert got["trained_with_proportional_attention"] is True
    (tmp_path / "f").mkdir()
    full = _distilled(tmp_path / "f", ratios=[1.0], policy="civic", exit_layer=None, exit_context=False,
                      serve_ratio=1 / 3)
    got = P.retention_of(str(full), FLAGS)
    assert (got["ratio"], got["policy"], got["exit_layer"], got["from"]) == (0.25, "pool", 2, "flags")


def test_variants_parse_and_refuse_unknown_names() -> None:
    assert P._variants("proportional") == ("proportional",)
    assert P._variants("proportional,plain") == P.VARIANTS
    with pytest.raises(argparse.ArgumentTypeError):
        P._variants("plain,tome")


def test_the_report_shows_the_difference_only_when_both_variants_ran() -> None:
    figure = {"value": 0.5, "ci95": [0.4, 0.6], "n": 10}
    one = {"model": "m", "n": 10, "retention": {"ratio": 1 / 3, "policy": "civic", "exit_layer": 1,
                                               "exit_context": False, "from": "flags"},
           "accuracy": {"proportional": {"overall": figure}}}
    both = {**one, "accuracy": {"plain": {"overall": figure}, "proportional": {"overall": figure}},
            "proportional_minus_plain": {"overall": {"difference": 0.1, "difference_ci95": [0.05, 0.15]}}}
    text = P.report({"data": "d.jsonl", "task": "ground", "command": "c", "models": [one]})
    assert "proportional − plain" not in text and "0.500 (0.400–0.600)" in text
    text = P.report({"data": "d.jsonl", "task": "ground", "command": "c", "models": [both]})
    assert "+10.0 (+5.0 to +15.0)" in text
