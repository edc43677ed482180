"""``--telemetry-project``: metrics to Cloud Monitoring and traces to Cloud Trace,
received by a loopback gRPC fake that speaks the real methods over TLS
(tests/integration/telemetry_fake.py), from the real CLI."""

from __future__ import annotations

import re
import signal
import time

import pytest

from proxy.telemetry import missing_extra

from .conftest import URI, psql
from .proxyproc import ProxyProcess, free_port_block, without_module

pytestmark = pytest.mark.skipif(missing_extra() is not None, reason=str(missing_extra()))

GHOST = URI.replace("/instances/inst", "/instances/ghost")  # the emulator does not know it
SHORT = "project-id.us-central1.clust.inst"
GHOST_SHORT = "project-id.us-central1.clust.ghost"
SPANS = {
    "cloud.google.com/go/alloydbconn.Dial",
    "cloud.google.com/go/alloydbconn/internal.InstanceInfo",
    "cloud.google.com/go/alloydbconn/internal.Connect",
    "cloud.google.com/go/alloydbconn/internal.RefreshConnection",
    "cloud.google.com/go/alloydbconn/internal.FetchMetadata",
    "cloud.google.com/go/alloydbconn/internal.FetchEphemeralCert",
}


@pytest.fixture
def fake(tmp_path):
    from .telemetry_fake import TelemetryFake

    server = TelemetryFake(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def telemetry_proxy(start_proxy, fake):
    """start(*flags) -> (proxy, port of URI, port of GHOST)."""

    def start(*flags: str):
        port = free_port_block(2)
        proxy = start_proxy(
            URI, GHOST, "--port", str(port), "--telemetry-project", "my-project",
            "--telemetry-api-endpoint", fake.endpoint, *flags, env=fake.env(),
        )  # fmt: skip
        return proxy, port, port + 1

    return start


def test_metrics_and_traces_with_the_go_names(telemetry_proxy, fake):
    proxy, port, ghost_port = telemetry_proxy(
        "--telemetry-prefix", "team/", "--telemetry-sample-rate", "1"
    )
    for n in range(3):
        assert psql(f"SELECT {n}", host="127.0.0.1", port=port).stdout.strip() == str(n)
    assert psql("SELECT 1", host="127.0.0.1", port=ghost_port, check=False).returncode != 0
    base = "custom.googleapis.com/opencensus/team/alloydbconn/"
    types = {base + name for name in (
        "dial_latency", "open_connections", "dial_failure_count", "refresh_success_count",
        "refresh_failure_count", "bytes_sent", "bytes_received",
    )}  # fmt: skip
    fake.wait(lambda f: types <= {p.type for p in f.points} and {s.name for s in f.spans} >= SPANS)
    assert {p.type for p in fake.points} == types
    assert {p.project for p in fake.points} == {"projects/my-project"}
    dialer_ids = {p.labels["alloydb_dialer_id"] for p in fake.points}
    assert len(dialer_ids) == 1 and re.fullmatch(r"[0-9a-f-]{36}", dialer_ids.pop())

    (latency,) = fake.latest(base + "dial_latency")
    assert latency.labels["alloydb_instance"] == URI  # the raw URI, as in Go
    count, buckets = latency.value
    assert count == 3 and len(buckets) == 11  # bounds 0, 5, 25, ... 30000 and the overflow
    (success,) = fake.latest(base + "refresh_success_count")
    assert (success.labels["alloydb_instance"], success.value) == (SHORT, 1)
    (failure,) = fake.latest(base + "refresh_failure_count")
    assert failure.labels["alloydb_instance"] == GHOST_SHORT and failure.value >= 1
    assert failure.labels["alloydb_error_code"]
    (dial_failure,) = fake.latest(base + "dial_failure_count")
    assert (dial_failure.labels["alloydb_instance"], dial_failure.value) == (GHOST, 1)
    (sent,) = fake.latest(base + "bytes_sent")
    assert sent.labels["alloydb_instance"] == SHORT and sent.value > 0
    fake.wait(lambda f: [p.value for p in f.latest(base + "open_connections")] == [0])

    dials = [s for s in fake.spans if s.name == "cloud.google.com/go/alloydbconn.Dial"]
    assert len(dials) == 4  # every dial sampled at rate 1: three good, one failed
    assert {s.attributes["/alloydb/instance"] for s in dials} == {URI, GHOST}
    assert {s.project for s in fake.spans} == {"projects/my-project"}
    # A refresh is no part of the dial that started it: its span is a root, as in Go.
    refreshes = [s for s in fake.spans if s.name.endswith("internal.RefreshConnection")]
    assert refreshes and all(s.parent == "" for s in refreshes)
    assert all(s.parent for s in fake.spans if s.name.endswith("internal.Connect"))
    assert fake.authorization == {"Bearer tok-app"}  # the proxy's own credentials
    assert proxy.stop(signal.SIGTERM) == 143


def test_disable_metrics_disable_traces_and_the_sample_rate(telemetry_proxy, fake):
    proxy, port, _ = telemetry_proxy("--disable-metrics", "--telemetry-sample-rate", "1")
    psql("SELECT 1", host="127.0.0.1", port=port)
    fake.wait(lambda f: any(s.name.endswith(".Dial") for s in f.spans))
    proxy.stop()
    assert "CreateTimeSeries" not in fake.calls

    fake.reset()
    proxy, port, _ = telemetry_proxy("--disable-traces")
    psql("SELECT 1", host="127.0.0.1", port=port)
    fake.wait(lambda f: "CreateTimeSeries" in f.calls)
    proxy.stop()  # flushes: a span, had there been one, would be sent now
    assert "BatchWriteSpans" not in fake.calls and not fake.spans

    fake.reset()
    proxy, port, _ = telemetry_proxy("--telemetry-sample-rate", "1000000000")
    for _ in range(5):
        psql("SELECT 1", host="127.0.0.1", port=port)
    proxy.stop()
    assert "CreateTimeSeries" in fake.calls  # exported at exit
    assert not fake.spans  # 5 dials at 1 in 10^9: none sampled

    proxy, port, _ = telemetry_proxy("--telemetry-sample-rate", "0")  # Go: 1/0, every trace
    psql("SELECT 1", host="127.0.0.1", port=port)
    proxy.stop()
    assert any(s.name.endswith(".Dial") for s in fake.spans)


@pytest.mark.parametrize("failure", ["refused", "unreachable"])
def test_a_failing_endpoint_warns_once_per_interval(telemetry_proxy, fake, failure):
    """Every call refused (PERMISSION_DENIED, as for a service account without the
    roles), or nothing listening: one line per interval and kind, no traceback, no
    line per connection, and the connections do not notice."""
    import grpc

    if failure == "refused":
        fake.fail_with = grpc.StatusCode.PERMISSION_DENIED
    else:
        fake.stop()  # its port is closed now
    proxy, port, _ = telemetry_proxy("--telemetry-sample-rate", "1")
    began = time.monotonic()
    for _ in range(20):
        psql("SELECT 1", host="127.0.0.1", port=port)
    time.sleep(max(0.0, 4 - (time.monotonic() - began)))
    seconds = time.monotonic() - began
    lines = [line for line in proxy.stderr if "Failed to export to Cloud Monitoring" in line]
    assert 1 <= len(lines) <= seconds + 2, lines  # one per 1-s interval, not one per connection
    if failure == "refused":
        assert "the fake is told to fail" in lines[0]
        # Cloud Trace's client retries UNAVAILABLE for two minutes before it gives up.
        assert any("Failed to export to Cloud Trace" in line for line in proxy.stderr)
    assert "Traceback" not in proxy.output
    assert psql("SELECT 2", host="127.0.0.1", port=port).stdout.strip() == "2"
    assert proxy.stop() == 143


def test_a_prefix_that_cannot_name_a_metric_is_refused_at_start(emulator):
    args = [URI, "--port", str(free_port_block(1)), "--telemetry-project", "p", "--token", "t",
            "--telemetry-prefix", "my team/", "--alloydbadmin-api-endpoint", emulator.admin_url]  # fmt: skip
    proxy = ProxyProcess(args)
    assert proxy.wait_exit() == 1
    proxy.wait_for(
        r'terminal error: invalid --telemetry-prefix "my team/": the metric name it makes, '
        r'"opencensus/my team/alloydbconn/dial_latency", must be ASCII letters',
        stream="stderr",
    )
    assert "Traceback" not in proxy.output
    # The prefix names metrics only: with them off it does not matter.
    with ProxyProcess([*args, "--disable-metrics"]) as traces_only:
        traces_only.wait_ready()


def test_without_the_extra_the_start_fails_naming_it(emulator):
    args = [URI, "--port", str(free_port_block(1)), "--telemetry-project", "p", "--token", "t",
            "--alloydbadmin-api-endpoint", emulator.admin_url]  # fmt: skip
    proxy = ProxyProcess(args, command=without_module("opentelemetry.sdk"))
    assert proxy.wait_exit() == 1
    proxy.wait_for(
        r"The proxy has encountered a terminal error: --telemetry-project needs the telemetry "
        r"extra \(opentelemetry\.sdk is not installed\): "
        r"pip install 'alloydb-auth-proxy\[telemetry\]'",
        stream="stderr",
    )
