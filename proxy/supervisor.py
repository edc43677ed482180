"""The proxy's life cycle: start-up sequence, signals and shutdown.

Order of start-up, as in the Go proxy: credentials (the "Authorizing with"
line), RSA key, listeners ("Listening on" per instance), the ready line, then
accepting. The Admin API is not contacted until the first connection.
The outcome is an ``Exit`` value; only the CLI turns it into an exit code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import signal
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from proxy import __version__, dataplane, sdnotify, staticinfo, workers
from proxy.adminapi import AdminAPIClient
from proxy.config import Config
from proxy.credentials import CredentialSet, resolve
from proxy.dialer import Dialer
from proxy.errors import BadCommandError, ProxyError, StartupError
from proxy.health import (
    HTTPServer,
    ProbeState,
    RequestPolicy,
    admin_routes,
    health_routes,
    host_is_allowed,
    metrics_route,
)
from proxy.keys import KeyPair, generate_in_background
from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.reload import ConfigSource, ReloadRefused, changed_options, next_config
from proxy.server import ProxyServer
from proxy.settings import format_go_duration

T = TypeVar("T")

READY_LINE = "The proxy has started successfully and is ready for new connections!"
#: How long a reload may take to read its sources (a hung file system).
RELOAD_READ_TIMEOUT = 30.0


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1
    SIGINT = 130
    SIGTERM = 143


@dataclass
class Outcome:
    code: Exit
    error: str = ""


def user_agent(cfg: Config) -> str:
    agent = f"alloydb-python-proxy/{__version__} alloy-db-auth-proxy/{__version__}"
    return f"{agent} {cfg.user_agent}" if cfg.user_agent else agent


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        log: Logger,
        keys: concurrent.futures.Future[KeyPair] | None = None,
        reload_source: ConfigSource | None = None,
        early_signals: list[signal.Signals] | None = None,
    ) -> None:
        self._keys = keys  # started by the CLI before the imports; made here otherwise
        self._cfg = cfg
        self._reload_source = reload_source  # None: SIGHUP keeps its default (exit)
        # Signals the CLI noted before these handlers were in (see cli.run).
        self._early_signals = early_signals if early_signals is not None else []
        self._reload_lock = asyncio.Lock()
        self._server: ProxyServer | None = None  # once serving
        self._reloads: set[asyncio.Task[tuple[bool, str]]] = set()
        self._stopping_sent = False
        self._log = log
        self._stop = asyncio.Event()
        self._signal: signal.Signals | None = None
        self._quit = False
        self.probes = ProbeState(max_connections=cfg.max_connections)
        exports_metrics = bool(cfg.telemetry_project) and not cfg.disable_metrics
        self.metrics = (
            Metrics(cfg.prometheus_namespace) if cfg.prometheus or exports_metrics else None
        )

    def _on_signal(self, sig: signal.Signals) -> None:
        # Only the first signal counts; the Go proxy swallows later ones too.
        if self._signal is None:
            self._signal = sig
            self._stop.set()

    async def run(self) -> Outcome:
        """Run until stopped. SIGINT and SIGTERM are ignored from then on, to the
        end of the process: a second signal during cleanup changes nothing.

        Plain ``signal.signal`` handlers rather than ``loop.add_signal_handler``:
        closing the loop would put the default handlers back, and a signal in
        that window would kill the process or raise KeyboardInterrupt. A
        Python handler runs only when the main thread runs Python code, so a
        wakeup socket the loop watches makes sure it does, whichever thread
        the signal landed on (uvloop has its own; plain asyncio has none).
        """
        loop = asyncio.get_running_loop()

        def on_signal(number: int, _frame: object) -> None:
            loop.call_soon_threadsafe(self._on_signal, signal.Signals(number))

        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)

        def drain() -> None:
            with contextlib.suppress(OSError):
                wake_read.recv(4096)

        def on_hangup(_number: int, _frame: object) -> None:
            loop.call_soon_threadsafe(self._on_hangup)

        loop.add_reader(wake_read.fileno(), drain)
        previous = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        if self._reload_source is not None:
            signal.signal(signal.SIGHUP, on_hangup)
        for sig in list(self._early_signals):
            self._on_signal(sig)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            signal.set_wakeup_fd(previous)
            loop.remove_reader(wake_read.fileno())
            wake_read.close()
            wake_write.close()

    async def _run(self) -> Outcome:
        log = self._log
        startup = asyncio.ensure_future(self._start())
        stop_wait = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not startup.done():
            # Start-up may be waiting for gcloud or a token endpoint; those
            # calls run on daemon threads and are left behind.
            startup.cancel()
            await asyncio.gather(startup, return_exceptions=True)
            self._notify_stopping()
            name = self._signal.name if self._signal else "SIGTERM"
            return self._signal_exit(f"{name} signal received")
        stop_wait.cancel()
        try:
            server, dialer, client = startup.result()
        except ProxyError as exc:
            self._notify_stopping()
            return Outcome(Exit.ERROR, str(exc))

        fuse = None
        telemetry = None
        http_servers: list[HTTPServer] = []
        try:
            if self._cfg.telemetry_project and not (
                self._cfg.disable_metrics and self._cfg.disable_traces
            ):
                # The [telemetry] extra (the CLI checked that it is installed).
                from proxy import telemetry as exporters

                try:
                    telemetry = exporters.start(
                        self._cfg,
                        dialer.credentials.api,
                        self.metrics,
                        asyncio.get_running_loop(),
                        log,
                    )
                except Exception as exc:  # e.g. a broken install of the extra
                    self._notify_stopping()
                    return Outcome(Exit.ERROR, f"failed to start telemetry export: {exc}")
            if self._cfg.fuse:
                from proxy.fusemount import FuseMount, default_tmp_dir

                fuse = FuseMount(
                    self._cfg.fuse,
                    self._cfg.fuse_tmp_dir or default_tmp_dir(),
                    server.open_by_name,
                    asyncio.get_running_loop(),
                    log,
                )
                try:
                    await asyncio.to_thread(fuse.start)
                except ProxyError as exc:
                    fuse = None  # start() unmounted what it mounted
                    self._notify_stopping()
                    return Outcome(Exit.ERROR, str(exc))
            await asyncio.sleep(0)  # a signal during a blocking start is queued on the loop
            if self._stop.is_set():  # a signal while the mount or the exporters started
                self._notify_stopping()
                name = self._signal.name if self._signal else "SIGTERM"
                return self._signal_exit(f"{name} signal received")
            log.info(READY_LINE)
            self._notify("READY=1", "readiness")
            try:
                await self._start_http(server, http_servers)
            except OSError as exc:
                return Outcome(Exit.ERROR, f"failed to start HTTP server: {exc}")
            if self._cfg.run_connection_test:
                log.info("Connection test started")
                errors = await self._until_stopped(server.connection_test())
                if errors is None:  # a signal or /quitquitquit came first
                    return await self._shut_down(server, dialer, client)
                if errors:
                    log.error("Connection test failed")
                    return Outcome(Exit.ERROR, ", ".join(errors))
                log.info("Connection test passed")
            server.start_accepting()
            self._server = server
            self.probes.started = True
            await self._stop.wait()
            self._server = None  # no reload from here on
            return await self._shut_down(server, dialer, client)
        finally:
            for http in http_servers:
                await http.close()
            # On every way out (a failed HTTP server or connection test too):
            # a socket file or a mount left behind would make the next start fail.
            server.close_listeners()
            if fuse is not None:
                problem = await asyncio.to_thread(fuse.stop)
                if problem:
                    log.error("failed to close mount: %s", problem)
            if telemetry is not None:
                # The last export, on a daemon thread of its own, waited for 5 s at
                # most (not behind the Admin API client's close on SHUTDOWN).
                await asyncio.to_thread(telemetry.shutdown)
            self._notify_stopping()

    async def _until_stopped(self, work: Awaitable[T]) -> T | None:
        """``work``'s result, or None (``work`` cancelled) if the proxy is told to stop first."""
        job = asyncio.ensure_future(work)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({job, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if job.done():
            return job.result()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        return None

    async def _start_http(self, server: ProxyServer, started: list[HTTPServer]) -> None:
        cfg, log = self._cfg, self._log
        if cfg.health_check or cfg.prometheus:
            check = server.connection_test if cfg.with_backend_check else None
            routes = (
                health_routes(self.probes, lambda: server.connection_count, log, check)
                if cfg.health_check
                else {}
            )
            if cfg.prometheus and self.metrics is not None:
                routes["/metrics"] = metrics_route(self.metrics)
            bound = cfg.http_address.strip("[]").lower()
            health = HTTPServer(
                routes,
                RequestPolicy(
                    extra_hosts=(bound,), any_ip=True, any_host=not host_is_allowed(bound)
                ),
            )
            await health.start(cfg.http_address, int(cfg.http_port))
            started.append(health)
            log.info("Starting health check server at %s:%s", cfg.http_address, cfg.http_port)
        if cfg.quitquitquit or cfg.debug:
            admin_table = (
                admin_routes(self._on_quit, self._reload_route if self._reload_source else None)
                if cfg.quitquitquit
                else {}
            )
            if cfg.debug:
                from proxy.profiling import debug_routes  # only with --debug

                admin_table.update(debug_routes())
            admin = HTTPServer(admin_table, RequestPolicy())  # loopback names only
            await admin.start("localhost", int(cfg.admin_port))
            started.append(admin)
            if cfg.quitquitquit:
                log.info("Enabling quitquitquit endpoint at localhost:%s", cfg.admin_port)
            if cfg.debug:
                log.info("Enabling pprof endpoints at localhost:%s", cfg.admin_port)

    def _notify(self, state: str, what: str) -> None:
        try:
            sdnotify.notify(state)
        except OSError as exc:
            self._log.error("Failed to notify systemd of %s: %s", what, exc)

    def _notify_stopping(self) -> None:
        """STOPPING=1 to systemd, once, whichever way the proxy ends."""
        if not self._stopping_sent:
            self._stopping_sent = True
            self._notify("STOPPING=1", "termination")

    def _on_hangup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload_route(self) -> tuple[bool, str]:
        return await self.reload("POST /reload")

    async def reload(self, trigger: str) -> tuple[bool, str]:
        """Read the configuration again and switch to its instance list (see
        proxy/reload.py). Whether it was applied, and the line logged about it."""
        log = self._log
        async with self._reload_lock:  # one at a time, in the order asked
            server = self._server
            if server is None or self._reload_source is None or self._stop.is_set():
                message = f"Reload ({trigger}) ignored: the proxy is not serving yet or is stopping"
                log.error(message)
                return False, message
            log.info("Reloading the configuration (%s)", trigger)
            try:
                # A daemon thread, not waited for once the proxy stops: a file on
                # a hung file system must hold neither the exit nor the listeners.
                read = await self._until_stopped(
                    asyncio.wait_for(workers.RELOAD.run(self._reload_source), RELOAD_READ_TIMEOUT)
                )
                if read is None or self._server is None:
                    message = f"Reload ({trigger}) abandoned: the proxy is stopping"
                    log.error(message)
                    return False, message
                new, warnings = read
                for warning in warnings:
                    log.error(warning)
                merged = next_config(self._cfg, new)
                added, removed, kept = server.reconfigure(merged)
            except (BadCommandError, ReloadRefused, StartupError, asyncio.TimeoutError) as exc:
                reason = str(exc).removeprefix("unable to start: ") or (
                    f"reading the configuration took over {RELOAD_READ_TIMEOUT:g}s"
                )
                message = f"Reload failed, still serving the previous configuration: {reason}"
                log.error(message)
                return False, message
            for option in changed_options(self._cfg, new):
                log.error("Ignoring the new value of %s: it takes effect on restart", option)
            self._cfg = merged
            message = f"Reload done: {added} listener(s) added, {removed} removed, {kept} kept"
            log.info(message)
            return True, message

    def _on_quit(self) -> None:
        if not self._stop.is_set():
            self._quit = True
            self._stop.set()

    async def _shut_down(
        self, server: ProxyServer, dialer: Dialer, client: AdminAPIClient
    ) -> Outcome:
        """The Go proxy's order: keep accepting for --min-sigterm-delay, stop listening,
        then wait up to --max-sigterm-delay for open connections to finish."""
        cfg, log = self._cfg, self._log
        if self._quit:
            log.info("/quitquitquit received request. Shutting down...")
        elif self._signal is not None:
            log.info("%s signal received. Shutting down...", self._signal.name)
        if cfg.min_sigterm_delay > 0:
            await asyncio.sleep(cfg.min_sigterm_delay)
        self.probes.stopping = True
        self._notify_stopping()
        server.close_listeners()
        dialer.close()
        # On a thread of its own, and never waited for long: a request stuck
        # in the Admin API must not hold the shutdown.
        with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError on 3.10
            await asyncio.wait_for(workers.SHUTDOWN.run(client.close), 1.0)
        if cfg.max_sigterm_delay > 0:
            deadline = time.monotonic() + cfg.max_sigterm_delay
            while server.connection_count and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if server.connection_count:
                log.error(
                    "error during shutdown: %d connection(s) still open after waiting %s",
                    server.connection_count,
                    format_go_duration(cfg.max_sigterm_delay),
                )
                return Outcome(Exit.ERROR)
        if self._quit or self._signal is None:
            return Outcome(Exit.OK)
        if self._signal == signal.SIGINT:
            return Outcome(Exit.SIGINT)
        return Outcome(Exit.OK if cfg.exit_zero_sigterm else Exit.SIGTERM)

    def _signal_exit(self, message: str) -> Outcome:
        """A signal during start-up: the Go proxy's terminal-error line and exit code."""
        if self._signal == signal.SIGINT:
            return Outcome(Exit.SIGINT, message)
        return Outcome(Exit.OK if self._cfg.exit_zero_sigterm else Exit.SIGTERM, message)

    async def _start(self) -> tuple[ProxyServer, Dialer, AdminAPIClient]:
        if self._keys is None:
            self._keys = generate_in_background()
        return await open_proxy(
            self._cfg, self._log, self.metrics, self._keys, error_prefix="unable to start: "
        )


def resolve_credentials(cfg: Config) -> CredentialSet:
    """The credential source the flags pick, in the Go proxy's order (blocking)."""
    return resolve(
        token=cfg.token,
        credentials_file=cfg.credentials_file,
        json_credentials=cfg.json_credentials,
        gcloud_auth=cfg.gcloud_auth,
        impersonate=cfg.impersonate_service_account,
        login_token=cfg.login_token,
        auto_iam=any(cfg.auto_iam_for(i) for i in cfg.instances),
    )


async def open_proxy(
    cfg: Config,
    log: Logger,
    metrics: Metrics | None,
    keys: concurrent.futures.Future[KeyPair],
    *,
    error_prefix: str = "",
) -> tuple[ProxyServer, Dialer, AdminAPIClient]:
    """Credentials, static connection info, the key, the Admin API client, the
    dialer and the listeners, in the Go proxy's order: the command's start-up
    and ``proxy.Proxy``'s. Not accepting yet. ``error_prefix`` goes before a
    credential or static-info error (the command's "unable to start: ")."""
    dataplane.check()  # e.g. ALLOYDB_AUTH_PROXY_DATA_PLANE=native where it is not installed
    if cfg.data_plane_threads:
        dataplane.plane.set_threads(cfg.data_plane_threads)
    log.debug("Data plane threads: %d", dataplane.plane.threads())
    try:
        credentials = await workers.TOKENS.run(lambda: resolve_credentials(cfg))
        static = None
        if cfg.static_connection_info:
            try:
                static = staticinfo.load(cfg.static_connection_info)
            except staticinfo.StaticInfoError as exc:
                raise StartupError(f"error initializing dialer: {exc}") from None
    except ProxyError as exc:
        if not error_prefix:
            raise
        raise StartupError(f"{error_prefix}{exc}") from None
    client = AdminAPIClient(cfg.api_endpoint, credentials.api, user_agent(cfg))
    dialer = Dialer(cfg, credentials, client, await asyncio.wrap_future(keys), log, metrics, static)
    server = ProxyServer(cfg, dialer, log, metrics)
    try:
        if not cfg.fuse:  # under --fuse, instances are opened by name (as in Go)
            server.open_listeners()
    except BaseException:
        dialer.close()
        client.close()
        raise
    return server, dialer, client
