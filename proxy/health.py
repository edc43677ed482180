"""The health-check server and the localhost admin server, on the proxy's own loop.

Health (``--health-check`` on ``--http-address:--http-port``), any method:
  /startup    200 ``ok`` once listeners accept; 503 ``error`` before; with
              ``--with-backend-check`` also 503 (and the dial errors) while
              any instance cannot be dialled
  /liveness   200 ``ok`` while the process serves HTTP at all
  /readiness  200 ``ok`` when started, not shutting down and below
              ``--max-connections``; 503 with the reason otherwise
Admin (``--quitquitquit`` and/or ``--debug`` on ``localhost:--admin-port``):
  /quitquitquit  GET or POST: 200, then the proxy shuts down (exit 0); other methods 400
  /reload        POST: read the configuration again (as SIGHUP does, see
                 proxy/reload.py); 200 and what changed, or 500 and why not
  /debug/pprof/  see proxy/profiling.py

A small HTTP/1.1 handler is all these need; it answers one request per
connection and never blocks the loop. Each request head must arrive within
5 s and 16 KiB (100 headers); at most 64 connections are held at once, and
when full the oldest one still sending its head is dropped for the new one.
Requests whose Host or Origin name someone else's site (DNS rebinding), or
that a browser marks cross-site, get 403: a web page cannot read /debug or
trigger /quitquitquit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.log import Logger
from proxy.metrics import Metrics

#: handler(method, query string) -> (status, body)
Handler = Callable[[str, str], Awaitable[tuple[int, str]]]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
}
# One deadline for reading a whole request head, and caps on its size and on
# connections held at once: a slow or oversized client costs one connection
# slot for at most the deadline, never a traceback, and never starves probes.
_HEAD_TIMEOUT = 5.0
_MAX_HEAD_BYTES = 16384
_MAX_HEADERS = 100
_MAX_CONNECTIONS = 64
_LOOPBACK_NAMES = ("localhost", "localhost.")


class _BadRequest(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status, self.body = status, body


def host_is_allowed(host_header: str, extra: tuple[str, ...] = (), *, any_ip: bool = False) -> bool:
    """Whether a Host (or Origin) names this server rather than someone's DNS name.

    A web page can reach a loopback server through DNS rebinding, but its
    requests then carry the attacker's name in Host. Loopback names and
    addresses pass, the configured address passes, and with ``any_ip`` any IP
    literal (a Kubernetes probe names the pod's IP).
    """
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in _LOOPBACK_NAMES or host in extra:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any_ip or address.is_loopback


@dataclass
class RequestPolicy:
    """Which requests a server takes (see ``host_is_allowed``).

    ``any_host`` drops the Host check, for a server bound to a network
    address, which anyone who can route to it reaches under any name; the
    cross-site checks still apply.
    """

    extra_hosts: tuple[str, ...] = ()
    any_ip: bool = False
    any_host: bool = False

    def problem(self, headers: dict[str, str]) -> str:
        host = headers.get("host", "")
        if (
            host
            and not self.any_host
            and not host_is_allowed(host, self.extra_hosts, any_ip=self.any_ip)
        ):
            return f"host {host!r} is not this server"
        if headers.get("sec-fetch-site", "") == "cross-site":
            return "cross-site request"
        origin = headers.get("origin", "")
        if origin and origin != "null":
            name = urllib.parse.urlsplit(origin).netloc
            if not (self.any_host and name == host) and not host_is_allowed(
                name, self.extra_hosts, any_ip=self.any_ip
            ):
                return f"origin {origin!r} is not this server"
        elif origin == "null":
            return "opaque origin"
        return ""


@dataclass
class ProbeState:
    """What the probes report; the supervisor and the server update it."""

    started: bool = False
    stopping: bool = False
    max_connections: int = 0


class HTTPServer:
    """Routes ``path`` to ``handler(method, query) -> (status, body)``."""

    def __init__(self, routes: dict[str, Handler], policy: RequestPolicy | None = None) -> None:
        self._routes = routes
        self._policy = policy or RequestPolicy()
        self._server: asyncio.base_events.Server | None = None
        self._open = 0
        # Connections still reading their request head, oldest first.
        self._reading: dict[asyncio.StreamWriter, None] = {}

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=_MAX_HEAD_BYTES)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
        total = 0
        lines: list[bytes] = []
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise _BadRequest(431, "request header fields too large\n") from None
            except asyncio.IncompleteReadError:
                raise ConnectionError("closed before the request ended") from None
            total += len(line)
            if total > _MAX_HEAD_BYTES or len(lines) > _MAX_HEADERS:
                raise _BadRequest(431, "request header fields too large\n")
            if line in (b"\r\n", b"\n"):
                break
            lines.append(line)
        if not lines:
            raise _BadRequest(400, "empty request\n")
        parts = lines[0].decode("latin-1").split()
        if len(parts) < 2:
            raise _BadRequest(400, "malformed request line\n")
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            name, sep, value = raw.decode("latin-1").partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return parts[0], parts[1], headers

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= _MAX_CONNECTIONS:
            # Full: the oldest connection still sending its head (a slow
            # client, most likely) makes room; a probe takes milliseconds.
            if not self._reading:
                writer.transport.abort()
                return
            oldest = next(iter(self._reading))
            del self._reading[oldest]
            oldest.transport.abort()
        self._open += 1
        self._reading[writer] = None
        try:
            try:
                method, target, headers = await asyncio.wait_for(
                    self._read_head(reader), _HEAD_TIMEOUT
                )
                self._reading.pop(writer, None)
                refused = self._policy.problem(headers)
                if refused:
                    raise _BadRequest(403, f"forbidden: {refused}\n")
                path, _, query = target.partition("?")
                route = self._routes.get(path)
                status, body = (
                    await route(method, query) if route else (404, "404 page not found\n")
                )
            except _BadRequest as bad:
                status, body = bad.status, bad.body
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await asyncio.wait_for(writer.drain(), _HEAD_TIMEOUT)
            if status in (400, 431):
                # The client may still be sending what we refused: closing on
                # unread bytes would reset the connection before it reads
                # the answer. Half-close, then read and drop a bounded amount.
                writer.write_eof()
                await asyncio.wait_for(_discard(reader, 1 << 20), 1.0)
        except (
            ConnectionError,
            TimeoutError,
            asyncio.TimeoutError,
            UnicodeDecodeError,
            ValueError,
        ):
            pass  # the client's problem: nothing to log, nothing to answer
        finally:
            self._reading.pop(writer, None)
            self._open -= 1
            writer.close()


async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    while limit > 0 and (data := await reader.read(65536)):
        limit -= len(data)


def health_routes(
    state: ProbeState,
    connections: Callable[[], int],
    log: Logger,
    backend_check: Callable[[], Awaitable[list[str]]] | None = None,
) -> dict[str, Handler]:
    async def startup(_method: str, _query: str) -> tuple[int, str]:
        if not state.started:
            return 503, "error"
        if backend_check is not None:
            # --with-backend-check: dial every instance on each probe.
            errors = await backend_check()
            if errors:
                problem = ", ".join(errors)
                log.error("[Health Check] Startup failed: %s", problem)
                return 503, problem
        return 200, "ok"

    async def liveness(_method: str, _query: str) -> tuple[int, str]:
        return 200, "ok"

    async def readiness(_method: str, _query: str) -> tuple[int, str]:
        problem = ""
        if not state.started:
            problem = "proxy is not started"
        elif state.stopping:
            problem = "proxy has stopped"
        elif state.max_connections and connections() >= state.max_connections:
            problem = (
                f"max connections reached (open = {connections()}, max = {state.max_connections})"
            )
        if problem:
            log.error("[Health Check] Readiness failed: %s", problem)
            return 503, problem
        return 200, "ok"

    return {"/startup": startup, "/liveness": liveness, "/readiness": readiness}


def admin_routes(
    on_quit: Callable[[], None],
    on_reload: Callable[[], Awaitable[tuple[bool, str]]] | None = None,
) -> dict[str, Handler]:
    async def quitquitquit(method: str, _query: str) -> tuple[int, str]:
        if method not in ("GET", "POST"):
            return 400, ""
        on_quit()
        return 200, ""

    async def reload(method: str, _query: str) -> tuple[int, str]:
        if method != "POST" or on_reload is None:
            return 400, "POST only\n"
        applied, message = await on_reload()
        return (200 if applied else 500), message + "\n"

    routes: dict[str, Handler] = {"/quitquitquit": quitquitquit}
    if on_reload is not None:
        routes["/reload"] = reload
    return routes


def metrics_route(metrics: Metrics) -> Handler:
    async def render(_method: str, _query: str) -> tuple[int, str]:
        return 200, metrics.render()

    return render
