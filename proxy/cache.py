"""Per-instance connection info: addresses, client certificate and TLS context.

Three strategies behind one interface (``connection_info``, ``force_refresh``,
``close``):

* ``RefreshAheadCache`` (default): the first refresh starts at once and
  callers wait for it; later refreshes run in the background ahead of expiry.
  A failed background refresh is retried at once while the old certificate
  keeps serving; once no valid certificate is left, the failure goes to the
  callers and the dialer decides when to ask again.
* ``LazyCache`` (``--lazy-refresh``): no background work; a caller refreshes
  when the cached certificate is within 4 minutes of expiry.

Both share one fetch among all callers and shield it: a caller that gives up
(the dial timeout) does not cancel what the others wait for, so an Admin API
slower than the dial timeout still gets through. Every fetch passes the
instance's rate limiter, which the dialer owns. The RSA key is generated once
per process (``proxy.keys``), off the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass
from typing import Protocol

from proxy import tracing
from proxy.adminapi import AdminAPIClient
from proxy.config import InstanceURI
from proxy.dataplane import plane
from proxy.errors import AdminAPIError, AdminAPIUnreachable, ConfigError, RefreshError
from proxy.keys import KeyPair
from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.refresh import RateLimiter, lazy_needs_refresh, seconds_until_refresh


@dataclass(frozen=True)
class ConnectionInfo:
    addresses: dict[str, str]
    context: plane.TLSClientContext
    expiry: float  # UNIX time when the client certificate stops being valid

    def valid(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expiry


ROLES_HINT = (
    "hint: the IAM principal needs the roles roles/alloydb.client and "
    "roles/serviceusage.serviceUsageConsumer on the instance's project"
)


def _with_hint(exc: AdminAPIError | AdminAPIUnreachable) -> str:
    return f"{exc}; {ROLES_HINT}" if getattr(exc, "status", 0) == 403 else str(exc)


async def fetch_connection_info(
    client: AdminAPIClient, uri: InstanceURI, keys: KeyPair
) -> ConnectionInfo:
    """Both Admin API calls, concurrently, turned into a ready TLS context."""
    addresses_call = asyncio.ensure_future(
        tracing.traced(tracing.FETCH_METADATA, uri.short, lambda: client.connection_info(uri))
    )
    cert_call = asyncio.ensure_future(
        tracing.traced(
            tracing.FETCH_CERT, uri.short, lambda: client.client_certificate(uri, keys.public_pem)
        )
    )
    try:
        addresses = await addresses_call
    except BaseException as exc:
        # Whatever failed, the sibling call must not outlive us unobserved.
        cert_call.cancel()
        await asyncio.gather(cert_call, return_exceptions=True)
        if isinstance(exc, (AdminAPIError, AdminAPIUnreachable)):
            raise RefreshError(
                "failed to get instance metadata",
                uri.short,
                _with_hint(exc),
                status=getattr(exc, "status", None),
                reason=getattr(exc, "codes", ""),
            ) from exc
        raise
    try:
        cert = await cert_call
    except (AdminAPIError, AdminAPIUnreachable) as exc:
        raise RefreshError(
            "create ephemeral cert failed",
            uri.short,
            _with_hint(exc),
            status=getattr(exc, "status", None),
            reason=getattr(exc, "codes", ""),
        ) from exc
    if not addresses.as_map():
        raise ConfigError(
            "cannot connect to instance - it has no supported IP addresses", uri.short
        )
    try:
        from cryptography import x509  # not at start-up: about 13 ms

        leaf = x509.load_pem_x509_certificate(cert.chain_pem[0].encode())
        chain = "".join(p if p.endswith("\n") else p + "\n" for p in cert.chain_pem)
        context = plane.TLSClientContext(chain.encode(), keys.private_pem, cert.ca_pem.encode())
    except ValueError as exc:
        raise RefreshError("create ephemeral cert failed", uri.short, exc) from exc
    return ConnectionInfo(
        addresses=addresses.as_map(),
        context=context,
        expiry=leaf.not_valid_after_utc.timestamp(),
    )


def _record_refresh(metrics: Metrics | None, short: str, error: BaseException | None) -> None:
    if metrics is None:
        return
    if error is None:
        metrics.refresh_success[short] += 1
    else:
        code = getattr(error, "reason", "") or type(error).__name__
        metrics.refresh_failure[(short, code)] += 1


class ConnectionInfoCache(Protocol):
    async def connection_info(self) -> ConnectionInfo: ...

    def force_refresh(self) -> None: ...

    def close(self) -> None: ...


class _InstanceCache:
    """What both strategies share: the instance, the API client, the key, and
    one fetch that also counts refresh successes and failures for metrics."""

    def __init__(
        self,
        uri: InstanceURI,
        client: AdminAPIClient,
        keys: KeyPair,
        log: Logger,
        metrics: Metrics | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._uri = uri
        self._client = client
        self._keys = keys
        self._log = log
        self._metrics = metrics
        # The dialer keeps one limiter per instance, so a new cache after a
        # failure does not come with a fresh burst.
        self._limiter = limiter or RateLimiter()
        self._closed = False

    async def _fetch(self) -> ConnectionInfo:
        try:
            with tracing.span(tracing.REFRESH, self._uri.short):
                info = await fetch_connection_info(self._client, self._uri, self._keys)
        except Exception as exc:
            _record_refresh(self._metrics, self._uri.short, exc)
            raise
        _record_refresh(self._metrics, self._uri.short, None)
        return info

    async def _shared(self, task: asyncio.Task[ConnectionInfo]) -> ConnectionInfo:
        """Wait for a fetch others may share: shielded, so one caller's timeout
        does not cancel it; one that ``close()`` cancelled becomes an error
        (unless the caller itself is being cancelled too)."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            cancelling = getattr(me, "cancelling", None)  # 3.11+
            if task.cancelled() and self._closed and not (cancelling and cancelling()):
                raise RefreshError(
                    "connection info cache closed before the refresh completed", self._uri.short
                ) from None
            raise


