"""benchmarks.box_errors: centre and size errors of grounding answers, by object size."""

from __future__ import annotations

import math

from benchmarks.box_errors import box_errors, row_thirds


def test_errors_are_split_by_size_and_signed_for_size():
    samples = {
        "a": {"task": "ground", "box": [100, 100, 130, 140], "size": 20},
        "b": {"task": "ground", "box": [500, 500, 600, 600], "size": 100},
        "c": {"task": "ground", "box": [0, 0, 10, 10], "size": 30},
        "d": {"task": "color", "answer": "red"},
    }
    predictions = [
        {"id": "a", "output": "[110, 90, 150, 140]"},  # centre +15 x, -5 y; 10 wider, 10 taller
        {"id": "b", "output": "[500, 500, 600, 600]"},  # exact
        {"id": "c", "output": "no box"},
        {"id": "d", "output": "red"},
    ]
    small, middle, large = box_errors(samples, predictions)
    assert (small["n"], small["unparseable"]) == (1, 1)
    assert (small["abs_dcx"], small["abs_dcy"], small["dw"], small["dh"]) == (15.0, 5.0, 10.0, 10.0)
    assert small["acc"] == 0.0 and 0 < small["iou"] < 0.5
    assert middle["n"] == 0 and math.isnan(middle["abs_dcx"])
    assert (large["n"], large["iou"], large["acc"]) == (1, 1.0, 1.0)


def test_errors_split_by_given_groups_such_as_the_image_aspect():
    samples = {
        "a": {"task": "ground", "box": [100, 100, 200, 200], "size": 50},
        "b": {"task": "ground", "box": [100, 100, 200, 200], "size": 50},
        "c": {"task": "ground", "box": [0, 0, 100, 100], "size": 30},
    }
    predictions = [{"id": "a", "output": "[100, 100, 200, 200]"}, {"id": "b", "output": "[100, 300, 200, 400]"},
                   {"id": "c", "output": "?"}]
    square, wide = box_errors(samples, predictions, groups={"a": "square", "b": "wide", "c": "wide"})
    assert (square["group"], square["n"], square["acc"], square["abs_dcy"]) == ("square", 1, 1.0, 0.0)
    assert (wide["group"], wide["n"], wide["unparseable"], wide["acc"], wide["abs_dcy"]) == ("wide", 1, 1, 0.0, 200.0)


def test_row_thirds_and_the_signed_bias():
    samples = {"top": {"task": "ground", "box": [0, 0, 100, 100], "size": 40},
               "low": {"task": "ground", "box": [0, 800, 100, 1000], "size": 40},
               "low2": {"task": "ground", "box": [0, 700, 100, 900], "size": 40}}
    predictions = [{"id": "top", "output": "[0, 20, 100, 120]"}, {"id": "low", "output": "[0, 700, 100, 900]"},
                   {"id": "low2", "output": "[0, 640, 100, 840]"}]
    groups = row_thirds(samples)
    assert groups == {"top": "1 top", "low": "3 bottom", "low2": "3 bottom"}
    top, bottom = box_errors(samples, predictions, groups)
    assert (top["dcy"], top["abs_dcy"]) == (20.0, 20.0)  # + is down
    assert (bottom["n"], bottom["dcy"], bottom["abs_dcy"], bottom["dcx"]) == (2, -80.0, 80.0, 0.0)
