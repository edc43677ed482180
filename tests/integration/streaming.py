"""Checksummed streams through the proxy to an echo instance: the load under
which the fault matrix and the soak run.

Each stream is one TCP connection to a proxy port whose instance has an echo
backend (``Emulator.add_instance(..., backend=echo)``). It sends a
PostgreSQL StartupMessage (the emulator's front door reads one before it
connects the backend; the echo sends it back), then chunks of random size cut
at random offsets from one random block, with random pauses, and compares
every byte that comes back with what it sent, in order: a duplicated, lost,
reordered or foreign byte is a mismatch at a known offset. At ``finish`` each
stream stops sending and waits for the echo of everything it sent before it
closes; ``lost`` is what was sent and never came back.

All streams run on one event loop on a thread of their own; the methods are
called from the test's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

T = TypeVar("T")

_PARAMS = b"user\x00stream\x00database\x00echo\x00\x00"
STARTUP = struct.pack(">II", 8 + len(_PARAMS), 196608) + _PARAMS
_BLOCK = os.urandom(2 << 20)  # chunks (up to 1 MiB) are cut from it at random offsets
_WINDOW = 256 * 1024  # bytes in flight per stream before the sender waits


def echo_uri(name: str, cluster: str = "clust") -> str:
    """An instance URI for an echo instance (``Emulator.add_instance(uri, backend=echo)``)."""
    return f"projects/project-id/locations/us-central1/clusters/{cluster}/instances/{name}"


class Mismatch(Exception):
    """An echoed byte differs from the byte sent at that offset."""


ENDINGS = ("close", "half-close", "reset")


@dataclass
class Stream:
    """One connection. With a ``budget`` it sends that many bytes and then ends as
    ``ending`` says: "close" waits for every echo and closes; "half-close" waits
    for every echo, shuts its write side and expects the proxy's EOF; "reset"
    aborts with an RST at once, whatever is in flight (so ``lost`` is not
    counted). ``rounds`` makes it send in request-response rounds instead of
    streaming: a 1 MiB echo with probability ``big``, else a 100-byte ping whose
    round trip is kept in ``latencies`` as (time, seconds)."""

    ident: int
    port: int
    budget: int | None = None
    ending: str = "close"
    rounds: bool = False
    big: float = 0.0
    sent: int = 0
    verified: int = 0
    error: str | None = None  # why it ended before finish, or failed at it
    finished: bool = False  # stopped at finish() with every byte back
    lost: int = 0  # sent but never echoed (counted when it ended)
    ended_at: float | None = None
    open_s: float = 0.0  # how long add() waited for it to open (or give up)
    latencies: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def alive(self) -> bool:
        return self.ended_at is None

    @property
    def opened(self) -> bool:
        """Its StartupMessage came back: it was connected through to the instance."""
        return self.verified >= len(STARTUP)


class StreamingLoad:
    """``streams`` connections spread over ``ports`` (round robin)."""

    def __init__(
        self,
        ports: int | list[int],
        streams: int = 50,
        *,
        max_chunk: int = 16384,
        max_pause: float = 0.04,
        host: str = "127.0.0.1",
    ) -> None:
        self.ports = [ports] if isinstance(ports, int) else list(ports)
        self.count = streams
        self.max_chunk = max_chunk
        self.max_pause = max_pause
        self.host = host
        self.streams: list[Stream] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="load", daemon=True)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._stopping: asyncio.Event | None = None

    # ---- from the test's thread ------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Open every stream; returns once each had its StartupMessage echoed."""
        self._thread.start()
        self._call(self._make_stop_event(), timeout)
        for i in range(self.count):
            self.add(self.ports[i % len(self.ports)], timeout=timeout)
        return self

    def add(self, port: int, timeout: float = 30.0, **options: Any) -> Stream:
        """One more stream on ``port`` (``options``: Stream's budget, ending, rounds,
        big); returns once it is open and echoing (or has failed: then its
        ``error`` says why)."""
        if options.get("ending", "close") not in ENDINGS:
            raise ValueError(f"ending must be one of {ENDINGS}")
        stream = Stream(ident=len(self.streams), port=port, **options)
        self.streams.append(stream)
        began = time.monotonic()
        try:
            self._call(self._open(stream), timeout)
        except TimeoutError:
            stream.error = f"not open after {timeout} s"
            self._call(self._abort(stream), 30)
        stream.open_s = time.monotonic() - began
        return stream

    def wait_progress(
        self,
        bytes_each: int = 64 * 1024,
        timeout: float = 30.0,
        streams: list[Stream] | None = None,
    ) -> None:
        """Wait until every stream that is alive (of ``streams``, default all) has
        had ``bytes_each`` more bytes echoed and checked; fail naming the laggards,
        or if none of them is alive."""
        chosen = [s for s in (self.streams if streams is None else streams) if s.alive]
        if not chosen:
            raise AssertionError("no stream alive to make progress")
        start = {s.ident: s.verified for s in chosen}
        deadline = time.monotonic() + timeout
        while True:
            behind = [s for s in chosen if s.verified - start[s.ident] < bytes_each]
            if not behind:
                return
            broken = [s for s in chosen if s.error is not None]
            if broken or time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(behind)} of {len(chosen)} streams made no progress of {bytes_each} "
                    f"bytes in {timeout} s; ended with errors: "
                    + "; ".join(f"#{s.ident}: {s.error}" for s in broken[:5])
                )
            time.sleep(0.05)

    def wait_ended(self, streams: list[Stream], timeout: float = 30.0) -> None:
        """Wait until each of ``streams`` has ended (error or not)."""
        deadline = time.monotonic() + timeout
        while any(s.alive for s in streams):
            if time.monotonic() > deadline:
                alive = [s.ident for s in streams if s.alive]
                raise AssertionError(f"streams {alive} still open after {timeout} s")
            time.sleep(0.05)

    def finish(self, timeout: float = 60.0) -> list[Stream]:
        """Stop sending, wait for every stream's last echo, close; the streams."""
        self._loop.call_soon_threadsafe(self._signal_stop)
        alive = [s for s in self.streams if s.alive]
        with contextlib.suppress(AssertionError):
            self.wait_ended(alive, timeout)
        for s in self.streams:
            if s.alive:
                s.error = s.error or f"echo incomplete {timeout} s after the stop"
        self.close()
        return self.streams

    def close(self) -> None:
        """Abort whatever still runs and stop the thread (safe to call twice)."""
        if not self._thread.is_alive():
            return

        async def cancel_all() -> None:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(cancel_all(), 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- on the load's loop ------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _make_stop_event(self) -> None:
        self._stopping = asyncio.Event()

    async def _abort(self, stream: Stream) -> None:
        task = self._tasks.get(stream.ident)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _open(self, stream: Stream) -> None:
        opened = self._loop.create_future()
        self._tasks[stream.ident] = self._loop.create_task(self._run(stream, opened))
        await opened

    def _signal_stop(self) -> None:
        assert self._stopping is not None
        self._stopping.set()

    async def _run(self, st: Stream, opened: asyncio.Future[None]) -> None:
        assert self._stopping is not None
        stopping = self._stopping
        rng = random.Random(st.ident)
        pending = bytearray()  # sent, not echoed yet
        room, drained = asyncio.Event(), asyncio.Event()
        room.set()
        half_closed = False
        writer: asyncio.StreamWriter | None = None

        async def receive(reader: asyncio.StreamReader) -> None:
            while data := await reader.read(65536):
                if pending[: len(data)] != data:
                    raise Mismatch(f"echo differs from what was sent at offset {st.verified}")
                del pending[: len(data)]
                st.verified += len(data)
                if len(pending) < _WINDOW:
                    room.set()
                if not pending:
                    drained.set()
                if not opened.done() and st.verified >= len(STARTUP):
                    opened.set_result(None)

        def more() -> bool:
            return not stopping.is_set() and (st.budget is None or st.sent < st.budget)

        async def stream_chunks(writer: asyncio.StreamWriter) -> None:
            while more():
                n = rng.randint(1, self.max_chunk)
                if st.budget is not None:
                    n = min(n, st.budget - st.sent)
                at = rng.randrange(0, len(_BLOCK) - n)
                pending.extend(_BLOCK[at : at + n])
                st.sent += n
                writer.write(_BLOCK[at : at + n])
                await writer.drain()
                if len(pending) >= _WINDOW:
                    room.clear()
                    await room.wait()
                if self.max_pause:
                    await asyncio.sleep(rng.uniform(0, self.max_pause))

        async def request_rounds(writer: asyncio.StreamWriter) -> None:
            while more():
                n = (1 << 20) if rng.random() < st.big else 100
                at = rng.randrange(0, len(_BLOCK) - n)
                began = time.monotonic()
                drained.clear()
                pending.extend(_BLOCK[at : at + n])
                st.sent += n
                writer.write(_BLOCK[at : at + n])
                await writer.drain()
                await drained.wait()
                if n == 100:
                    st.latencies.append((began, time.monotonic() - began))
                if self.max_pause:
                    await asyncio.sleep(rng.uniform(0, self.max_pause))

        async def send(writer: asyncio.StreamWriter) -> None:
            writer.write(STARTUP)
            pending.extend(STARTUP)
            st.sent += len(STARTUP)
            await asyncio.shield(opened)  # cancelling send must not cancel add()'s wait
            await (request_rounds(writer) if st.rounds else stream_chunks(writer))
            if st.ending == "reset" and st.budget is not None:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            # Wait for the echo of every byte sent, then close. Not by a
            # half-close while bytes are in flight: a TLS server on asyncio (the
            # emulator's instance is one) ends the whole connection on
            # close_notify and drops what it still had to send.
            while pending:
                drained.clear()
                await drained.wait()
            # A byte after the last one sent would be a duplicate or a stranger:
            # receive() fails on it (nothing is pending). Give one a moment to come.
            await asyncio.sleep(0.1)
            if st.ending == "half-close":
                nonlocal half_closed
                half_closed = True
                writer.write_eof()
                await asyncio.sleep(30)  # the proxy's EOF ends receive() first

        try:
            reader, writer = await asyncio.open_connection(self.host, st.port)
            receiving = asyncio.ensure_future(receive(reader))
            sending = asyncio.ensure_future(send(writer))
            try:
                done, _ = await asyncio.wait(
                    {receiving, sending}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    task.result()  # raises the first failure
            finally:
                for task in (receiving, sending):
                    task.cancel()
                await asyncio.gather(receiving, sending, return_exceptions=True)
            if sending in done and st.ending == "half-close":
                st.error = "no EOF from the proxy within 30 s of the half-close"
            elif sending in done or (half_closed and not pending):
                st.finished = True
                if st.ending == "reset":
                    pending.clear()  # dropped on purpose
            else:
                st.error = f"EOF from the proxy after {st.verified} of {st.sent} bytes"
        except asyncio.CancelledError:
            st.error = st.error or "cancelled"
        except Exception as exc:  # a reset, a mismatch, or a bug here: never silent
            st.error = f"{type(exc).__name__}: {exc}"
        finally:
            st.lost = len(pending)
            st.ended_at = time.monotonic()
            if not opened.done():
                opened.set_result(None)
            if writer is not None:
                writer.transport.abort()
