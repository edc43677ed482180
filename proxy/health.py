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
  /debug/pprof/  see proxy/profiling.py

A small HTTP/1.1 handler is all these need; it answers one request per
connection and never blocks the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.log import Logger
from proxy.metrics import Metrics

#: handler(method, query string) -> (status, body)
Handler = Callable[[str, str], Awaitable[tuple[int, str]]]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    501: "Not Implemented",
    503: "Service Unavailable",
}
_READ_TIMEOUT = 5.0


@dataclass
class ProbeState:
    """What the probes report; the supervisor and the server update it."""

    started: bool = False
    stopping: bool = False
    max_connections: int = 0


class HTTPServer:
    """Routes ``path`` to ``handler(method, query) -> (status, body)``."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self._routes = routes
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT)
            while (await asyncio.wait_for(reader.readline(), _READ_TIMEOUT)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass
            parts = line.decode("latin-1").split()
            if len(parts) < 2:
                return
            method, target = parts[0], parts[1]
            path, _, query = target.partition("?")
            route = self._routes.get(path)
            status, body = await route(method, query) if route else (404, "404 page not found\n")
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (ConnectionError, TimeoutError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


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


def admin_routes(on_quit: Callable[[], None]) -> dict[str, Handler]:
    async def quitquitquit(method: str, _query: str) -> tuple[int, str]:
        if method not in ("GET", "POST"):
            return 400, ""
        on_quit()
        return 200, ""

    return {"/quitquitquit": quitquitquit}


def metrics_route(metrics: Metrics) -> Handler:
    async def render(_method: str, _query: str) -> tuple[int, str]:
        return 200, metrics.render()

    return render
