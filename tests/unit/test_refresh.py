import pytest

from proxy.refresh import RateLimiter, lazy_needs_refresh, seconds_until_refresh


@pytest.mark.parametrize(
    ("left", "delay"),
    [(3600, 1800), (7200, 3600), (3599, 3599 - 240), (300, 60), (239, 0), (-5, 0)],
)
def test_refresh_delay(left, delay):
    assert seconds_until_refresh(1000.0 + left, 1000.0) == pytest.approx(delay)


def test_lazy_threshold():
    assert not lazy_needs_refresh(1000.0 + 241, 1000.0)
    assert lazy_needs_refresh(1000.0 + 240, 1000.0)


def test_rate_limiter_burst_then_interval():
    now = [0.0]
    limiter = RateLimiter(burst=2, interval=30.0, clock=lambda: now[0])
    assert limiter.wait_time() == 0
    limiter._tokens -= 1
    assert limiter.wait_time() == 0
    limiter._tokens -= 1
    assert limiter.wait_time() == pytest.approx(30.0)
    now[0] = 15.0
    assert limiter.wait_time() == pytest.approx(15.0)
    now[0] = 30.0
    assert limiter.wait_time() == 0


async def test_rate_limiter_acquire_waits():
    limiter = RateLimiter(burst=1, interval=0.05)
    await limiter.acquire()
    import time

    start = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - start >= 0.03
