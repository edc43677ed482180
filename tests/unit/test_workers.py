"""proxy.workers: the control plane's daemon thread pools."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from proxy.workers import DaemonPool


def test_results_exceptions_and_bounded_threads():
    pool = DaemonPool("t", 2)
    seen: set[str] = set()

    def work(n: int) -> int:
        seen.add(threading.current_thread().name)
        time.sleep(0.05)
        if n == 3:
            raise ValueError("three")
        return n * 2

    async def main():
        results = await asyncio.gather(
            *(pool.run(work, n) for n in range(6)), return_exceptions=True
        )
        assert results[:3] == [0, 2, 4] and isinstance(results[3], ValueError)
        assert results[4:] == [8, 10]

    asyncio.run(main())
    assert len(seen) == 2 and all(t.startswith("t-") for t in seen)
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("t-"))


def test_a_job_whose_caller_gave_up_before_it_started_never_runs():
    pool = DaemonPool("c", 1)
    ran: list[int] = []
    gate = threading.Event()

    def work(n: int) -> None:
        if n == 0:
            gate.wait(5)
        ran.append(n)

    async def main():
        first = asyncio.ensure_future(pool.run(work, 0))
        for n in range(1, 11):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pool.run(work, n), 0.01)
        gate.set()
        await first
        assert await pool.run(work, 99) is None

    asyncio.run(main())
    assert ran == [0, 99]


def test_a_thread_that_cannot_start_does_not_wedge_the_pool(monkeypatch):
    pool = DaemonPool("s", 1)
    real_start = threading.Thread.start
    calls = {"n": 0}

    def failing_start(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", failing_start)

    async def main():
        with pytest.raises(RuntimeError):
            await pool.run(lambda: 1)
        assert await asyncio.wait_for(pool.run(lambda: 2), 2) == 2

    asyncio.run(main())
