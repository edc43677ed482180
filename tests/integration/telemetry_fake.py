"""A loopback stand-in for Cloud Monitoring and Cloud Trace: the real gRPC
methods (``google.monitoring.v3.MetricService/CreateTimeSeries`` and
``CreateMetricDescriptor``, ``google.devtools.cloudtrace.v2.TraceService/
BatchWriteSpans``) over TLS, with the request messages of Google's own client
packages. It keeps what it was sent, and can be told to fail every call."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.cloud.monitoring_v3 import CreateMetricDescriptorRequest, CreateTimeSeriesRequest
from google.cloud.trace_v2 import BatchWriteSpansRequest

from proxy.emulator.pki import ClusterCA, key_pem, pem


@dataclass
class Point:
    type: str
    labels: dict[str, str]
    value: Any  # int, float, or a distribution: (count, bucket_counts)
    project: str


@dataclass
class Span:
    name: str
    attributes: dict[str, str]
    project: str
    parent: str  # the parent's span id, "" for a root span


@dataclass
class TelemetryFake:
    directory: Path
    points: list[Point] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    authorization: set[str] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=dict)
    fail_with: grpc.StatusCode | None = None

    def __post_init__(self) -> None:
        self._lock = threading.RLock()  # wait() holds it while conditions call latest()
        ca = ClusterCA("telemetry-fake")
        cert, key = ca.server_certificate(["127.0.0.1"], ["localhost"], "telemetry")
        self.ca_file = self.directory / "telemetry-ca.pem"
        self.ca_file.write_text(ca.root_pem)
        # No SO_REUSEPORT: the tests' free-port probe must see this port as taken.
        self._server = grpc.server(ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
        empty = lambda _message: b""  # noqa: E731  (google.protobuf.Empty)
        monitoring = {
            "CreateTimeSeries": grpc.unary_unary_rpc_method_handler(
                self._time_series, CreateTimeSeriesRequest.deserialize, empty
            ),
            "CreateMetricDescriptor": grpc.unary_unary_rpc_method_handler(
                self._descriptor,
                CreateMetricDescriptorRequest.deserialize,
                lambda descriptor: descriptor.SerializeToString(),  # google.api protobuf
            ),
        }
        trace = {
            "BatchWriteSpans": grpc.unary_unary_rpc_method_handler(
                self._spans, BatchWriteSpansRequest.deserialize, empty
            )
        }
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("google.monitoring.v3.MetricService", monitoring),
                grpc.method_handlers_generic_handler("google.devtools.cloudtrace.v2.TraceService", trace),
            )
        )  # fmt: skip
        credentials = grpc.ssl_server_credentials([(key_pem(key), pem(cert).encode())])
        self.port = self._server.add_secure_port("127.0.0.1:0", credentials)
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What the proxy needs to trust the fake, with short export intervals."""
        return {
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(self.ca_file),
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_BSP_SCHEDULE_DELAY": "500",
        }

    def reset(self) -> None:
        """Forget what was received (between two proxies in one test)."""
        with self._lock:
            self.points.clear()
            self.spans.clear()
            self.calls.clear()
            self.authorization.clear()

    def stop(self) -> None:
        self._server.stop(None)

    def wait(self, condition, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if condition(self):
                    return
            time.sleep(0.2)
        raise AssertionError(f"not seen in {timeout} s: calls {self.calls}, {len(self.points)} "
                             f"points, spans {sorted({s.name for s in self.spans})}")  # fmt: skip

    def latest(self, metric_type: str) -> list[Point]:
        """The last exported point of each series of ``metric_type``."""
        with self._lock:
            last: dict[tuple[tuple[str, str], ...], Point] = {}
            for point in self.points:
                if point.type == metric_type:
                    last[tuple(sorted(point.labels.items()))] = point
            return list(last.values())

    # ---- the methods -----------------------------------------------------

    def _answer(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            for key, value in context.invocation_metadata():
                if key == "authorization":
                    self.authorization.add(value)
        if self.fail_with is not None:
            context.abort(self.fail_with, "the fake is told to fail")

    def _descriptor(self, request: CreateMetricDescriptorRequest, context) -> Any:
        self._answer("CreateMetricDescriptor", context)
        return request.metric_descriptor

    def _time_series(self, request: CreateTimeSeriesRequest, context) -> None:
        self._answer("CreateTimeSeries", context)
        with self._lock:
            for series in request.time_series:
                value = series.points[0].value
                kind = type(value).pb(value).WhichOneof("value")
                if kind == "distribution_value":
                    dist = value.distribution_value
                    got: Any = (dist.count, list(dist.bucket_counts))
                else:
                    got = getattr(value, kind)
                self.points.append(
                    Point(series.metric.type, dict(series.metric.labels), got, request.name)
                )

    def _spans(self, request: BatchWriteSpansRequest, context) -> None:
        self._answer("BatchWriteSpans", context)
        with self._lock:
            for span in request.spans:
                attributes = {
                    key: value.string_value.value
                    for key, value in span.attributes.attribute_map.items()
                }
                self.spans.append(
                    Span(span.display_name.value, attributes, request.name, span.parent_span_id)
                )
