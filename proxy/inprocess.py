"""``proxy.Proxy``: the proxy inside a Python program, for any driver or ORM.

The same parts as the command (credentials, Admin API client, dialer,
listeners, the native data plane), started without signals, exit codes or
printed logs:

* options are the CLI's long flag names with ``-`` → ``_``, checked by the
  CLI's own ``build_config`` (so the same defaults and messages; a bad value
  raises ``proxy.ConfigError``, a ``ValueError``; an unknown keyword a
  ``TypeError``). Nothing comes from ``ALLOYDB_PROXY_*`` or a config file.
* listeners are, unless ``port``, ``address`` or ``unix_socket`` say
  otherwise, unix sockets in a fresh directory of mode 0700, removed at close:
  no other local user can reach them.
* every Proxy of the process runs on one event loop on a background thread
  (the native data plane reports to one loop); ``with Proxy(...)`` waits for
  it, ``async with Proxy(...)`` awaits it from the caller's loop (asyncio or
  uvloop). The thread ends with the last Proxy.
* options of the command that a library cannot honour (its HTTP servers, log
  format, signals, FUSE, telemetry) are refused, not ignored.
* logs go to the ``proxy`` logger of the ``logging`` module; nothing is
  printed unless the program configures logging.

Closing stops accepting, waits up to ``max_sigterm_delay`` for open
connections, aborts the rest, and removes what start-up created.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

from proxy import workers
from proxy.config import Config
from proxy.errors import BadCommandError, DialError
from proxy.eventloop import new_loop

#: Not options at all.
_NOT_OPTIONS = {"version", "config_file", "help"}
#: The command's options that a Proxy does not honour (its HTTP servers, its own
#: log format, signals and exit codes, FUSE, telemetry): refused, not ignored.
COMMAND_ONLY = frozenset(
    {
        "quitquitquit", "health_check", "http_address", "http_port", "admin_port",
        "debug", "prometheus", "prometheus_namespace", "with_backend_check",
        "quiet", "debug_logs", "structured_logs", "min_sigterm_delay", "exit_zero_sigterm",
        "fuse", "fuse_tmp_dir", "telemetry_project", "telemetry_prefix",
        "telemetry_sample_rate", "disable_traces", "disable_metrics",
        "disable_built_in_telemetry",
    }
)  # fmt: skip
#: SQLAlchemy driver names ``sqlalchemy_url`` knows.
DRIVERS = ("psycopg", "psycopg2", "asyncpg", "pg8000")


class ConnectionTestFailed(DialError):
    """A connection test failed; the text is the command's (every failure, joined)."""

    def __init__(self, errors: str) -> None:
        super().__init__("connection test failed", "", errors)

    def __str__(self) -> str:
        return str(self.cause)


@dataclass(frozen=True)
class ListenerInfo:
    """Where one instance is served: a unix socket (``socket_path`` set, ``host``
    its directory) or TCP (``host`` an IP address)."""

    instance: str  # the instance URI, as given
    host: str
    port: int
    socket_path: str | None


def build_config(instance_uris: tuple[str, ...], options: dict[str, Any]) -> Config:
    """The Config the CLI would build from these flags (``ConfigError`` if it would refuse).

    Defaults come from the CLI's own options. A value is checked as the CLI
    checks a flag's text: strings are parsed as the CLI parses them
    (``max_sigterm_delay="30s"``, ``psc="false"``), numbers as their decimal
    text, except that a duration may be given in seconds (``max_sigterm_delay=30``).
    """
    import click

    from proxy.cli import GoDuration, root
    from proxy.cli import build_config as cli_build_config
    from proxy.settings import parse_go_bool

    ctx = _context()
    params = {
        param.name: param
        for param in root.params
        if isinstance(param, click.Option) and param.name and param.name not in _NOT_OPTIONS
    }
    opts: dict[str, Any] = {}
    for name, option in params.items():
        default = option.get_default(ctx, call=True)
        opts[name] = option.type_cast_value(ctx, default) if isinstance(default, str) else default
    for name, value in options.items():
        given = params.get(name)
        if given is None:
            raise TypeError(f"Proxy() got an unexpected keyword argument {name!r}")
        if name in COMMAND_ONLY:
            raise BadCommandError(
                f"{name} is an option of the command only; proxy.Proxy does not support it"
            )
        opts[name] = _converted(name, value, given, ctx, GoDuration, parse_go_bool)
    return cli_build_config(tuple(instance_uris), opts, frozenset(options))