#: A failed refresh older than this is not handed to a new caller: it asks again.
STALE_FAILURE = 1.0


class RefreshAheadCache(_InstanceCache):
    """Refreshes in the background ahead of expiry (see the module docstring).

    ``_current`` is the task whose result callers get; ``_next`` the refresh
    scheduled after it (None when nothing is scheduled). Neither is ever
    cancelled while callers may wait for it, except by ``close()``, whose
    waiters get a RefreshError saying so.
    """

    def __init__(
        self,
        uri: InstanceURI,
        client: AdminAPIClient,
        keys: KeyPair,
        log: Logger,
        metrics: Metrics | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__(uri, client, keys, log, metrics, limiter)
        self._log.debug("[%s] Connection info cache = refresh ahead", uri.short)
        self._next_started = False
        self._next_immediate = True
        self._next: asyncio.Task[ConnectionInfo] | None = self._schedule(0.0)
        self._current: asyncio.Task[ConnectionInfo] = self._next
        self._failed_at = 0.0  # time.monotonic() of the failure callers get, if any

    async def connection_info(self) -> ConnectionInfo:
        cur = self._current
        if (
            cur.done()
            and not cur.cancelled()
            and cur.exception() is not None
            and time.monotonic() - self._failed_at > STALE_FAILURE
        ):
            # The failure is old (e.g. from a background refresh while idle):
            # ask again rather than hand out an error the API may have outgrown.
            self.force_refresh()
        return await self._shared(self._current)

    def _current_is_valid(self) -> bool:
        cur = self._current
        if not cur.done() or cur.cancelled() or cur.exception() is not None:
            return False
        return cur.result().valid()

    def force_refresh(self) -> None:
        if self._closed:
            return
        if self._next is None or not (self._next_started or self._next_immediate):
            # Only a delayed refresh is replaced: nobody waits for one.
            if self._next is not None:
                self._next.cancel()
            self._log.debug(
                "[%s] Connection info refresh operation scheduled immediately", self._uri.short
            )
            self._next = self._schedule(0.0)
        if not self._current_is_valid():
            self._current = self._next

    def close(self) -> None:
        self._closed = True
        for task in (self._next, self._current):
            if task is not None and not task.done():
                task.cancel()  # its waiters get a RefreshError (see _shared)

    def _schedule(self, delay: float) -> asyncio.Task[ConnectionInfo]:
        self._next_started = False
        self._next_immediate = delay <= 0
        # In a context of its own: a refresh is no part of the dial that happened
        # to start it (its trace span is a root, as the Go connector's).
        task = contextvars.Context().run(
            asyncio.get_running_loop().create_task, self._refresh_after(delay)
        )
        # A failed refresh is reported to its waiters; don't also warn about it.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _refresh_after(self, delay: float) -> ConnectionInfo:
        short = self._uri.short
        if delay > 0:
            await asyncio.sleep(delay)
        self._next_started = True
        await self._limiter.acquire()
        self._log.debug(
            "[%s] Connection info refresh operation started (type = refresh ahead)", short
        )
        this = asyncio.current_task()
        try:
            info = await self._fetch()
        except Exception as exc:
            self._log.debug("[%s] Connection info refresh operation failed: %s", short, exc)
            if not self._closed:
                if self._current_is_valid():
                    # The old certificate still serves: retry at once (rate limited).
                    self._next = self._schedule(0.0)
                else:
                    # Callers get this failure; the dialer drops the cache and
                    # decides when the Admin API is asked again.
                    self._current = this  # type: ignore[assignment]
                    self._next = None
                    self._failed_at = time.monotonic()
            raise
        self._log.debug(
            "[%s] Connection info refresh operation complete (type = refresh ahead)", short
        )
        self._log.debug(
            "[%s] Current certificate expiration = %s",
            short,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.expiry)),
        )
        if not self._closed:
            self._current = this  # type: ignore[assignment]
            wait = seconds_until_refresh(info.expiry, time.time())
            self._log.debug(
                "[%s] Connection info refresh operation scheduled at %s (now + %ds)",
                short,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + wait)),
                int(wait),
            )
            self._next = self._schedule(wait)
        return info


