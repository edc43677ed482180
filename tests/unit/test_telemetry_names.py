"""Metric types as the Go proxy's OpenCensus exporter makes them (proxy/telemetry.py)."""

from __future__ import annotations

import pytest

from proxy.telemetry import metric_type, prefix_problem


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", "custom.googleapis.com/opencensus/alloydbconn/dial_latency"),
        ("team/", "custom.googleapis.com/opencensus/team/alloydbconn/dial_latency"),
        ("team", "custom.googleapis.com/opencensus/teamalloydbconn/dial_latency"),  # as Go
        ("custom.googleapis.com/x/", "custom.googleapis.com/x/alloydbconn/dial_latency"),
        ("a/../b/", "custom.googleapis.com/opencensus/b/alloydbconn/dial_latency"),
    ],
)
def test_metric_type(prefix, expected):
    assert metric_type(prefix, "alloydbconn/dial_latency") == expected
    assert prefix_problem(prefix) is None


@pytest.mark.parametrize("prefix", ["my team/", "a:b/", "custom.googleapis.com/1x/", "x" * 300])
def test_prefixes_that_cannot_name_an_instrument(prefix):
    problem = prefix_problem(prefix)
    assert problem is not None and problem.startswith(f'invalid --telemetry-prefix "{prefix}"')
