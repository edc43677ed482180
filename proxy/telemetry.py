"""``--telemetry-project``: the connector's metrics to Cloud Monitoring and its
traces to Cloud Trace, as the Go proxy exports them.

Theory of operation. OpenTelemetry's SDK with Google's exporters (the
optional ``[telemetry]`` extra, imported only when the flag is given) does
the work; this module only wires them to the proxy:

- Metrics: the same seven series as ``--prometheus`` (proxy/metrics.py),
  named as the Go proxy's OpenCensus exporter names them: metric type
  ``custom.googleapis.com/opencensus/`` + ``--telemetry-prefix`` +
  ``alloydbconn/dial_latency`` (a prefix that holds a domain such as
  ``custom.googleapis.com/`` replaces the default one), labels
  ``alloydb_dialer_id``, ``alloydb_instance`` and ``alloydb_error_code``.
  The dial latency is a histogram recorded at each dial (Go's buckets);
  the others are read from the proxy's own counters at each export, on the
  event loop (they are the loop's to change). Exported every 60 s
  (``OTEL_METRIC_EXPORT_INTERVAL``, ms, changes it) and once at exit.
- Traces: the spans of proxy/tracing.py, sampled with probability
  1/``--telemetry-sample-rate`` (a child follows its parent), sent in
  batches (``OTEL_BSP_SCHEDULE_DELAY``) and flushed at exit.
- The calls carry the proxy's own credentials (the ``--token``, key file,
  ... of the Admin API) and go over TLS to monitoring.googleapis.com and
  cloudtrace.googleapis.com, or both to ``--telemetry-api-endpoint``.
- A failed export is logged once per interval and kind, as one line with
  the reason; the exporters' own tracebacks are kept out of the log, and
  connections never hear of it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import os
import posixpath
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from proxy import tracing
from proxy.config import Config
from proxy.credentials import TokenSource
from proxy.log import Logger
from proxy.metrics import LATENCY_BUCKETS_MS, Metrics

T = TypeVar("T")

EXTRA_HINT = "pip install 'alloydb-auth-proxy[telemetry]'"
MONITORING_ENDPOINT = "monitoring.googleapis.com:443"
TRACE_ENDPOINT = "cloudtrace.googleapis.com:443"
#: The OpenCensus exporter's default domain, and the domains it leaves alone.
DEFAULT_DOMAIN = "custom.googleapis.com/opencensus/"
_DOMAINS = ("googleapis.com", "kubernetes.io", "istio.io", "knative.dev")
_MODULES = (
    "grpc",
    "opentelemetry.sdk",
    "opentelemetry.exporter.cloud_monitoring",
    "opentelemetry.exporter.cloud_trace",
)


def missing_extra() -> str | None:
    """Why ``--telemetry-project`` cannot work (names the extra), or None."""
    for module in _MODULES:
        try:
            found = importlib.util.find_spec(module)
        except ImportError:  # a parent package is missing
            found = None
        if found is None:
            return (
                f"--telemetry-project needs the telemetry extra ({module} is not installed): "
                f"{EXTRA_HINT}"
            )
    return None


# What OpenTelemetry accepts as an instrument name.
_INSTRUMENT_NAME = re.compile(r"[A-Za-z][-_./A-Za-z0-9]{0,254}")


def prefix_problem(prefix: str) -> str | None:
    """Why ``--telemetry-prefix`` cannot name the metrics, or None."""
    for view in _VIEWS:
        name = exporter_names(prefix, view)[1]
        if not _INSTRUMENT_NAME.fullmatch(name):
            return (
                f'invalid --telemetry-prefix "{prefix}": the metric name it makes, "{name}", '
                "must be ASCII letters, digits and _ . - / (starting with a letter, at most "
                "255 characters)"
            )
    return None


def exporter_names(prefix: str, view: str) -> tuple[str, str]:
    """The view's metric type split as the exporter builds it: (its prefix, the
    instrument name), e.g. ("custom.googleapis.com", "opencensus/alloydbconn/x")."""
    domain, _, name = metric_type(prefix, f"alloydbconn/{view}").partition("/")
    return domain, name


def metric_type(prefix: str, name: str) -> str:
    """The Cloud Monitoring type of the view ``name`` (``alloydbconn/dial_latency``)."""
    full = prefix + name
    if any(domain in full for domain in _DOMAINS):
        return full
    return posixpath.normpath(DEFAULT_DOMAIN + full)  # a metric type, not a file path


class Telemetry:
    """The running exporters; ``shutdown`` flushes and stops them."""

    def __init__(self, providers: list[Any]) -> None:
        self._providers = providers

    def shutdown(self, timeout: float = 5.0) -> None:
        """The last export, waited for at most ``timeout`` seconds (blocking).

        On a daemon thread of its own: a client library that retries an
        unreachable endpoint for minutes must not hold the exit (a thread of
        the loop's executor would be joined at exit).
        """
        tracing.uninstall()

        def stop_all() -> None:
            for provider in self._providers:
                with contextlib.suppress(Exception):  # a failed last export is reported
                    provider.shutdown()

        worker = threading.Thread(target=stop_all, name="telemetry-shutdown", daemon=True)
        worker.start()
        worker.join(timeout)


def start(
    cfg: Config,
    token_source: TokenSource,
    metrics: Metrics | None,
    loop: asyncio.AbstractEventLoop,
    log: Logger,
) -> Telemetry:
    """Start the exporters the flags ask for (call from the event loop's thread)."""
    # gRPC's C core writes its own lines to stderr (a failed handshake at every
    # reconnect), past the proxy's log format; the failures reach the log below.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import grpc

    problems = _ExportProblems(log)
    for name in ("opentelemetry", "google.api_core", "grpc"):
        library_log = logging.getLogger(name)
        library_log.addHandler(problems)
        library_log.propagate = False
    auth = grpc.metadata_call_credentials(_TokenPlugin(token_source, loop))
    credentials = grpc.composite_channel_credentials(grpc.ssl_channel_credentials(), auth)

    def channel(default: str) -> Any:
        return grpc.secure_channel(cfg.telemetry_api_endpoint or default, credentials)

    providers: list[Any] = []
    if not cfg.disable_metrics and metrics is not None:
        providers.append(_start_metrics(cfg, channel(MONITORING_ENDPOINT), metrics, loop, problems))
    if not cfg.disable_traces:
        dialer_id = metrics.dialer_id if metrics is not None else ""
        providers.append(_start_traces(cfg, channel(TRACE_ENDPOINT), dialer_id, problems))
    return Telemetry(providers)


class _TokenPlugin:
    """gRPC call credentials from the proxy's token source (which lives on the loop)."""

    def __init__(self, source: TokenSource, loop: asyncio.AbstractEventLoop) -> None:
        self._source = source
        self._loop = loop

    def __call__(self, _context: Any, callback: Callable[[Any, Exception | None], None]) -> None:
        try:
            future = asyncio.run_coroutine_threadsafe(self._source.token(), self._loop)
            token = future.result(30)
        except Exception as exc:
            callback((), exc)
            return
        callback((("authorization", f"Bearer {token.value}"),), None)


class _ExportProblems(logging.Handler):
    """The exporters' error logs, turned into one proxy log line per kind and interval."""

    def __init__(self, log: Logger) -> None:
        super().__init__(logging.WARNING)
        self._log = log
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self.intervals: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        kind = (
            "Cloud Trace" if "trace" in name else "Cloud Monitoring" if "monitoring" in name or
            "metrics" in name else "telemetry"
        )  # fmt: skip
        reason = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            reason = _first_line(str(record.exc_info[1])) or type(record.exc_info[1]).__name__
        now = time.monotonic()
        with self._lock:
            # Several errors of one export (one per metric descriptor) make one line.
            if now - self._last.get(kind, -1e9) < self.intervals.get(kind, 5.0) * 0.9:
                return
            self._last[kind] = now
        self._log.error("Failed to export to %s (retrying at the next interval): %s", kind, reason)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float = 5.0) -> T:
    """``fn()`` run on the event loop's thread, from another thread."""
    result: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            result.set_result(fn())
        except BaseException as exc:
            result.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return result.result(timeout)


def _start_metrics(
    cfg: Config,
    channel: Any,
    metrics: Metrics,
    loop: asyncio.AbstractEventLoop,
    problems: _ExportProblems,
) -> Any:
    from google.cloud.monitoring_v3 import MetricServiceClient
    from google.cloud.monitoring_v3.services.metric_service.transports import (
        MetricServiceGrpcTransport,
    )
    from opentelemetry.exporter.cloud_monitoring import CloudMonitoringMetricsExporter
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    domain = exporter_names(cfg.telemetry_prefix, "dial_latency")[0]  # the same for every view
    name = {view: exporter_names(cfg.telemetry_prefix, view)[1] for view in _VIEWS}
    client = MetricServiceClient(transport=MetricServiceGrpcTransport(channel=channel))
    exporter = CloudMonitoringMetricsExporter(
        project_id=cfg.telemetry_project, client=client, prefix=domain
    )
    interval_ms = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL") or 60000)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms)
    problems.intervals["Cloud Monitoring"] = interval_ms / 1000
    provider = MeterProvider(
        shutdown_on_exit=False,  # Telemetry.shutdown does it, with a deadline
        metric_readers=[reader],
        views=[
            View(
                instrument_name=name["dial_latency"],
                aggregation=ExplicitBucketHistogramAggregation((0, *LATENCY_BUCKETS_MS)),
            )
        ],
    )
    meter = provider.get_meter("cloud.google.com/go/alloydbconn")
    dialer = ("alloydb_dialer_id", metrics.dialer_id)

    latency = meter.create_histogram(
        name["dial_latency"], unit="ms", description="The distribution of dialer latencies (ms)"
    )
    metrics.on_dial_latency = lambda uri, ms: latency.record(
        ms, {dialer[0]: dialer[1], "alloydb_instance": uri}
    )

    snapshot = _Snapshot(loop, metrics)

    def observe(view: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            for labels, value in snapshot.get()[view]:
                yield Observation(value, {dialer[0]: dialer[1], **dict(labels)})

        return callback

    for view, (kind, description) in _VIEWS.items():
        if kind == "gauge":
            meter.create_observable_gauge(
                name[view], [observe(view)], unit="1", description=description
            )
        elif kind == "counter":
            meter.create_observable_counter(
                name[view], [observe(view)], unit="By" if "bytes" in view else "1",
                description=description,
            )  # fmt: skip
    return provider


# The views besides the latency histogram: (kind, description).
_VIEWS: dict[str, tuple[str, str]] = {
    "dial_latency": ("histogram", "The distribution of dialer latencies (ms)"),
    "open_connections": ("gauge", "The current number of open AlloyDB connections"),
    "dial_failure_count": ("counter", "The number of failed dial attempts"),
    "refresh_success_count": ("counter", "The number of successful certificate refresh operations"),
    "refresh_failure_count": ("counter", "The number of failed certificate refresh operations"),
    "bytes_sent": ("counter", "The number of bytes sent to AlloyDB"),
    "bytes_received": ("counter", "The number of bytes received from AlloyDB"),
}


class _Snapshot:
    """The proxy's counters, copied on the event loop once per export."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics) -> None:
        self._loop = loop
        self._metrics = metrics
        self._taken = -1e9
        self._values: dict[str, list[tuple[tuple[tuple[str, str], ...], int]]] = {}

    def get(self) -> dict[str, list[tuple[tuple[tuple[str, str], ...], int]]]:
        # The callbacks of one export run one after another: one copy serves them all.
        if time.monotonic() - self._taken > 1.0:
            # If the loop is busy or gone: the last copy.
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                self._values = _on_loop(self._loop, self._metrics.series)
            self._taken = time.monotonic()
        return self._values


def _start_traces(cfg: Config, channel: Any, dialer_id: str, problems: _ExportProblems) -> Any:
    from google.cloud.trace_v2 import TraceServiceClient
    from google.cloud.trace_v2.services.trace_service.transports import TraceServiceGrpcTransport
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's successor is OTLP
        from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

        client = TraceServiceClient(transport=TraceServiceGrpcTransport(channel=channel))
        exporter = CloudTraceSpanExporter(project_id=cfg.telemetry_project, client=client)
    # As Go's ProbabilitySampler(1/N): N = 0 is 1/0 = +Inf (every trace), N < 0 none.
    n = cfg.telemetry_sample_rate
    rate = 1.0 if n == 0 else max(0.0, 1 / n)
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(min(rate, 1.0))),
        shutdown_on_exit=False,  # Telemetry.shutdown does it, with a deadline
    )
    processor = BatchSpanProcessor(exporter)
    delay_ms = float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY") or 5000)
    problems.intervals["Cloud Trace"] = delay_ms / 1000
    provider.add_span_processor(processor)
    tracing.install(provider.get_tracer("cloud.google.com/go/alloydbconn"), dialer_id)
    return provider