class LazyCache(_InstanceCache):
    """Refreshes only when a caller finds the certificate near expiry: one shared
    fetch at a time, which a caller's timeout does not cancel."""

    def __init__(
        self,
        uri: InstanceURI,
        client: AdminAPIClient,
        keys: KeyPair,
        log: Logger,
        metrics: Metrics | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__(uri, client, keys, log, metrics, limiter)
        self._info: ConnectionInfo | None = None
        self._force = False
        self._fetching: asyncio.Task[ConnectionInfo] | None = None
        self._log.debug("[%s] Connection info cache = lazy", uri.short)

    async def connection_info(self) -> ConnectionInfo:
        info = self._info
        if (
            info is not None
            and not self._force
            and not lazy_needs_refresh(info.expiry, time.time())
        ):
            self._log.debug(
                "[%s] Connection info is still valid, using cached info (type = lazy)",
                self._uri.short,
            )
            return info
        if self._fetching is None:
            self._log.debug(
                "[%s] Connection info refresh operation started (type = lazy)", self._uri.short
            )
            self._fetching = asyncio.get_running_loop().create_task(self._fetch_once())
            self._fetching.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await self._shared(self._fetching)

    async def _fetch_once(self) -> ConnectionInfo:
        try:
            await self._limiter.acquire()
            info = await self._fetch()
            if not self._closed:
                self._info, self._force = info, False
            return info
        finally:
            self._fetching = None

    def force_refresh(self) -> None:
        self._force = True

    def close(self) -> None:
        self._closed = True
        self._info = None
        if self._fetching is not None:
            self._fetching.cancel()
