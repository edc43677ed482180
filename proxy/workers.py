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
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, asyncio.Future[Any]]


class DaemonPool:
    """Up to ``size`` daemon threads, started on demand, running one kind of blocking call."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending = 0  # queued or running
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on one of the pool's threads; cancelling the await abandons it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._pending += 1
            if self._pending > len(self._threads) and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._jobs.put((fn, args, loop, done))
        return await done

    def _work(self) -> None:
        while True:
            fn, args, loop, done = self._jobs.get()
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_settle, done, result, error)
            with self._lock:
                self._pending -= 1


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():
        return  # the caller gave up (timeout, cancellation)
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


#: Admin API requests (connectionInfo, generateClientCertificate): at most two in
#: flight per instance, so a few stalled clusters cannot take every thread.
ADMIN_API = DaemonPool("admin-api", 64)
#: Token fetches and refreshes (google-auth, gcloud, metadata server) and start-up lookups.
TOKENS = DaemonPool("tokens", 4)
#: Closing the Admin API client at shutdown, behind nothing else.
SHUTDOWN = DaemonPool("shutdown", 1)
