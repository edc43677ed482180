"""Refresh-ahead and lazy caches against a scripted Admin API client (real certificates)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.adminapi import ClientCertificate, InstanceAddresses
from proxy.cache import LazyCache, RefreshAheadCache
from proxy.config import parse_instance_uri
from proxy.emulator.pki import ClusterCA
from proxy.errors import AdminAPIError, RefreshError
from proxy.keys import KeyPair
from proxy.log import Logger
from proxy.refresh import RateLimiter

URI = parse_instance_uri("projects/p/locations/r/clusters/c/instances/i")


@pytest.fixture(scope="module")
def ca():
    return ClusterCA("projects/p/locations/r/clusters/c")


@pytest.fixture(scope="module")
def keys():
    return KeyPair.generate()


class ScriptedClient:
    """Answers like the Admin API; ``fail`` makes the next calls raise 403."""

    def __init__(self, ca, lifetime):
        self.ca = ca
        self.lifetime = lifetime
        self.fail = False
        self.cert_calls = 0
        self.info_calls = 0

    async def connection_info(self, uri):
        self.info_calls += 1
        if self.fail:
            raise AdminAPIError(403, "denied", "PERMISSION_DENIED")
        return InstanceAddresses("10.0.0.2", "", "")

    async def client_certificate(self, uri, public_key_pem):
        self.cert_calls += 1
        key = serialization.load_pem_public_key(public_key_pem.encode())
        leaf = self.ca.client_certificate(key, self.lifetime)
        return ClientCertificate(self.ca.chain_pems(leaf), self.ca.root_pem)


async def test_refresh_ahead_keeps_a_valid_certificate_when_refresh_fails(ca, keys):
    from proxy.metrics import Metrics

    metrics = Metrics()
    client = ScriptedClient(ca, dt.timedelta(hours=1))
    cache = RefreshAheadCache(URI, client, keys, Logger(quiet=True), metrics)
    first = await cache.connection_info()
    assert first.addresses == {"PRIVATE": "10.0.0.2"} and first.valid()
    assert client.info_calls == 1
    client.fail = True
    cache.force_refresh()
    await asyncio.sleep(0.05)  # the forced refresh runs (burst token) and fails
    assert client.info_calls == 2  # it really asked the API again
    assert metrics.refresh_failure == {(URI.short, "PERMISSION_DENIED"): 1}
    assert metrics.refresh_success == {URI.short: 1}
    assert await cache.connection_info() is first
    cache.close()


async def test_refresh_ahead_first_failure_reaches_callers(ca, keys):
    client = ScriptedClient(ca, dt.timedelta(hours=1))
    client.fail = True
    cache = RefreshAheadCache(URI, client, keys, Logger(quiet=True))
    with pytest.raises(RefreshError, match="failed to get instance metadata"):
        await cache.connection_info()
    cache.close()


async def test_short_certificate_is_refreshed_at_once_within_the_rate_limit(ca, keys):
    # Under 4 minutes left: refresh immediately; the bucket allows 2, then 1 per 30 s.
    client = ScriptedClient(ca, dt.timedelta(minutes=2))
    cache = RefreshAheadCache(URI, client, keys, Logger(quiet=True))
    await cache.connection_info()
    await asyncio.sleep(0.3)
    assert client.cert_calls == 2
    cache.close()


async def test_lazy_cache_refreshes_only_when_needed(ca, keys):
    client = ScriptedClient(ca, dt.timedelta(hours=1))
    cache = LazyCache(URI, client, keys, Logger(quiet=True))
    first = await cache.connection_info()
    assert await cache.connection_info() is first
    cache.force_refresh()
    assert await cache.connection_info() is not first
    assert client.cert_calls == 2


class SlowClient(ScriptedClient):
    """Every call takes ``delay`` seconds; ``info_calls`` counts connectionInfo requests."""

    def __init__(self, ca, lifetime, delay):
        super().__init__(ca, lifetime)
        self.delay = delay

    async def connection_info(self, uri):
        await asyncio.sleep(self.delay)
        return await super().connection_info(uri)

    async def client_certificate(self, uri, public_key_pem):
        await asyncio.sleep(self.delay)
        return await super().client_certificate(uri, public_key_pem)


@pytest.mark.parametrize("kind", [LazyCache, RefreshAheadCache])
async def test_callers_timing_out_share_one_fetch_that_completes(ca, keys, kind):
    """An Admin API slower than the dial timeout: each dial gives up, but the one
    fetch goes on, and a later dial gets its result (lazy refresh never did)."""
    client = SlowClient(ca, dt.timedelta(hours=1), delay=0.6)
    cache = kind(URI, client, keys, Logger(quiet=True))
    for _ in range(4):
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await asyncio.wait_for(cache.connection_info(), 0.1)
    info = await asyncio.wait_for(cache.connection_info(), 0.5)
    assert info.valid()
    assert (client.info_calls, client.cert_calls) == (1, 1)
    cache.close()


async def test_a_second_forced_refresh_does_not_cancel_the_first_ones_waiter(ca, keys):
    client = ScriptedClient(ca, -dt.timedelta(minutes=1))  # every certificate already expired
    # A large burst: this is about cancellation, not the rate limit.
    limiter = RateLimiter(burst=10)
    cache = RefreshAheadCache(URI, client, keys, Logger(quiet=True), limiter=limiter)
    assert not (await cache.connection_info()).valid()

    async def dial() -> object:
        # What the dialer does with an expired certificate, twice in one loop iteration.
        cache.force_refresh()
        return await cache.connection_info()

    results = await asyncio.gather(dial(), dial(), return_exceptions=True)
    assert not any(isinstance(r, BaseException) for r in results), results
    cache.close()


@pytest.mark.parametrize("kind", [LazyCache, RefreshAheadCache])
async def test_closing_the_cache_fails_its_waiters_with_an_error(ca, keys, kind):
    client = SlowClient(ca, dt.timedelta(hours=1), delay=5)
    cache = kind(URI, client, keys, Logger(quiet=True))
    waiter = asyncio.ensure_future(cache.connection_info())
    await asyncio.sleep(0.05)
    cache.close()
    with pytest.raises(RefreshError, match="cache closed before the refresh completed"):
        await waiter


async def test_caches_of_one_instance_share_its_rate_limiter(ca, keys):
    """A new cache after an eviction gets no fresh burst: the limiter is the instance's."""
    limiter = RateLimiter()
    client = ScriptedClient(ca, dt.timedelta(hours=1))
    client.fail = True
    for _ in range(2):
        cache = RefreshAheadCache(URI, client, keys, Logger(quiet=True), limiter=limiter)
        with pytest.raises(RefreshError):
            await cache.connection_info()
        cache.close()
    assert limiter.wait_time() > 25  # the burst of two is spent


async def test_an_old_failure_is_not_handed_to_the_next_caller(ca, keys):
    """A refresh failed (say, in the background while nobody dialled) and the API has
    recovered since: a caller soon after gets the failure, a later one a fresh fetch."""
    client = ScriptedClient(ca, dt.timedelta(hours=1))
    client.fail = True
    cache = RefreshAheadCache(URI, client, keys, Logger(quiet=True))
    with pytest.raises(RefreshError):
        await cache.connection_info()
    client.fail = False
    with pytest.raises(RefreshError):  # within a second: the same failure, no request
        await cache.connection_info()
    assert client.cert_calls <= 1
    await asyncio.sleep(1.1)
    assert (await cache.connection_info()).addresses == {"PRIVATE": "10.0.0.2"}
    cache.close()
