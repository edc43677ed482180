"""Bounded pools of daemon threads for the control plane's blocking calls.

Admin API requests and token fetches block (requests, google-auth, gcloud).
On asyncio's shared default executor a few slow Admin API calls for one
cluster held every thread, so a healthy instance's dials waited behind them;
and the interpreter joins that executor's threads at exit, so SIGTERM waited
for a hung request. Each pool here serves one kind of work, and its threads
are daemons: an outstanding call never holds the process at exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]


_POOLS: list[DaemonPool] = []


class DaemonPool:
    """Up to ``size`` daemon threads, started on demand, running one kind of blocking call."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._reset()
        _POOLS.append(self)

    def _reset(self) -> None:
        """Empty, with no threads: at creation, and in a forked child, where the
        parent's threads do not exist (jobs would wait for them forever)."""
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending = 0  # queued or running
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on one of the pool's threads.

        Cancelling the await (a timeout) drops a job that has not started;
        one that has started runs to its end, its result unused.
        """
        job: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._pending += 1
            try:
                if self._pending > len(self._threads) and len(self._threads) < self.size:
                    thread = threading.Thread(
                        target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
                    )
                    thread.start()  # counted only once it runs
                    self._threads.append(thread)
            except BaseException:
                if not self._threads:
                    self._pending -= 1
                    raise
                # Some thread exists: the job waits for it.
        self._jobs.put((fn, args, job))
        return await asyncio.wrap_future(job)

    def _work(self) -> None:
        while True:
            fn, args, job = self._jobs.get()
            try:
                if job.set_running_or_notify_cancel():  # False: its caller gave up
                    try:
                        job.set_result(fn(*args))
                    except BaseException as exc:  # handed to the awaiting coroutine
                        job.set_exception(exc)
            finally:
                with self._lock:
                    self._pending -= 1


def _after_fork_in_child() -> None:
    for pool in _POOLS:
        pool._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)

#: Admin API requests (connectionInfo, generateClientCertificate): at most two in
#: flight per instance, so a few stalled clusters cannot take every thread.
ADMIN_API = DaemonPool("admin-api", 64)
#: Token fetches and refreshes (google-auth, gcloud, metadata server) and start-up lookups.
TOKENS = DaemonPool("tokens", 4)
#: /debug/pprof/profile samples (one at a time; see proxy/profiling.py).
PROFILE = DaemonPool("pprof-profile", 1)
#: Reading the configuration again for a reload (a hung file system must not hold the exit).
RELOAD = DaemonPool("reload", 2)
#: Closing the Admin API client at shutdown, behind nothing else.
SHUTDOWN = DaemonPool("shutdown", 1)