def _context() -> Any:
    """A click context of the command, for converting values. Not make_context():
    parsing would build and cache the command's help option without its -h."""
    import click

    from proxy.cli import root

    return click.Context(
        root, info_name="alloydb-auth-proxy", resilient_parsing=True, **root.context_settings
    )


def _converted(name: str, value: Any, param: Any, ctx: Any, duration: type, parse_bool: Any) -> Any:
    import click

    if value is None:
        raise BadCommandError(f"{name} must not be None (leave it out for the default)")
    if param.is_flag:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return parse_bool(value)
            except ValueError:
                raise BadCommandError(f'invalid boolean "{value}" for {name}') from None
        raise BadCommandError(f"{name} must be a bool, not {type(value).__name__}")
    if isinstance(param.type, duration) and isinstance(value, (int, float)):
        if isinstance(value, bool) or value < 0 or value != value:
            raise BadCommandError(f"{name} must be a duration in seconds >= 0, not {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadCommandError(f"{name} must be a string or a number, not {type(value).__name__}")
    try:
        return param.type.convert(str(value), param, ctx)
    except click.UsageError as exc:  # BadParameter, and the CLI's own duration errors
        raise BadCommandError(f"{name}: {exc.format_message()}") from None


class _SharedLoop:
    """The one event loop that runs every Proxy of this process, on a daemon thread.

    The native data plane hands each finished connection to the loop that
    watches it; two loops would take each other's. So all proxies, started
    with ``with`` or ``async with``, run here, and ``async with`` awaits them
    from the caller's loop. The thread ends with the last open Proxy.
    """

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _users = 0

    @classmethod
    def acquire(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = new_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="alloydb-proxy", daemon=True
                )
                thread.start()
                cls._loop, cls._thread = loop, thread
            cls._users += 1
            return cls._loop

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users > 0 or cls._loop is None or cls._thread is None:
                return
            loop, thread = cls._loop, cls._thread
            cls._loop = cls._thread = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    @classmethod
    def forget(cls) -> None:
        """In a forked child: the parent's loop thread does not exist here."""
        cls._lock = threading.Lock()
        cls._loop = cls._thread = None
        cls._users = 0


os.register_at_fork(after_in_child=_SharedLoop.forget)


class Proxy:
    """An AlloyDB proxy for this process; see the module docstring."""

    def __init__(self, *instance_uris: str, **options: Any) -> None:
        self._cfg = build_config(instance_uris, options)  # refuses bad options at once
        self._private_dir = not ({"port", "address", "unix_socket"} & set(options))
        self._uris = instance_uris
        self._state = "new"  # -> "running" -> "closed"
        self._mode = ""  # "sync" or "async", by how it was started
        self._pid = os.getpid()
        self._tmpdir: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the shared loop, while running
        self._parts: tuple[Any, Any, Any] | None = None  # server, dialer, Admin API client
        self._metrics: Any = None
        self._listeners: list[ListenerInfo] = []

    @classmethod
    def from_environment(cls, *instance_uris: str, config_file: str = "", **options: Any) -> Proxy:
        """As the command reads them: keyword options first, then ``ALLOYDB_PROXY_*``
        variables, then ``config_file`` (TOML, YAML or JSON); instance URIs from
        the arguments, else from ``ALLOYDB_PROXY_INSTANCE_URI[_N]`` or the file."""
        from proxy.cli import _unset_option_converters
        from proxy.settings import load_config_file, overlay

        ctx = _context()
        file_values = load_config_file(config_file) if config_file else {}
        found = overlay(
            _unset_option_converters(ctx, set(options) | COMMAND_ONLY),
            environ=os.environ,
            file_values=file_values,
            file_path=config_file,
        )
        merged = {name.replace("-", "_"): value for name, value in found.values.items()}
        merged.update(options)
        return cls(*(instance_uris or tuple(found.instances)), **merged)

    # ---- synchronous use ----------------------------------------------------

    def __enter__(self) -> Proxy:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start; start-up errors are raised here, with nothing left behind."""
        loop = self._begin("sync")
        future = asyncio.run_coroutine_threadsafe(self._astart(), loop)
        try:
            future.result()
        except BaseException:
            # Also when this wait itself was interrupted (Ctrl-C): the start-up
            # is cancelled and undone before the error goes on.
            future.cancel()
            with contextlib.suppress(BaseException):
                asyncio.run_coroutine_threadsafe(self._aclose(), loop).result(30)
            self._end()
            raise

    def close(self) -> None:
        """Stop and release everything (connections, sockets, the private directory)."""
        if self._state != "running":
            return
        self._check_process()
        if self._mode == "async":
            raise RuntimeError("this Proxy was started with 'async with': use 'await p.aclose()'")
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), self._loop).result()  # type: ignore[arg-type]
        finally:
            self._end()

    # ---- asynchronous use ---------------------------------------------------

    async def __aenter__(self) -> Proxy:
        loop = self._begin("async")
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._astart(), loop))
        except BaseException:
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._aclose(), loop))
            self._end()
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._state != "running":
            return
        self._check_process()
        try:
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self._aclose(), self._loop)  # type: ignore[arg-type]
            )
        finally:
            self._end()

    def _begin(self, mode: str) -> asyncio.AbstractEventLoop:
        self._check_process()
        if self._state != "new":
            raise RuntimeError("this Proxy was started already; create a new one")
        self._state, self._mode = "running", mode
        self._loop = _SharedLoop.acquire()
        return self._loop

    def _end(self) -> None:
        if self._loop is not None:
            self._loop = None
            _SharedLoop.release()
        self._state = "closed"

    # ---- what the program uses ---------------------------------------------

    @property
    def listeners(self) -> list[ListenerInfo]:
        return list(self._listeners)

    def dsn(self, instance: str | None = None, **params: Any) -> str:
        """A ``postgresql://`` URI for the instance's listener, for libpq, psql,
        psycopg, psycopg2 and asyncpg alike; ``user``, ``password`` and
        ``dbname`` are percent-encoded (IAM users contain ``@``), other params
        become query parameters."""
        return self._url("postgresql", instance, params)

    def sqlalchemy_url(self, instance: str | None = None, *, driver: str, **params: Any) -> str:
        """A SQLAlchemy URL for ``driver`` (psycopg, psycopg2, asyncpg, pg8000)."""
        if driver not in DRIVERS:
            raise ValueError(f"unknown driver {driver!r}: expected one of {', '.join(DRIVERS)}")
        return self._url(f"postgresql+{driver}", instance, params)

    def connection_test(self) -> Any:
        """Dial every instance once (Admin API, TLS, metadata exchange); raise
        ``proxy.DialError`` with the command's message if any fails. On a proxy
        started with ``async with``, returns the coroutine to await."""
        self._check_process()
        if self._loop is None:
            raise RuntimeError("the proxy is not running")
        future = asyncio.run_coroutine_threadsafe(self._aconnection_test(), self._loop)
        if self._mode == "async":
            return asyncio.wrap_future(future)
        future.result()
        return None

    async def _aconnection_test(self) -> None:
        if self._parts is None:
            raise RuntimeError("the proxy is not running")
        errors = await self._parts[0].connection_test()
        if errors:
            raise ConnectionTestFailed(", ".join(errors))

    def stats(self) -> dict[str, dict[str, int]]:
        """Per instance (short name): open connections, bytes each way so far,
        certificate refreshes that succeeded and failed."""
        if self._loop is None:
            return {}

        async def collect() -> dict[str, dict[str, int]]:
            return self._stats()  # on the loop's thread, where the counts change

        return asyncio.run_coroutine_threadsafe(collect(), self._loop).result()

    def _stats(self) -> dict[str, dict[str, int]]:
        metrics = self._metrics
        if metrics is None:
            return {}
        live = metrics.live_bytes()
        done = metrics.bytes_done()
        out: dict[str, dict[str, int]] = {}
        for inst in self._cfg.instances:
            short = inst.uri.short
            done_sent, done_received = done.get(short, (0, 0))
            live_sent, live_received = live.get(short, (0, 0))
            out[short] = {
                "open_connections": metrics.open_connections.get(short, 0),
                "bytes_sent": done_sent + live_sent,
                "bytes_received": done_received + live_received,
                "refreshes": metrics.refresh_success.get(short, 0),
                "refresh_failures": sum(
                    n for (name, _), n in metrics.refresh_failure.items() if name == short
                ),
            }
        return out

    # ---- inside -------------------------------------------------------------

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(
                "this proxy.Proxy was created in another process (before a fork): "
                "create a new one in this process"
            )

    async def _astart(self) -> None:
        from proxy.keys import generate_in_background
        from proxy.log import get_logger
        from proxy.metrics import Metrics
        from proxy.supervisor import open_proxy

        cfg = self._cfg
        if self._private_dir:
            self._tmpdir = tempfile.mkdtemp(prefix="alloydb-proxy-")  # mode 0700
            cfg = replace(cfg, unix_socket=self._tmpdir)
        try:
            self._metrics = Metrics()
            self._parts = await open_proxy(
                cfg, get_logger(), self._metrics, generate_in_background()
            )
            server = self._parts[0]
            self._listeners = [
                ListenerInfo(uri, host, port, path)
                for uri, (_, host, port, path) in zip(self._uris, server.bound(), strict=True)
            ]
            server.start_accepting()
            if cfg.run_connection_test:
                await self._aconnection_test()
        except BaseException:
            await self._aclose()
            raise

    async def _aclose(self) -> None:
        parts, self._parts = self._parts, None
        if parts is not None:
            server, dialer, client = parts
            server.close_listeners()
            await server.cancel_dials()  # a dial in flight would start a splice after the abort
            dialer.close()
            deadline = time.monotonic() + self._cfg.max_sigterm_delay
            while server.connection_count and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            server.abort_connections()
            deadline = time.monotonic() + 2.0
            while server.connection_count and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the aborted splices report back
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):  # two before 3.11
                await asyncio.wait_for(workers.SHUTDOWN.run(client.close), 1.0)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self._listeners = []

    def _url(self, scheme: str, instance: str | None, params: dict[str, Any]) -> str:
        listener = self._listener(instance)
        auth = ""
        user = params.pop("user", None)
        password = params.pop("password", None)
        dbname = params.pop("dbname", params.pop("database", None))
        if user is not None:
            auth = quote(str(user), safe="")
            if password is not None:
                auth += ":" + quote(str(password), safe="")
            auth += "@"
        path = "/" + quote(str(dbname), safe="") if dbname is not None else "/"
        query = {k: str(v) for k, v in params.items()}
        if listener.socket_path is None and listener.host in ("0.0.0.0", "::"):
            # Listening everywhere (0.0.0.0 is a dual-stack "::" socket, as in the Go
            # proxy): this program reaches it on loopback.
            listener = replace(listener, host="127.0.0.1")
        if listener.socket_path is not None:
            if scheme == "postgresql+pg8000":
                query["unix_sock"] = listener.socket_path
            else:
                query["host"] = listener.host
                query["port"] = str(listener.port)
            where = ""
        else:
            host = f"[{listener.host}]" if ":" in listener.host else listener.host
            where = f"{host}:{listener.port}"
        suffix = "?" + urlencode(query, safe="/") if query else ""
        return f"{scheme}://{auth}{where}{path}{suffix}"

    def _listener(self, instance: str | None) -> ListenerInfo:
        if not self._listeners:
            raise RuntimeError("the proxy is not running")
        if instance is None:
            if len(self._listeners) > 1:
                raise ValueError("this Proxy serves several instances: name one")
            return self._listeners[0]
        for listener in self._listeners:
            if instance in (listener.instance, listener.instance.split("?", 1)[0]):
                return listener
        raise ValueError(f"this Proxy does not serve {instance!r}")


__all__ = ["BadCommandError", "ConnectionTestFailed", "ListenerInfo", "Proxy"]
