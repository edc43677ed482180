"""Per connection: cached connection info → TCP to :5433 → TLS 1.3 → metadata exchange.

The result is an established ``plane.TLSConnection`` that the server hands to
the splice core. TCP and TLS failures force a certificate refresh (the
instance may have moved or rotated its CA); so does a failure on the first
read of the metadata exchange, which is where TLS 1.3 delivers the server's
rejection of our certificate. A metadata-exchange refusal does not,
as in the Go connector.

A failed connection-info lookup evicts the instance's cache, so the next
connection starts afresh; but the Admin API is not asked again at once: the
failure is remembered for a while (longer after each 429 or 5xx, and at least
until the instance's rate limiter has a token), and connections meanwhile get
the same error. The rate limiter belongs to the instance, not to the cache,
so eviction cannot reset it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

from proxy import __version__, mdx, tlsconn, tracing
from proxy.adminapi import AdminAPIClient
from proxy.cache import ConnectionInfo, ConnectionInfoCache, LazyCache, RefreshAheadCache
from proxy.config import SERVER_PROXY_PORT, Config, InstanceConfig, InstanceURI
from proxy.credentials import CredentialSet
from proxy.dataplane import plane
from proxy.errors import ConfigError, DialError, MetadataExchangeError, RefreshError
from proxy.keys import KeyPair
from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.refresh import RateLimiter
from proxy.staticinfo import StaticCache

#: Sent in every metadata exchange, like the Go connector's own name/version.
MDX_USER_AGENT = f"alloydb-python-proxy/{__version__}"
MDX_TIMEOUT = 30.0
TCP_KEEPALIVE = 30
#: How long a failed connection-info lookup is remembered (seconds); after an
#: HTTP 429 or 5xx it doubles with each failure in a row, up to FAILURE_HOLD_MAX.
FAILURE_HOLD = 2.0
FAILURE_HOLD_MAX = 120.0


@dataclass
class _Failure:
    error: Exception
    until: float  # time.monotonic()
    in_a_row: int


def set_tcp_options(sock: socket.socket) -> None:
    """No Nagle delay and 30 s keepalives, as Go sets on every TCP connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPALIVE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPALIVE)


#: How long a removed instance's cache lives on after a reload: past any dial
#: of a connection accepted before it (they time out after 30 s).
RETIRE_AFTER = 60.0


