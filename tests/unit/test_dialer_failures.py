"""The dialer's memory of Admin API failures: bounded requests, bounded holds."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import traceback

import pytest
from cryptography.hazmat.primitives import serialization

from proxy import dialer
from proxy.adminapi import ClientCertificate, InstanceAddresses
from proxy.config import Config, InstanceConfig, parse_instance_uri
from proxy.dialer import Dialer
from proxy.emulator.pki import ClusterCA
from proxy.errors import AdminAPIError, DialError, RefreshError
from proxy.keys import KeyPair
from proxy.log import Logger

URI = parse_instance_uri("projects/p/locations/r/clusters/c/instances/i")


@pytest.fixture(scope="module")
def keys():
    return KeyPair.generate()


class FailingClient:
    """Answers every call with ``status`` after ``delay`` seconds, or succeeds when None."""

    def __init__(self, status: int | None, delay: float = 0.05) -> None:
        self.ca = ClusterCA("projects/p/locations/r/clusters/c")
        self.status = status
        self.delay = delay
        self.calls = 0

    async def connection_info(self, uri):
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.status is not None:
            raise AdminAPIError(self.status, "boom", "UNAVAILABLE")
        return InstanceAddresses("127.0.0.1", "", "")

    async def client_certificate(self, uri, public_key_pem):
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.status is not None:
            raise AdminAPIError(self.status, "boom", "UNAVAILABLE")
        key = serialization.load_pem_public_key(public_key_pem.encode())
        leaf = self.ca.client_certificate(key, dt.timedelta(hours=1))
        return ClientCertificate(self.ca.chain_pems(leaf), self.ca.root_pem)


def hold_left(d: Dialer) -> float:
    return d._failures[URI].until - time.monotonic()


async def test_one_failed_lookup_seen_by_many_dials_counts_once(keys):
    client = FailingClient(503)
    d = Dialer(Config(), None, client, keys, Logger(quiet=True))
    results = await asyncio.gather(
        *(d.dial(InstanceConfig(URI)) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, RefreshError) for r in results)
    assert client.calls == 2  # connectionInfo and generateClientCertificate, once
    assert hold_left(d) <= dialer.FAILURE_HOLD  # one 503: the first, shortest hold
    d.close()


async def test_only_throttling_answers_lengthen_the_hold(keys, monkeypatch):
    monkeypatch.setattr(dialer, "FAILURE_HOLD", 0.05)
    client = FailingClient(403)
    d = Dialer(Config(), None, client, keys, Logger(quiet=True))
    d._limiters[URI] = dialer.RateLimiter(burst=100)
    for _ in range(5):
        with pytest.raises(RefreshError):
            await d.dial(InstanceConfig(URI))
        await asyncio.sleep(0.06)
    client.status = 503
    with pytest.raises(RefreshError):
        await d.dial(InstanceConfig(URI))
    assert hold_left(d) <= 0.05  # the 403s before it do not count
    d.close()


async def test_remembered_errors_do_not_pile_up_tracebacks(keys):
    client = FailingClient(403)
    d = Dialer(Config(), None, client, keys, Logger(quiet=True))
    sizes = []
    for _ in range(200):
        try:
            await d.dial(InstanceConfig(URI))
        except RefreshError as exc:
            sizes.append(len(traceback.extract_tb(exc.__traceback__)))
    assert client.calls == 2 and max(sizes) < 10
    d.close()


async def test_a_certificate_that_expired_under_the_dialer_is_replaced_first(keys):
    """After a laptop sleep the cached certificate has expired: the dialer refreshes
    before it dials, and dials with the new one (here to a port nobody listens on)."""

    class ExpiredFirst(FailingClient):
        async def client_certificate(self, uri, public_key_pem):
            self.calls += 1
            key = serialization.load_pem_public_key(public_key_pem.encode())
            lifetime = dt.timedelta(hours=1) if self.calls > 2 else -dt.timedelta(minutes=1)
            leaf = self.ca.client_certificate(key, lifetime)
            return ClientCertificate(self.ca.chain_pems(leaf), self.ca.root_pem)

    client = ExpiredFirst(None, delay=0)
    d = Dialer(Config(), None, client, keys, Logger(quiet=True))
    d._limiters[URI] = dialer.RateLimiter(burst=10)
    with pytest.raises(DialError, match="failed to dial"):
        await d.dial(InstanceConfig(URI))
    assert client.calls == 4  # connectionInfo + certificate, twice
    d.close()
