"""Listeners (TCP with port increment, unix sockets) and per-connection handling.

Accepting is done with raw non-blocking sockets and a loop reader, so an
accepted connection becomes a bare fd that goes straight to the splice core;
no asyncio transport or protocol object is built per connection.

One bad connection never takes the proxy down: accept errors such as EMFILE
are logged and accepting pauses briefly (the Go proxy exits on them), and
every per-connection failure stays in that connection's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import socket
import time
from dataclasses import dataclass, field

from proxy import pgstartup, tlsconn, unixlisten
from proxy.config import Config, InstanceConfig, TCPMount, UnixMount, plan_mounts
from proxy.dataplane import plane
from proxy.dialer import Dialer, set_tcp_options
from proxy.errors import StartupError
from proxy.log import Logger
from proxy.metrics import Metrics

DIAL_TIMEOUT = 30.0
# How long an AUTO_IAM client may take to send its startup message.
STARTUP_TIMEOUT = 30.0
#: How long to stop accepting after a resource error (EMFILE, ENFILE, ENOBUFS).
ACCEPT_BACKOFF = 0.1
#: After the client half-closes, how long to wait for the instance to finish.
HALF_CLOSE_LINGER = 30.0

_DONE_LINES = {
    plane.CLIENT_CLOSED: (False, "client closed the connection"),
    plane.INSTANCE_CLOSED: (False, "instance closed the connection"),
    plane.ERROR_READ_CLIENT: (True, "connection aborted - error reading from client: "),
    plane.ERROR_WRITE_INSTANCE: (True, "connection aborted - error writing to instance: "),
    plane.ERROR_READ_INSTANCE: (True, "connection aborted - error reading from instance: "),
    plane.ERROR_WRITE_CLIENT: (True, "connection aborted - error writing to client: "),
}


class StartupTimeout(Exception):
    """An AUTO_IAM client sent no startup message in time (no dial was made)."""


def _format_addr(family: int, addr: object) -> str:
    if family == socket.AF_UNIX:
        return str(addr) if addr else "@"
    host, port = addr[0], addr[1]  # type: ignore[index]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


@dataclass
class Listener:
    inst: InstanceConfig
    sock: socket.socket
    display: str  # what "Listening on" prints
    mount: TCPMount | UnixMount
    unix_path: str | None = None
    paused: bool = False
    watched: bool = False  # its socket is registered with the loop
    handles: set[asyncio.Task[None]] = field(default_factory=set)


class ProxyServer:
    def __init__(
        self, cfg: Config, dialer: Dialer, log: Logger, metrics: Metrics | None = None
    ) -> None:
        self._metrics = metrics
        if metrics is not None:
            metrics.live_bytes = self._live_bytes
        self._cfg = cfg
        self._dialer = dialer
        self._log = log
        self._listeners: list[Listener] = []
        self._splices: dict[plane.Splice, str] = {}  # -> instance short name
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = False  # set by start_accepting; later listeners are watched at once
        self._closed = False  # by close_listeners: no listener opens after it
        self.connection_count = 0

    # ---- listeners -------------------------------------------------------

    def open_listeners(self) -> None:
        """Bind every listener, or raise StartupError naming the instance."""
        try:
            for inst, mount in plan_mounts(self._cfg):
                listener = self._open(inst, mount)
                self._listeners.append(listener)
                self._log.info("[%s] Listening on %s", inst.uri.short, listener.display)
        except BaseException:
            self.close_listeners()
            raise

    def reconfigure(self, cfg: Config) -> tuple[int, int, int]:
        """Switch to ``cfg``'s instance list (see proxy/reload.py); (added, removed, kept).

        New listeners open before the old ones close, except those that take
        the port or path of a listener that goes (auto ports shift when the
        list changes): those open after it closed. If a new one cannot open,
        the ones opened are closed and any old one closed is reopened: a
        StartupError then says why, and the proxy serves what it served
        before.
        """
        unmatched = list(self._listeners)
        kept: list[tuple[Listener, InstanceConfig]] = []
        wanted: list[tuple[InstanceConfig, TCPMount | UnixMount]] = []
        for inst, mount in plan_mounts(cfg):
            match = next(
                (
                    old_listener
                    for old_listener in unmatched
                    if old_listener.inst.uri == inst.uri and old_listener.mount == mount
                ),
                None,
            )
            if match is None:
                wanted.append((inst, mount))
            else:
                unmatched.remove(match)
                kept.append((match, inst))
        # New addresses that no old listener holds open first: if one fails,
        # the old listeners have not been touched.
        first = [
            (inst, mount)
            for inst, mount in wanted
            if not any(_clash(mount, going.mount) for going in unmatched)
        ]
        then = [pair for pair in wanted if pair not in first]
        opened: list[Listener] = []
        try:
            for inst, mount in first:
                opened.append(self._open(inst, mount))
            for listener in unmatched:
                self._close(listener)
            for inst, mount in then:
                opened.append(self._open(inst, mount))
        except StartupError as failure:
            for listener in opened:
                self._close(listener)
            lost = []
            for listener in unmatched:
                if listener.sock.fileno() != -1:
                    continue  # never closed
                try:  # its address was just released
                    reopened = self._open(listener.inst, listener.mount)
                except StartupError as exc:
                    lost.append(str(exc).removeprefix("unable to start: "))
                    self._listeners.remove(listener)
                    continue
                self._listeners[self._listeners.index(listener)] = reopened
            self._watch_all()
            if lost:
                raise StartupError(
                    f"{failure}; and lost on the way back: {', '.join(lost)}"
                ) from None
            raise
        self._cfg = cfg
        self._dialer.reconfigure(cfg)
        for listener in unmatched:
            self._log.info(
                "[%s] Stopped listening on %s; its open connections go on",
                listener.inst.uri.short,
                listener.display,
            )
        for listener, inst in kept:
            if listener.inst != inst:
                self._log.info("[%s] New options: %s", inst.uri.short, query_of(inst) or "none")
            listener.inst = inst
        served_before = {going.display: going.inst.uri.short for going in unmatched}
        for listener in opened:
            short = listener.inst.uri.short
            before = served_before.get(listener.display, short)
            if before != short:  # an automatic port that moved to another instance
                self._log.info(
                    "[%s] Listening on %s (which served [%s] until this reload)",
                    short, listener.display, before,
                )  # fmt: skip
            else:
                self._log.info("[%s] Listening on %s", short, listener.display)
        self._listeners = [listener for listener, _ in kept] + opened
        self._watch_all()
        return len(opened), len(unmatched), len(kept)

    def _open(self, inst: InstanceConfig, mount: TCPMount | UnixMount) -> Listener:
        short = inst.uri.short
        if isinstance(mount, TCPMount):
            return self._open_tcp(inst, mount)
        try:
            unixlisten.prepare_directory(mount.directory)
            sock = unixlisten.bind(mount.path)
        except unixlisten.UnsafeDirectory as exc:
            raise StartupError(
                f"unable to start: [{short}] Unable to mount socket: unsafe socket directory: {exc}"
            ) from None
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            what = (
                f"listen unix {mount.path}: bind: {reason}"
                if exc.filename is None
                else f"stat {exc.filename}: {reason}"
            )
            raise StartupError(
                f"unable to start: [{short}] Unable to mount socket: {what}"
            ) from None
        sock.setblocking(False)
        return Listener(inst, sock, mount.path, mount, unix_path=mount.path)

    def _open_tcp(self, inst: InstanceConfig, mount: TCPMount) -> Listener:
        host = mount.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dual_stack = host == "0.0.0.0" and socket.has_ipv6
        if dual_stack:
            # Go listens on a dual-stack "::" socket for 0.0.0.0 on Linux.
            family, host = socket.AF_INET6, "::"
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if dual_stack:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, mount.port))
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            reason = (exc.strerror or str(exc)).lower()
            where = (
                f"[{mount.address}]:{mount.port}"
                if ":" in mount.address
                else f"{mount.address}:{mount.port}"
            )
            raise StartupError(
                f"unable to start: [{inst.uri.short}] Unable to mount socket: "
                f"listen tcp {where}: bind: {reason}"
            ) from None
        sock.setblocking(False)
        bound = sock.getsockname()
        return Listener(inst, sock, _format_addr(family, bound), mount)

    async def open_by_name(self, inst: InstanceConfig, mount: UnixMount) -> None:
        """For ``--fuse``: ask the Admin API for the instance (so an unknown one
        fails here), then listen for it at ``mount`` (StartupError if it cannot)."""
        await self._dialer.connection_info(inst)
        if self._closed:
            raise StartupError("the proxy is stopping")
        listener = self._open(inst, mount)
        self._listeners.append(listener)
        self._log.info("[%s] Listening on %s", inst.uri.short, listener.display)
        self._watch_all()

    def bound(self) -> list[tuple[InstanceConfig, str, int, str | None]]:
        """Each listener as (instance, host, port, unix socket path or None), in
        the order of the configuration; TCP ports as bound (port 0 resolved)."""
        out: list[tuple[InstanceConfig, str, int, str | None]] = []
        for listener in self._listeners:
            if listener.unix_path is not None:
                directory, name = os.path.split(listener.unix_path)
                out.append(
                    (listener.inst, directory, int(name.rsplit(".", 1)[-1]), listener.unix_path)
                )
            else:
                host, port = listener.sock.getsockname()[:2]
                out.append((listener.inst, host, port, None))
        return out

    async def cancel_dials(self) -> None:
        """Stop every connection still being set up (its client is closed)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def abort_connections(self) -> None:
        """End every open connection now (their on-done reports follow)."""
        for splice in list(self._splices):
            splice.abort()

    def start_accepting(self) -> None:
        self._accepting = True
        self._watch_all()

    def _watch_all(self) -> None:
        if not self._accepting:
            return
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            if not listener.watched and not listener.paused:
                loop.add_reader(listener.sock.fileno(), self._on_acceptable, listener)
                listener.watched = True

    def _close(self, listener: Listener) -> None:
        if listener.watched:
            with contextlib.suppress(RuntimeError):  # no running loop (closed already)
                asyncio.get_running_loop().remove_reader(listener.sock.fileno())
            listener.watched = False
        listener.sock.close()
        if listener.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(listener.unix_path)

    def close_listeners(self) -> None:
        self._accepting = False
        self._closed = True
        for listener in self._listeners:
            self._close(listener)
        self._listeners.clear()

    # ---- accepting -------------------------------------------------------

    def _on_acceptable(self, listener: Listener) -> None:
        # Accept in a burst: one wakeup may stand for many waiting clients.
        for _ in range(64):
            try:
                client, addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log.error("[%s] Error accepting connection: %s", listener.inst.uri.short, exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(listener)
                return
            self._accepted(listener, client, addr)

    def _pause(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(listener.sock.fileno())
        listener.watched = False
        listener.paused = True

        def resume() -> None:
            if listener.paused and listener in self._listeners and self._accepting:
                listener.paused = False
                loop.add_reader(listener.sock.fileno(), self._on_acceptable, listener)
                listener.watched = True

        loop.call_later(ACCEPT_BACKOFF, resume)

    def _accepted(self, listener: Listener, client: socket.socket, addr: object) -> None:
        short = listener.inst.uri.short
        self._log.info(
            "[%s] accepted connection from %s\n", short, _format_addr(client.family, addr)
        )
        self._count(+1)
        limit = self._cfg.max_connections
        if limit and self.connection_count > limit:
            self._log.info("max connections (%d) exceeded, refusing new connection", limit)
            client.close()
            self._count(-1)
            return
        client.setblocking(False)
        if client.family != socket.AF_UNIX:
            set_tcp_options(client)
        task = asyncio.get_running_loop().create_task(self._connect(listener.inst, client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _startup_message(self, inst: InstanceConfig, client: socket.socket) -> bytes | None:
        """Under AUTO_IAM, the client's startup message (SSLRequest answered with N).

        Read before the dial: dialling meanwhile would save a round trip, but
        would cost an authenticated instance connection (and a token) for
        every client that only probes the port or never speaks.
        """
        if not self._cfg.auto_iam_for(inst):
            return None
        try:
            startup = await asyncio.wait_for(pgstartup.read_startup(client), STARTUP_TIMEOUT)
        except (TimeoutError, asyncio.TimeoutError):  # two classes before 3.11
            raise StartupTimeout(
                f"no startup message from the client within {STARTUP_TIMEOUT:g}s"
            ) from None
        hint = pgstartup.iam_user_hint(pgstartup.startup_user(startup))
        if hint:
            self._log.error("[%s] %s", inst.uri.short, hint)
        return startup

    async def _dial(self, inst: InstanceConfig, startup: bytes | None) -> plane.TLSConnection:
        conn = await self._dialer.dial(inst)
        if startup is not None:
            try:
                await tlsconn.send_all(conn, startup, timeout=DIAL_TIMEOUT)
            except BaseException:
                conn.close()
                raise
        return conn

    async def _connect(self, inst: InstanceConfig, client: socket.socket) -> None:
        short = inst.uri.short
        metrics = self._metrics
        try:
            startup = await self._startup_message(inst, client)
            began = time.monotonic()
            conn = await asyncio.wait_for(self._dial(inst, startup), DIAL_TIMEOUT)
        except BaseException as exc:
            client.close()
            self._count(-1)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, pgstartup.ClientLeft):
                self._log.info("[%s] client closed the connection", short)
                return
            if isinstance(exc, StartupTimeout):
                self._log.error("[%s] closing the client connection: %s", short, exc)
                return
            if metrics is not None:
                metrics.dial_failures[inst.uri.name] += 1
            self._log.error(
                "[%s] failed to connect to instance: %s\n", short, _dial_failure(exc, short)
            )
            return

        if metrics is not None:
            metrics.dial_succeeded(inst.uri.name, (time.monotonic() - began) * 1000)
            metrics.connection_opened(short)

        def done(kind: int, message: str) -> None:
            # Counted out first: nothing below may keep the count up.
            self._count(-1)
            self._splices.pop(splice, None)
            if metrics is not None:
                metrics.connection_closed(
                    short, splice.bytes_client_to_server, splice.bytes_server_to_client
                )
            is_error, line = _DONE_LINES.get(kind, (False, ""))
            if line:
                if is_error:
                    self._log.error("[%s] %s%s", short, line, message)
                else:
                    self._log.info("[%s] %s", short, line)

        try:
            splice = plane.Splice(client.detach(), conn, done, HALF_CLOSE_LINGER)
            splice.start(asyncio.get_running_loop())
        except Exception as exc:
            # Splice closes both fds when it cannot take or start them.
            self._count(-1)
            conn.close()
            if metrics is not None:
                metrics.connection_closed(short, 0, 0)
            self._log.error("[%s] failed to start the connection: %s", short, exc)
            return
        self._splices[splice] = short

    def _live_bytes(self) -> dict[str, tuple[int, int]]:
        """Bytes moved so far by open connections, per instance (read at scrape time)."""
        totals: dict[str, tuple[int, int]] = {}
        for splice, short in self._splices.items():
            sent, received = totals.get(short, (0, 0))
            totals[short] = (
                sent + splice.bytes_client_to_server,
                received + splice.bytes_server_to_client,
            )
        return totals

    def _count(self, delta: int) -> None:
        # Global across instances, counted from accept to close, like the Go proxy.
        self.connection_count += delta

    async def connection_test(self) -> list[str]:
        """Dial every instance once (``--run-connection-test``); the errors, if any."""

        async def check(inst: InstanceConfig) -> str:
            try:
                conn = await asyncio.wait_for(self._dialer.dial(inst), DIAL_TIMEOUT)
            except Exception as exc:
                return str(_dial_failure(exc, inst.uri.short))
            conn.close()
            return ""

        if self._closed:  # shutting down: no listener is left to vouch for
            return ["alloydbconn: dialer is closed"]
        # Each listener's instance and options (after a reload, or opened by a
        # --fuse lookup); one dial per distinct pair, as Go dials each mount.
        instances = list(dict.fromkeys(listener.inst for listener in self._listeners))
        results = await asyncio.gather(*(check(inst) for inst in instances))
        return [r for r in results if r]


def _clash(new: TCPMount | UnixMount, old: TCPMount | UnixMount) -> bool:
    """Whether ``new`` may need the address that ``old`` holds (any address on that port)."""
    if isinstance(new, TCPMount) and isinstance(old, TCPMount):
        return new.port != 0 and new.port == old.port
    if isinstance(new, UnixMount) and isinstance(old, UnixMount):
        return new.path == old.path
    return False


def query_of(inst: InstanceConfig) -> str:
    """The query parameters the instance sets, as a URI query (``port=6000&psc=true``)."""
    parts = []
    for f in dataclasses.fields(inst):
        value = getattr(inst, f.name)
        if f.name != "uri" and value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            parts.append(f"{f.name.replace('_', '-')}={text}")
    return "&".join(parts)


def _dial_failure(exc: BaseException, short: str) -> BaseException | str:
    """What to report for a failed dial: never an empty text (``str(TimeoutError())``
    is empty, which once let a timed-out connection test pass)."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # two classes before 3.11
        return (
            "dial error: context was canceled or expired before refresh completed "
            f'(instance URI = "{short}")'
        )
    return exc if str(exc) else type(exc).__name__
