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

    async def connection_info(self, uri):
        if self.fail:
            raise AdminAPIError(403, "denied", "PERMISSION_DENIED")
        return InstanceAddresses("10.0.0.2", "", "")

    async def client_certificate(self, uri, public_key_pem):
        self.cert_calls += 1
        key = serialization.load_pem_public_key(public_key_pem.encode())
        leaf = self.ca.client_certificate(key, self.lifetime)
        return ClientCertificate(self.ca.chain_pems(leaf), self.ca.root_pem)


async def test_refresh_ahead_keeps_a_valid_certificate_when_refresh_fails(ca, keys):
    client = ScriptedClient(ca, dt.timedelta(hours=1))
    cache = RefreshAheadCache(URI, client, keys, Logger(quiet=True))
    first = await cache.connection_info()
    assert first.addresses == {"PRIVATE": "10.0.0.2"} and first.valid()
    client.fail = True
    cache.force_refresh()
    await asyncio.sleep(0.05)  # the forced refresh runs (burst token) and fails
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
