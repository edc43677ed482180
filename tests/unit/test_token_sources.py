"""The refreshing token source: serve what is valid, refresh ahead, back off after failures."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading

import pytest

from proxy import credentials
from proxy.credentials import CredentialsError, Token


class ScriptedSource(credentials._RefreshingTokenSource):
    """Each fetch returns a token living ``lifetime`` seconds, or raises while ``down``."""

    def __init__(self, lifetime: float) -> None:
        super().__init__("a scripted source")
        self.lifetime = lifetime
        self.down = False
        self.fetches = 0
        self.count_lock = threading.Lock()

    def _fetch(self) -> Token:
        with self.count_lock:
            self.fetches += 1
            n = self.fetches
        if self.down:
            raise CredentialsError("token endpoint unreachable")
        expiry = credentials._utcnow() + dt.timedelta(seconds=self.lifetime)
        return Token(f"token-{n}", expiry)


async def test_a_still_valid_token_is_served_while_its_refresh_fails(monkeypatch):
    source = ScriptedSource(lifetime=3600)
    source.prime()
    # 56m10s later, 3m50s are left: inside the 4-minute refresh margin, far from expiry.
    later = credentials._utcnow() + dt.timedelta(minutes=56, seconds=10)
    monkeypatch.setattr(credentials, "_utcnow", lambda: later)
    source.down = True
    results = await asyncio.gather(*(source.token() for _ in range(12)), return_exceptions=True)
    assert [getattr(r, "value", r) for r in results] == ["token-1"] * 12
    await asyncio.sleep(0.2)  # the one background refresh runs and fails
    assert source.fetches == 2
    # Later callers still get the valid token, and the failure backs off:
    # no new fetch for each of them.
    for _ in range(12):
        assert (await source.token()).value == "token-1"
        await asyncio.sleep(0.05)
    assert source.fetches <= 3


async def test_short_lived_tokens_are_not_refetched_on_every_call():
    source = ScriptedSource(lifetime=60)  # shorter than the 4-minute margin
    source.prime()
    for _ in range(20):
        assert (await source.token()).value == "token-1"
    assert source.fetches == 1


async def test_a_due_token_is_replaced_in_the_background():
    source = ScriptedSource(lifetime=0.8)
    source.prime()
    await asyncio.sleep(0.45)  # past half its life: due, still usable
    assert (await source.token()).value == "token-1"
    await asyncio.sleep(0.1)
    assert source.fetches == 2
    assert (await source.token()).value == "token-2"


async def test_without_a_usable_token_callers_share_one_fetch_and_then_back_off():
    source = ScriptedSource(lifetime=3600)
    source.down = True
    results = await asyncio.gather(*(source.token() for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, CredentialsError) for r in results)
    assert source.fetches == 1
    with pytest.raises(CredentialsError, match="token endpoint unreachable"):
        await source.token()  # within the back-off: the same error, no request
    assert source.fetches == 1
    source.down = False
    await asyncio.sleep(1.05)  # the first back-off is one second
    assert (await source.token()).value == "token-2"


async def test_a_caller_timing_out_does_not_cancel_the_shared_fetch():
    gate = threading.Event()

    class Slow(ScriptedSource):
        def _fetch(self) -> Token:
            gate.wait(5)
            return super()._fetch()

    source = Slow(lifetime=3600)
    with pytest.raises((TimeoutError, asyncio.TimeoutError)):
        await asyncio.wait_for(source.token(), 0.05)
    waiter = asyncio.ensure_future(source.token())
    gate.set()
    assert (await waiter).value == "token-1"
    assert source.fetches == 1


async def test_an_unexpected_exception_is_backed_off_too():
    class Broken(ScriptedSource):
        def _fetch(self) -> Token:
            with self.count_lock:
                self.fetches += 1
            b"\xff".decode()  # e.g. a tool printing bytes that are not UTF-8
            raise AssertionError("unreachable")

    source = Broken(lifetime=3600)
    for _ in range(5):
        with pytest.raises(CredentialsError, match="UnicodeDecodeError"):
            await source.token()
    assert source.fetches == 1
