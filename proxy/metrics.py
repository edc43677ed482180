"""Prometheus metrics with the Go connector's names (``--prometheus``).

Names, types and labels follow the OpenCensus views of the Go connector, so
existing dashboards keep working: ``alloydbconn_dial_latency`` (histogram,
ms), ``alloydbconn_open_connections`` (gauge), ``alloydbconn_dial_failure_count``,
``alloydbconn_refresh_success_count``, ``alloydbconn_refresh_failure_count``,
``alloydbconn_bytes_sent`` and ``alloydbconn_bytes_received`` (counters,
exposed without a ``_total`` suffix, as that exporter does). A series appears
once it has data. Counting happens at connection edges only; bytes are read
from the splice core's C counters at scrape time.

The exposition is written here rather than with prometheus_client, whose
counters always gain a ``_total`` suffix.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable

LATENCY_BUCKETS_MS = (5, 25, 100, 250, 500, 1000, 2000, 5000, 30000)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


class Metrics:
    def __init__(self, namespace: str = "") -> None:
        self.dialer_id = str(uuid.uuid4())
        prefix = re.sub(r"[^a-zA-Z0-9_]", "_", namespace)
        self._prefix = f"{prefix}_" if prefix else ""
        self._latency: dict[str, list[float]] = {}  # uri -> bucket counts..., sum, count
        self.dial_failures: defaultdict[str, int] = defaultdict(int)
        self.open_connections: dict[str, int] = {}
        self.refresh_success: defaultdict[str, int] = defaultdict(int)
        self.refresh_failure: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._bytes_done: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.live_bytes: Callable[[], dict[str, tuple[int, int]]] = dict
        # --telemetry-project records each dial into its own histogram too.
        self.on_dial_latency: Callable[[str, float], None] | None = None

    # ---- recording (connection edges only) ------------------------------

    def dial_succeeded(self, uri: str, milliseconds: float) -> None:
        row = self._latency.setdefault(uri, [0.0] * (len(LATENCY_BUCKETS_MS) + 2))
        for i, bound in enumerate(LATENCY_BUCKETS_MS):
            if milliseconds <= bound:
                row[i] += 1
        row[-2] += milliseconds
        row[-1] += 1
        if self.on_dial_latency is not None:
            self.on_dial_latency(uri, milliseconds)

    def connection_opened(self, short: str) -> None:
        self.open_connections[short] = self.open_connections.get(short, 0) + 1

    def connection_closed(self, short: str, sent: int, received: int) -> None:
        self.open_connections[short] -= 1
        totals = self._bytes_done[short]
        totals[0] += sent
        totals[1] += received

    def bytes_done(self) -> dict[str, tuple[int, int]]:
        """Bytes (sent, received) of the closed connections, per instance."""
        return {short: (sent, received) for short, (sent, received) in self._bytes_done.items()}

    def _byte_totals(self) -> dict[str, list[int]]:
        """Bytes [sent, received] per instance: closed connections plus open ones so far."""
        totals: dict[str, list[int]] = {s: list(v) for s, v in self._bytes_done.items()}
        for short, (sent, received) in self.live_bytes().items():
            counts = totals.setdefault(short, [0, 0])
            counts[0] += sent
            counts[1] += received
        return totals

    def series(self) -> dict[str, list[tuple[tuple[tuple[str, str], ...], int]]]:
        """Every series but the latency histogram, as {view: [(labels, value)]}: a copy
        for the telemetry exporter (take it on the event loop, which changes them)."""
        instance = "alloydb_instance"
        out: dict[str, list[tuple[tuple[tuple[str, str], ...], int]]] = {}
        out["open_connections"] = [(((instance, k),), n) for k, n in self.open_connections.items()]
        out["dial_failure_count"] = [(((instance, k),), n) for k, n in self.dial_failures.items()]
        out["refresh_success_count"] = [
            (((instance, k),), n) for k, n in self.refresh_success.items()
        ]
        out["refresh_failure_count"] = [
            ((("alloydb_error_code", code), (instance, k)), n)
            for (k, code), n in self.refresh_failure.items()
        ]
        totals = self._byte_totals()
        out["bytes_sent"] = [(((instance, k),), v[0]) for k, v in totals.items()]
        out["bytes_received"] = [(((instance, k),), v[1]) for k, v in totals.items()]
        return out

    # ---- exposition ------------------------------------------------------

    def render(self) -> str:
        p, dialer = self._prefix, ("alloydb_dialer_id", self.dialer_id)
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> str:
            full = f"{p}alloydbconn_{name}"
            out.append(f"# HELP {full} {help_text}")
            out.append(f"# TYPE {full} {kind}")
            return full

        if self._latency:
            name = family("dial_latency", "histogram", "The distribution of dialer latencies (ms)")
            for uri, row in sorted(self._latency.items()):
                base = [dialer, ("alloydb_instance", uri)]
                for i, bound in enumerate(LATENCY_BUCKETS_MS):
                    out.append(f"{name}_bucket{_labels([*base, ('le', str(bound))])} {int(row[i])}")
                out.append(f"{name}_bucket{_labels([*base, ('le', '+Inf')])} {int(row[-1])}")
                out.append(f"{name}_sum{_labels(base)} {row[-2]:g}")
                out.append(f"{name}_count{_labels(base)} {int(row[-1])}")
        if self.open_connections:
            name = family(
                "open_connections", "gauge", "The current number of open AlloyDB connections"
            )
            for short, n in sorted(self.open_connections.items()):
                out.append(f"{name}{_labels([dialer, ('alloydb_instance', short)])} {n}")
        simple = (
            ("dial_failure_count", "The number of failed dial attempts", self.dial_failures),
            (
                "refresh_success_count",
                "The number of successful certificate refresh operations",
                self.refresh_success,
            ),
        )
        for metric, help_text, values in simple:
            if values:
                name = family(metric, "counter", help_text)
                for key, n in sorted(values.items()):
                    out.append(f"{name}{_labels([dialer, ('alloydb_instance', key)])} {n}")
        if self.refresh_failure:
            name = family(
                "refresh_failure_count",
                "counter",
                "The number of failed certificate refresh operations",
            )
            for (short, code), n in sorted(self.refresh_failure.items()):
                labels = [dialer, ("alloydb_error_code", code), ("alloydb_instance", short)]
                out.append(f"{name}{_labels(labels)} {n}")
        totals = self._byte_totals()
        if totals:
            for index, metric, help_text in (
                (0, "bytes_sent", "The number of bytes sent to AlloyDB"),
                (1, "bytes_received", "The number of bytes received from AlloyDB"),
            ):
                name = family(metric, "counter", help_text)
                for short, counts in sorted(totals.items()):
                    out.append(
                        f"{name}{_labels([dialer, ('alloydb_instance', short)])} {counts[index]}"
                    )
        return "\n".join(out) + "\n" if out else ""
