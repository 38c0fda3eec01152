"""The one /metrics parser against Prometheus text as vLLM 0.32 writes it."""

from __future__ import annotations

import math

from civic_vllm.evaluation import block_size_of
from civic_vllm.prometheus import histogram, metric_labels, metric_value, samples

TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
vllm:num_requests_running_extra{engine="0"} 100.0
vllm:cache_config_info{block_size="128",cache_dtype="auto",num_gpu_blocks="57",note="a \\"quoted\\", value"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 1.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.75
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 5.0
civic:visual_tokens_total 196.0 1733400000000
broken line without value
civic:nan_gauge NaN
"""


def test_metric_value_sums_label_sets_and_matches_whole_names():
    assert metric_value(TEXT, "vllm:num_requests_running") == 3.0  # not the _extra metric
    assert metric_value(TEXT, "civic:visual_tokens_total") == 196.0  # a trailing timestamp is ignored
    assert metric_value(TEXT, "civic:absent") == 0.0


def test_labels_of_an_info_gauge_with_escaped_quotes():
    labels = metric_labels(TEXT, "vllm:cache_config_info")
    assert labels["block_size"] == "128" and labels["num_gpu_blocks"] == "57"
    assert labels["note"] == 'a \\"quoted\\", value'
    assert metric_labels(TEXT, "vllm:absent") == {}
    assert block_size_of(TEXT) == 128
    assert block_size_of('vllm:cache_config_info{block_size="None"} 1.0') is None


def test_histogram_sums_engines_per_bucket():
    hist = histogram(TEXT, "vllm:time_to_first_token_seconds")
    assert hist == {"buckets": {0.1: 4.0, math.inf: 6.0}, "sum": 0.75, "count": 5.0}


def test_comments_and_malformed_lines_are_skipped():
    names = [s.name for s in samples(TEXT)]
    assert "broken" not in names and not any(n.startswith("#") for n in names)
    assert math.isnan(next(s.value for s in samples(TEXT) if s.name == "civic:nan_gauge"))
