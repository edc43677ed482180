"""The emulator as a whole: clusters, instances, tokens, logs, and its own thread.

It runs its own event loop in a background thread, so a test (or any
synchronous program) can start it, point a proxy subprocess at
``admin_url``, flip fault switches and read the logs while it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import socket
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from proxy import mdx
from proxy.emulator import tlsalerts
from proxy.emulator.adminapi import AdminAPIServer, AdminRequest
from proxy.emulator.faults import Faults
from proxy.emulator.instance import PORT, Instance, InstanceServer
from proxy.emulator.pki import ClusterCA, key_pem, pem
from proxy.emulator.principals import Principal

T = TypeVar("T")

_URI = re.compile(r"^(projects/[^/]+/locations/[^/]+/clusters/[^/]+)/instances/[^/]+$")
# Loopback addresses for instances: the second octet comes from the pid so
# emulators in concurrent processes rarely collide; taken ones are skipped.
_SECOND_OCTET = 100 + os.getpid() % 100
_address_counter = itertools.count()
_address_lock = threading.Lock()


_foreign_ca: ClusterCA | None = None
_foreign_ca_lock = threading.Lock()


def foreign_ca() -> ClusterCA:
    """A CA no client trusts (for the unknown_ca fault); one per process is enough."""
    global _foreign_ca
    with _foreign_ca_lock:
        if _foreign_ca is None:
            _foreign_ca = ClusterCA("projects/unknown/locations/x/clusters/unknown-ca")
        return _foreign_ca


def _port_free(ip: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((ip, PORT))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                return False
            raise
    return True


def allocate_ip() -> str:
    with _address_lock:
        while True:
            n = next(_address_counter)
            ip = f"127.{_SECOND_OCTET}.{n // 250 % 250}.{n % 250 + 2}"
            if _port_free(ip):
                return ip


def _dns_label(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-") or "x"


LOG_LIMIT = 10_000


class BoundedLog(list[T]):
    """A list that keeps only its last LOG_LIMIT entries (a long CI run must not grow it forever)."""

    def append(self, item: T) -> None:
        super().append(item)
        if len(self) > LOG_LIMIT + LOG_LIMIT // 10:  # trim in batches
            del self[: len(self) - LOG_LIMIT]


class Emulator:
    """Admin API plus one mTLS server per instance, in front of one PostgreSQL.

    ``tokens`` maps bearer tokens to principals; ``None`` accepts any
    non-empty token (a demo mode: the principal is unknown, so automatic IAM
    login is refused at the exchange).
    It may be replaced at run time. Logs for tests: ``admin_requests``
    (AdminRequest), ``mdx_requests`` ((instance URI, MdxRequest)) and
    ``connections`` ((instance URI, local IP reached) per TLS session), each
    keeping the last LOG_LIMIT entries. Over HTTP (``/emulator/v1/requests``)
    bearer and OAuth2 tokens are redacted unless ``reveal_tokens``: anyone
    who can reach the port could read them otherwise.
    """

    def __init__(
        self,
        *,
        postgres_host: str = "127.0.0.1",
        postgres_port: int = 5432,
        tokens: dict[str, Principal] | None = None,
        admin_host: str = "127.0.0.1",
        admin_port: int = 0,
        reveal_tokens: bool = False,
    ) -> None:
        self.reveal_tokens = reveal_tokens
        self.postgres_host = postgres_host
        self.postgres_port = postgres_port
        self.tokens = tokens
        self.admin_host = admin_host
        self.admin_port = admin_port
        self.faults = Faults()
        self.clusters: dict[str, ClusterCA] = {}
        self.instances: dict[str, Instance] = {}
        self.issued: dict[int, bool] = {}  # client cert serial -> useMetadataExchange
        self.admin_requests: BoundedLog[AdminRequest] = BoundedLog()
        self.mdx_requests: BoundedLog[tuple[str, mdx.MdxRequest]] = BoundedLog()
        # (instance URI, local IP it reached)
        self.connections: BoundedLog[tuple[str, str]] = BoundedLog()
        self._servers: dict[str, InstanceServer] = {}
        self._admin = AdminAPIServer(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._postgres_loopback: bool | None = None
        self._restarting = threading.Lock()

    # ---- set-up ---------------------------------------------------------

    def add_instance(
        self,
        uri: str,
        *,
        public_ip: bool = False,
        psc: bool = False,
        serve: bool = True,
        backend: tuple[str, int] | None = None,
    ) -> Instance:
        """Register an instance; ``serve=False`` leaves its port 5433 to another server
        (e.g. a benchmark's), which can use ``server_identity(inst)`` and ``inst.ca.root_pem``.
        ``backend`` sends its sessions (StartupMessage included) to that address
        instead of the emulator's PostgreSQL."""
        match = _URI.match(uri)
        if match is None:
            raise ValueError(f"not an instance URI: {uri!r}")
        if uri in self.instances:
            raise ValueError(f"instance {uri!r} already exists")
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError("add_instance must not be called from the emulator's own thread")
        cluster = match.group(1)
        if cluster not in self.clusters:
            self.clusters[cluster] = ClusterCA(cluster)
        inst = Instance(uri=uri, ca=self.clusters[cluster], private_ip=allocate_ip())
        if public_ip:
            inst.public_ip = allocate_ip()
        if psc:
            inst.psc_ip = allocate_ip()
            parts = uri.split("/")
            inst.psc_dns_name = (
                f"{inst.uid[:12]}.{_dns_label(parts[1])}.{_dns_label(parts[3])}.alloydb.goog"
            )
        inst.serve = serve
        inst.backend = backend
        self.instances[uri] = inst
        if serve and self._loop is not None:
            try:
                self._call(self._serve_instance(inst))
            except BaseException:
                del self.instances[uri]
                raise
        return inst

    def postgres_on_loopback(self) -> bool:
        """PostgreSQL is reached over IPv4 loopback, so the emulator can choose the
        source address of its connections (see pgcluster's HBA lines)."""
        if self._postgres_loopback is None:
            try:
                found = socket.getaddrinfo(
                    self.postgres_host, self.postgres_port, socket.AF_INET, socket.SOCK_STREAM
                )
            except OSError:
                found = []
            self._postgres_loopback = bool(found) and all(
                str(info[4][0]).startswith("127.") for info in found
            )
        return self._postgres_loopback

    def rotate_server_certificate(self, uri: str, *, new_ca: bool = False) -> None:
        """Give the instance a new server certificate while proxies run. With
        ``new_ca`` its cluster gets a new CA too: connectionInfo's caCert and new
        client certificates follow it, and certificates issued before are refused.
        Sessions of the old identity cannot be resumed."""
        inst = self.instances[uri]
        targets = [inst]
        ca = inst.ca
        if new_ca:
            ca = ClusterCA(inst.cluster)
            targets = [i for i in list(self.instances.values()) if i.cluster == inst.cluster]
        # Everything is built first and swapped in together, so the Admin API
        # never hands out the new CA while a server still uses the old one.
        servers = [(m, self._servers.get(m.uri)) for m in targets]
        prepared = [(m, s, s.prepare(ca) if s is not None else None) for m, s in servers]
        self.clusters[inst.cluster] = ca
        for member, server, contexts in prepared:
            member.ca = ca
            if server is not None and contexts is not None:
                server.install(contexts)

    def restart_instance(self, uri: str, *, down_for: float = 0.0) -> None:
        """Restart the instance's server as a maintenance restart would: every
        connection past its TLS handshake is aborted, the port refuses for
        ``down_for`` seconds, then it serves again with the same identity.
        Returns once it serves again; restarts of one emulator run one at a time."""
        server = self._servers[uri]

        async def restart() -> None:
            await server.stop()
            await asyncio.sleep(down_for)
            await server.start()

        assert self._loop is not None
        with self._restarting:
            asyncio.run_coroutine_threadsafe(restart(), self._loop).result(60 + down_for)

    def server_identity(self, inst: Instance) -> tuple[str, bytes]:
        """A server certificate chain (PEM) and key (PKCS#8 PEM) valid for the instance."""
        dns = [inst.psc_dns_name] if inst.psc_dns_name else []
        cert, key = inst.ca.server_certificate(inst.certificate_ips, dns, inst.uid)
        return pem(cert) + inst.ca.root_pem, key_pem(key)

    def hosts_entries(self) -> list[str]:
        """/etc/hosts lines that make the PSC names resolve to their loopback IPs."""
        return [f"{i.psc_ip} {i.psc_dns_name}" for i in self.instances.values() if i.psc_dns_name]

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}:{self._admin.port}"

    # ---- running --------------------------------------------------------

    def start(self) -> Emulator:
        if self._thread is not None:
            return self
        tlsalerts.install()  # refusals reach clients as TLS alerts, as AlloyDB's do
        ready: Future[None] = Future()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_async())
            except BaseException as exc:
                # Close whatever did start (e.g. the Admin API when an instance failed).
                loop.run_until_complete(self._stop_async())
                loop.close()
                ready.set_exception(exc)
                return
            ready.set_result(None)
            try:
                loop.run_forever()
                loop.run_until_complete(self._stop_async())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="alloydb-emulator", daemon=True)
        self._thread.start()
        try:
            ready.result(60)
        except BaseException:
            self._thread.join(5)
            self._thread = None
            self._loop = None
            raise
        return self

    async def _start_async(self) -> None:
        await self._admin.start(self.admin_host, self.admin_port)
        for inst in list(self.instances.values()):
            if inst.serve:
                await self._serve_instance(inst)

    async def _serve_instance(self, inst: Instance) -> None:
        loop = asyncio.get_running_loop()
        other_ca = await loop.run_in_executor(None, foreign_ca)
        server = await loop.run_in_executor(None, InstanceServer, self, inst, other_ca)
        await server.start()
        self._servers[inst.uri] = server

    async def _stop_async(self) -> None:
        await self._admin.stop()
        for server in self._servers.values():
            await server.stop()
        self._servers.clear()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def stop(self) -> None:
        """Stop serving and join the thread; safe to call more than once."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        self._loop = None
        self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
