"""Trace spans around dials and refreshes, named as the Go connector names them.

Nothing here imports OpenTelemetry: until ``--telemetry-project`` (without
``--disable-traces``) installs a tracer (proxy/telemetry.py), ``span()``
returns one shared no-op context, so the plain proxy pays a global lookup per
dial or refresh and nothing per byte. The names and the attribute keys are
the Go proxy 1.15's (OpenCensus): ``/alloydb/instance``, ``/alloydb/dialer_id``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

DIAL = "cloud.google.com/go/alloydbconn.Dial"
INSTANCE_INFO = "cloud.google.com/go/alloydbconn/internal.InstanceInfo"
CONNECT = "cloud.google.com/go/alloydbconn/internal.Connect"
REFRESH = "cloud.google.com/go/alloydbconn/internal.RefreshConnection"
FETCH_METADATA = "cloud.google.com/go/alloydbconn/internal.FetchMetadata"
FETCH_CERT = "cloud.google.com/go/alloydbconn/internal.FetchEphemeralCert"

_NO_SPAN = contextlib.nullcontext()
_tracer: Any = None  # an OpenTelemetry Tracer once installed
_dialer_id = ""


def install(tracer: Any, dialer_id: str) -> None:
    global _tracer, _dialer_id
    _tracer, _dialer_id = tracer, dialer_id


def uninstall() -> None:
    install(None, "")


def span(name: str, instance: str = "") -> contextlib.AbstractContextManager[Any]:
    """A span named ``name`` while the block runs (the current span becomes its
    parent); an exception out of the block marks it failed."""
    if _tracer is None:
        return _NO_SPAN
    attributes = {"/alloydb/dialer_id": _dialer_id}
    if instance:
        attributes["/alloydb/instance"] = instance
    return _tracer.start_as_current_span(name, attributes=attributes)  # type: ignore[no-any-return]


async def traced(name: str, instance: str, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()`` inside a span, for a call that runs as a task of its own
    (made inside: a task cancelled before it starts leaves no coroutine unawaited)."""
    with span(name, instance):
        return await call()