class Dialer:
    def __init__(
        self,
        cfg: Config,
        credentials: CredentialSet,
        client: AdminAPIClient,
        keys: KeyPair,
        log: Logger,
        metrics: Metrics | None = None,
        static: dict[str, ConnectionInfo] | None = None,
    ) -> None:
        self._metrics = metrics
        self._static = static  # --static-connection-info replaces the Admin API
        self._cfg = cfg
        self._credentials = credentials
        self._client = client
        self._keys = keys
        self._log = log
        self._caches: dict[InstanceURI, ConnectionInfoCache] = {}
        # Caches of instances a reload removed, until their close (RETIRE_AFTER).
        self._retired: dict[InstanceURI, tuple[ConnectionInfoCache, asyncio.TimerHandle]] = {}
        self._limiters: dict[InstanceURI, RateLimiter] = {}
        self._failures: dict[InstanceURI, _Failure] = {}
        self._closed = False

    def _cache(self, uri: InstanceURI) -> ConnectionInfoCache:
        cache = self._caches.get(uri)
        if cache is None and uri in self._retired:
            return self._retired[uri][0]  # a reload removed it; still serving late dials
        if cache is None:
            if self._static is not None:
                cache = StaticCache(uri, self._static)
            else:
                kind = LazyCache if self._cfg.lazy_refresh else RefreshAheadCache
                if not self._cfg.fuse and uri not in {i.uri for i in self._cfg.instances}:
                    # Dialled for a listener a reload removed (accepted before it):
                    # served, but refreshed only on demand from now on.
                    kind = LazyCache
                limiter = self._limiters.setdefault(uri, RateLimiter())
                cache = kind(uri, self._client, self._keys, self._log, self._metrics, limiter)
            self._caches[uri] = cache
        return cache

    def _evict(self, uri: InstanceURI, cache: ConnectionInfoCache, err: Exception) -> None:
        self._log.debug("[%s] Removing connection info from cache: %s", uri.short, err)
        cache.close()
        if self._caches.get(uri) is cache:
            del self._caches[uri]
        retired = self._retired.get(uri)
        if retired is not None and retired[0] is cache:
            retired[1].cancel()
            del self._retired[uri]
        self._remember(uri, err)

    def _remember(self, uri: InstanceURI, err: Exception) -> None:
        """Hold the failure, so a burst of connections makes no burst of requests."""
        previous = self._failures.get(uri)
        if previous is not None and previous.error is err:
            return  # the same failed lookup, seen by another dial that waited for it
        status = getattr(err, "status", None) or 0
        hold = FAILURE_HOLD
        in_a_row = 0  # consecutive 429/5xx answers
        if status == 429 or status >= 500:
            in_a_row = (previous.in_a_row if previous else 0) + 1
            hold = min(FAILURE_HOLD_MAX, FAILURE_HOLD * 2 ** (in_a_row - 1))
        limiter = self._limiters.get(uri)
        if limiter is not None:
            hold = max(hold, limiter.wait_time())
        self._failures[uri] = _Failure(err, time.monotonic() + hold, in_a_row)
        self._log.debug(
            "[%s] Not asking the Admin API again for %.0fs after: %s", uri.short, hold, err
        )

    def _remembered(self, uri: InstanceURI) -> Exception | None:
        failure = self._failures.get(uri)
        if failure is None or time.monotonic() >= failure.until:
            return None
        return failure.error

    async def connection_info(self, inst: InstanceConfig) -> ConnectionInfo:
        """The instance's addresses and certificate (fetched if not cached yet);
        a RefreshError when the Admin API does not give them."""
        if self._closed:
            raise DialError("alloydbconn: dialer is closed", inst.uri.short)
        info, _ = await self._connection_info(inst.uri)
        return info

    async def _connection_info(
        self, uri: InstanceURI
    ) -> tuple[ConnectionInfo, ConnectionInfoCache]:
        short = uri.short
        remembered = self._remembered(uri) if uri not in self._caches else None
        if remembered is not None:
            # A fresh traceback each time: re-raising one object would pile up frames.
            raise remembered.with_traceback(None)
        cache = self._cache(uri)
        try:
            info = await cache.connection_info()
            if not info.valid():
                # e.g. after a laptop sleep: the certificate expired under us.
                self._log.debug("[%s] Cert is valid = false; refreshing certificate now", short)
                cache.force_refresh()
                info = await cache.connection_info()
                if not info.valid():
                    raise RefreshError(
                        "the Admin API issued a client certificate that has already expired",
                        short,
                        "expired at "
                        + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.expiry)),
                    )
        except Exception as exc:
            self._evict(uri, cache, exc)
            raise
        self._failures.pop(uri, None)
        return info, cache

    async def dial(self, inst: InstanceConfig) -> plane.TLSConnection:
        """Open an authenticated tunnel to the instance, ready for PostgreSQL bytes."""
        with tracing.span(tracing.DIAL, inst.uri.name):
            if self._closed:
                raise DialError("alloydbconn: dialer is closed", inst.uri.short)
            with tracing.span(tracing.INSTANCE_INFO, inst.uri.short):
                info, cache = await self._connection_info(inst.uri)
            with tracing.span(tracing.CONNECT, inst.uri.short):
                return await self._connect(inst, info, cache)

    async def _connect(
        self, inst: InstanceConfig, info: ConnectionInfo, cache: ConnectionInfoCache
    ) -> plane.TLSConnection:
        short = inst.uri.short

        ip_type = self._cfg.ip_type_for(inst)
        address = info.addresses.get(ip_type)
        if not address:
            # This listener's configuration is wrong; another listener for the
            # same instance with another IP type still uses the cache.
            raise ConfigError(f'instance does not have IP of type "{ip_type}"', short)

        self._log.debug("[%s] Dialing %s:%d", short, address, SERVER_PROXY_PORT)
        try:
            sock = await self._connect_tcp(address)
        except OSError as exc:
            self._log.debug("[%s] Dialing %s:%d failed: %s", short, address, SERVER_PROXY_PORT, exc)
            cache.force_refresh()
            reason = (exc.strerror or str(exc)).lower()
            raise DialError(
                "failed to dial", short, f"dial tcp {_hostport(address)}: {reason}"
            ) from exc

        conn = plane.TLSConnection(info.context, sock.detach(), address)
        try:
            try:
                await tlsconn.handshake(conn, timeout=MDX_TIMEOUT)
            except (plane.TLSError, OSError, TimeoutError) as exc:
                self._log.debug("[%s] TLS handshake failed: %s", short, exc)
                cache.force_refresh()
                raise DialError("handshake failed", short, exc) from exc
            self._log.debug("[%s] Connected securely to %s", short, _hostport(address))
            await self._metadata_exchange(conn, inst, cache)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _connect_tcp(self, address: str) -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(address, SERVER_PROXY_PORT, type=socket.SOCK_STREAM)
        last: OSError = OSError("no addresses")
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                set_tcp_options(sock)
                await loop.sock_connect(sock, sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        raise last

    async def _metadata_exchange(
        self, conn: plane.TLSConnection, inst: InstanceConfig, cache: ConnectionInfoCache
    ) -> None:
        short = inst.uri.short
        token = await self._credentials.login.token()
        auto_iam = self._cfg.auto_iam_for(inst)
        self._log.debug(
            "[%s] Metadata exchange start (%s, auth type = %s)",
            short,
            token.describe(),
            "AUTO_IAM" if auto_iam else "DB_NATIVE",
        )
        request = mdx.MdxRequest(
            user_agent=MDX_USER_AGENT,
            auth_type=mdx.AUTO_IAM if auto_iam else mdx.DB_NATIVE,
            oauth2_token=token.value,
        )
        await tlsconn.send_all(conn, mdx.encode_request(request), timeout=MDX_TIMEOUT)
        try:
            header = await tlsconn.recv_exactly(conn, mdx.HEADER_SIZE, timeout=MDX_TIMEOUT)
        except (plane.TLSError, ConnectionError) as exc:
            # Under TLS 1.3 the client's handshake ends before the server has
            # checked our certificate: its refusal (an alert, or just a close)
            # shows up here.
            self._log.debug("[%s] TLS handshake failed (seen on first read): %s", short, exc)
            cache.force_refresh()
            raise DialError("handshake failed", short, exc) from exc
        size = mdx.body_length(header)
        body = await tlsconn.recv_exactly(conn, size, timeout=MDX_TIMEOUT) if size else b""
        response = mdx.decode_response(body)
        if not response.ok:
            # The server's text, verbatim, as the Go connector reports it.
            raise MetadataExchangeError(response.error or "metadata exchange failed")
        # The server's session tickets came in before its answer: the next
        # connection to this instance can resume instead of re-signing.
        conn.remember_session()
        self._log.debug(
            "[%s] Metadata exchange finish (result = OK%s)",
            short,
            ", TLS session resumed" if conn.resumed else "",
        )

    @property
    def credentials(self) -> CredentialSet:
        return self._credentials

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded instance list: the caches of instances no longer in it are
        closed RETIRE_AFTER later, not at once (a connection accepted before the
        reload may still be waiting for its connection info, or dial after it);
        one added back meanwhile gets its cache back. Rate limiters stay, so that
        removing and adding an instance again and again cannot make requests
        faster than the limit.
        """
        self._cfg = cfg
        current = {inst.uri for inst in cfg.instances}
        for uri in [uri for uri in self._retired if uri in current]:
            cache, timer = self._retired.pop(uri)
            timer.cancel()
            self._caches.setdefault(uri, cache)
        loop = asyncio.get_running_loop()
        for uri in [uri for uri in self._caches if uri not in current]:
            cache = self._caches.pop(uri)
            self._retired[uri] = (cache, loop.call_later(RETIRE_AFTER, self._retire, uri))

    def _retire(self, uri: InstanceURI) -> None:
        cache, _ = self._retired.pop(uri)
        cache.close()

    def close(self) -> None:
        self._closed = True
        for cache in self._caches.values():
            cache.close()
        self._caches.clear()
        for cache, timer in self._retired.values():
            timer.cancel()
            cache.close()
        self._retired.clear()


def _hostport(address: str) -> str:
    return (
        f"[{address}]:{SERVER_PROXY_PORT}" if ":" in address else f"{address}:{SERVER_PROXY_PORT}"
    )
