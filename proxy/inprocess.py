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
* ``with Proxy(...)`` runs the proxy on an event loop of its own, on a
  background thread; ``async with Proxy(...)`` runs it on the caller's loop.
* logs go to the ``proxy`` logger of the ``logging`` module.

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

from proxy import staticinfo, workers
from proxy.config import Config
from proxy.errors import BadCommandError, DialError, StartupError

#: Options that only make sense for the command.
_NOT_OPTIONS = {"version", "config_file", "help"}
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

    Defaults come from the CLI's own options, converted as the CLI converts
    them; a string value is converted the same way (``max_sigterm_delay="30s"``),
    other values are taken as given (``max_sigterm_delay=30.0``).
    """
    import click

    from proxy.cli import build_config as cli_build_config
    from proxy.cli import root

    ctx = root.make_context("alloydb-auth-proxy", [], resilient_parsing=True)
    params = {
        param.name: param
        for param in root.params
        if isinstance(param, click.Option) and param.name and param.name not in _NOT_OPTIONS
    }
    opts = {name: ctx.params.get(name) for name in params}
    for name, value in options.items():
        param = params.get(name)
        if param is None:
            raise TypeError(f"Proxy() got an unexpected keyword argument {name!r}")
        if param.is_flag:
            value = bool(value)
        elif isinstance(value, str):
            try:
                value = param.type.convert(value, param, ctx)
            except click.BadParameter as exc:
                raise BadCommandError(f"{name}: {exc.format_message()}") from None
        opts[name] = value
    return cli_build_config(tuple(instance_uris), opts, frozenset(options))


class Proxy:
    """An AlloyDB proxy for this process; see the module docstring."""

    def __init__(self, *instance_uris: str, **options: Any) -> None:
        self._cfg = build_config(instance_uris, options)  # refuses bad options at once
        self._private_dir = not ({"port", "address", "unix_socket"} & set(options))
        self._uris = instance_uris
        self._started = False
        self._pid = os.getpid()
        self._tmpdir: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None  # only when we own the loop
        self._parts: tuple[Any, Any, Any] | None = None  # server, dialer, Admin API client
        self._metrics: Any = None
        self._listeners: list[ListenerInfo] = []

    @classmethod
    def from_environment(cls, *instance_uris: str, config_file: str = "", **options: Any) -> Proxy:
        """As the command reads them: keyword options first, then ``ALLOYDB_PROXY_*``
        variables, then ``config_file`` (TOML, YAML or JSON); instance URIs from
        the arguments, else from ``ALLOYDB_PROXY_INSTANCE_URI[_N]`` or the file."""
        from proxy.cli import _unset_option_converters, root
        from proxy.settings import load_config_file, overlay

        ctx = root.make_context("alloydb-auth-proxy", [], resilient_parsing=True)
        file_values = load_config_file(config_file) if config_file else {}
        found = overlay(
            _unset_option_converters(ctx, set(options)),
            environ=os.environ,
            file_values=file_values,
            file_path=config_file,
        )
        merged = {name.replace("-", "_"): value for name, value in found.values.items()}
        merged.update(options)
        return cls(*(instance_uris or tuple(found.instances)), **merged)

    # ---- synchronous use: our own loop on a thread -------------------------

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
        """Start on a background thread; start-up errors are raised here."""
        self._check_usable(starting=True)
        loop = _new_loop()
        thread = threading.Thread(target=loop.run_forever, name="alloydb-proxy", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._astart(), loop).result()
        except BaseException:
            self._stop_thread()
            raise

    def close(self) -> None:
        """Stop and release everything (threads, sockets, the private directory)."""
        if self._thread is None:
            if self._loop is not None:
                raise RuntimeError("this Proxy runs on an event loop: use 'await p.aclose()'")
            return
        self._check_usable()
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), self._loop).result()  # type: ignore[arg-type]
        finally:
            self._stop_thread()

    def _stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
        self._loop = self._thread = None

    # ---- asynchronous use: the caller's loop -------------------------------

    async def __aenter__(self) -> Proxy:
        self._check_usable(starting=True)
        self._loop = asyncio.get_running_loop()
        await self._astart()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this Proxy runs on its own thread: use 'p.close()'")
        self._check_usable()
        await self._aclose()
        self._loop = None

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
        self._check_usable()
        if self._thread is None:
            return self._aconnection_test()
        future = asyncio.run_coroutine_threadsafe(self._aconnection_test(), self._loop)  # type: ignore[arg-type]
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
        metrics = self._metrics
        if metrics is None:
            return {}
        live = metrics.live_bytes()
        out: dict[str, dict[str, int]] = {}
        for inst in self._cfg.instances:
            short = inst.uri.short
            done_sent, done_received = metrics._bytes_done.get(short, (0, 0))
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

    def _check_usable(self, starting: bool = False) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(
                "this proxy.Proxy was created in another process (before a fork): "
                "create a new one in this process"
            )
        if starting and self._started:
            raise RuntimeError("this Proxy was started already; create a new one")

    async def _astart(self) -> None:
        from proxy.adminapi import AdminAPIClient
        from proxy.credentials import resolve
        from proxy.dialer import Dialer
        from proxy.keys import generate_in_background
        from proxy.log import get_logger
        from proxy.metrics import Metrics
        from proxy.server import ProxyServer
        from proxy.supervisor import user_agent

        self._started = True
        cfg = self._cfg
        if self._private_dir:
            self._tmpdir = tempfile.mkdtemp(prefix="alloydb-proxy-")  # mode 0700
            cfg = replace(cfg, unix_socket=self._tmpdir)
        try:
            credentials = await workers.TOKENS.run(
                lambda: resolve(
                    token=cfg.token,
                    credentials_file=cfg.credentials_file,
                    json_credentials=cfg.json_credentials,
                    gcloud_auth=cfg.gcloud_auth,
                    impersonate=cfg.impersonate_service_account,
                    login_token=cfg.login_token,
                    auto_iam=any(cfg.auto_iam_for(i) for i in cfg.instances),
                )
            )
            static = None
            if cfg.static_connection_info:
                try:
                    static = staticinfo.load(cfg.static_connection_info)
                except staticinfo.StaticInfoError as exc:
                    raise StartupError(f"error initializing dialer: {exc}") from None
            keys = await asyncio.wrap_future(generate_in_background())
            log = get_logger()
            self._metrics = Metrics()
            client = AdminAPIClient(cfg.api_endpoint, credentials.api, user_agent(cfg))
            dialer = Dialer(cfg, credentials, client, keys, log, self._metrics, static)
            server = ProxyServer(cfg, dialer, log, self._metrics)
            self._parts = (server, dialer, client)
            server.open_listeners()
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


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


__all__ = ["BadCommandError", "ConnectionTestFailed", "ListenerInfo", "Proxy"]
