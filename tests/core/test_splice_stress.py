"""Randomised differential stress test of the splice core.

Hundreds of seeded runs, several connections on the data-plane thread at
once. Each run picks sizes, chunking and pauses on both ends, small socket
buffers, and who ends the stream (the client with a half-close, the
instance with close_notify, or the instance with a bare TCP FIN), then
checks exactly: what each side received against what the other sent, and
the outcome the splice reports. A failure names the seed and the plan:
`STRESS_SEEDS=<seed> pytest tests/core/test_splice_stress.py` replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
from dataclasses import dataclass

import pytest

from proxy.dataplane import plane as _splice

from .conftest import server_context
from .splicing import pattern, spliced

RUNS = int(os.environ.get("STRESS_RUNS", "240"))  # connections per loop kind
AT_ONCE = 4
# Small send buffers everywhere, small receive buffers on the unix socket
# pair only: a TCP receive buffer far below loopback's 64 KiB MSS only
# measures zero-window probing (hundreds of ms per window), not the splice.
BUFFERS = [None, None, 2048, 4096, 16384]
# Longer than any run: the linger deadline is tested on its own.
LINGER = 120.0


@dataclass
class Plan:
    seed: int
    ending: str  # "client" | "instance" | "truncate"
    client_bytes: int
    instance_bytes: int
    instance_after_eof: int  # bytes the instance sends after the client's EOF ("client")
    client_chunk: int
    client_read: int
    instance_chunk: int
    instance_read: int
    pause_p: float
    proxy_sndbuf: int | None
    proxy_rcvbuf: int | None
    client_rcvbuf: int | None
    instance_sndbuf: int | None
    server_sndbuf: int | None

    @classmethod
    def draw(cls, seed: int) -> Plan:
        rnd = random.Random(seed)

        def size() -> int:
            return rnd.choice([0, 1, 100, rnd.randrange(1, 300_000)])

        def chunk(total: int, choices: list[int]) -> int:
            # Tiny chunks, but at most a few hundred of them per run.
            n = rnd.choice(choices)
            while total // n > 300:
                n *= 8
            return n

        ending = rnd.choice(["client", "client", "instance", "truncate"])
        client_bytes = 0 if ending == "truncate" else size()
        instance_bytes = size()
        after_eof = size() if ending == "client" else 0
        return cls(
            seed=seed,
            ending=ending,
            client_bytes=client_bytes,
            instance_bytes=instance_bytes,
            instance_after_eof=after_eof,
            client_chunk=chunk(client_bytes, [1, 17, 1000, 8192, 65536]),
            client_read=chunk(instance_bytes + after_eof, [7, 1000, 3000, 65536]),
            instance_chunk=chunk(instance_bytes + after_eof, [7, 1000, 16384, 100_000]),
            instance_read=chunk(client_bytes, [7, 1000, 65536]),
            pause_p=rnd.choice([0.0, 0.05, 0.3]),
            proxy_sndbuf=rnd.choice(BUFFERS),
            proxy_rcvbuf=rnd.choice(BUFFERS),
            client_rcvbuf=rnd.choice(BUFFERS),
            instance_sndbuf=rnd.choice(BUFFERS),
            server_sndbuf=rnd.choice(BUFFERS),
        )

    def expected_outcome(self) -> tuple[int, str]:
        return {
            "client": (_splice.CLIENT_CLOSED, ""),
            "instance": (_splice.INSTANCE_CLOSED, ""),
            "truncate": (_splice.ERROR_READ_INSTANCE, "unexpected EOF"),
        }[self.ending]


async def pause(rnd: random.Random, p: float) -> None:
    if p and rnd.random() < p:
        await asyncio.sleep(rnd.choice([0, 0.0005, 0.002]))


class MemoryTLS:
    """A TLS server connection driven by hand (ssl.SSLObject over a raw socket).

    Unlike asyncio's SSL transport it keeps writing after the peer's
    close_notify, and it can end with a bare FIN, as an instance may.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext):
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.lock = asyncio.Lock()  # one sender at a time, in the order produced
        self.loop = asyncio.get_running_loop()

    async def flush(self) -> None:
        async with self.lock:
            data = self.outgoing.read()
            if data:
                await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        data = await self.loop.sock_recv(self.sock, 65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                await self._fill()
        await self.flush()

    async def recv(self, n: int) -> bytes:
        """Up to n bytes; b"" at close_notify or at a bare EOF."""
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                await self.flush()  # e.g. a KeyUpdate reply
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def send(self, data: bytes) -> None:
        self.obj.write(data)
        await self.flush()

    async def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLError):  # it waits for the peer's
            self.obj.unwrap()  # ours is in outgoing now
        await self.flush()


class Instance:
    """The instance side, scripted per connection by its plan."""

    def __init__(self, plan: Plan, ctx: ssl.SSLContext):
        self.plan = plan
        self.ctx = ctx
        self.rnd = random.Random(plan.seed * 7 + 1)
        self.received = bytearray()
        self.sent = pattern(plan.instance_bytes + plan.instance_after_eof, seed=plan.seed)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]

    async def serve(self) -> None:
        plan = self.plan
        loop = asyncio.get_running_loop()
        sock, _ = await loop.sock_accept(self.listener)
        self.listener.close()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if plan.server_sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, plan.server_sndbuf)
        tls = MemoryTLS(sock, self.ctx)
        try:
            await tls.handshake()
            client_eof = asyncio.Event()

            async def read() -> None:
                while data := await tls.recv(plan.instance_read):
                    self.received += data
                    await pause(self.rnd, plan.pause_p)
                client_eof.set()

            async def send(data: bytes) -> None:
                for i in range(0, len(data), plan.instance_chunk):
                    await tls.send(data[i : i + plan.instance_chunk])
                    await pause(self.rnd, plan.pause_p)

            reading = asyncio.ensure_future(read())
            await send(self.sent[: plan.instance_bytes])
            if plan.ending == "client":
                await client_eof.wait()
                await send(self.sent[plan.instance_bytes :])
                await tls.close_notify()
            elif plan.ending == "instance":
                await tls.close_notify()
            else:  # "truncate": the FIN without close_notify
                sock.shutdown(socket.SHUT_WR)
            if plan.ending == "client":
                await reading  # done already: the client's EOF came through
            else:
                # What TLS makes of bytes after our close is not the point:
                # count what arrived before it, then read raw.
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
            # Read on until the proxy closes: closing with unread bytes would
            # send a RST and discard what is still in flight towards it.
            while await loop.sock_recv(sock, 65536):
                pass
        finally:
            sock.close()


async def one_run(plan: Plan, pki, client_context) -> None:
    loop = asyncio.get_running_loop()
    instance = Instance(plan, server_context(pki))
    serving = asyncio.ensure_future(instance.serve())
    try:
        s = await spliced(
            client_context,
            instance.port,
            linger=LINGER,
            proxy_sndbuf=plan.proxy_sndbuf,
            proxy_rcvbuf=plan.proxy_rcvbuf,
            client_rcvbuf=plan.client_rcvbuf,
            instance_sndbuf=plan.instance_sndbuf,
        )
        rnd = random.Random(plan.seed * 7 + 2)
        sent = pattern(plan.client_bytes, seed=plan.seed + 1_000_000)

        async def write() -> None:
            try:
                for i in range(0, len(sent), plan.client_chunk):
                    await loop.sock_sendall(s.sock, sent[i : i + plan.client_chunk])
                    await pause(rnd, plan.pause_p)
                if plan.ending == "client":
                    s.sock.shutdown(socket.SHUT_WR)
            except OSError:
                assert plan.ending != "client"  # the instance may end first

        async def read() -> bytes:
            got = bytearray()
            try:
                while data := await loop.sock_recv(s.sock, plan.client_read):
                    got += data
                    await pause(rnd, plan.pause_p)
            except ConnectionResetError:
                # The instance ended while this client was still sending: the
                # proxy closed on its unread bytes, and a unix socket then
                # reads ECONNRESET after the data instead of EOF. The bytes
                # are still compared exactly below.
                if plan.ending == "client":
                    raise
            return bytes(got)

        writing = asyncio.ensure_future(write())
        got = await asyncio.wait_for(read(), 30)
        await asyncio.wait_for(writing, 30)
        if plan.ending != "client":
            # Done, as a client is when it has read the end: the proxy may be
            # draining its bytes, and the outcome comes when it closes.
            s.sock.shutdown(socket.SHUT_WR)
        outcome = await s.outcome(30)
        await asyncio.wait_for(serving, 30)
        s.sock.close()

        assert got == instance.sent, f"client got {len(got)} of {len(instance.sent)} bytes"
        received = bytes(instance.received)
        if plan.ending == "client":
            assert received == sent, f"instance got {len(received)} of {len(sent)} bytes"
        else:
            assert sent.startswith(received), "instance got bytes the client never sent"
        assert outcome == plan.expected_outcome()
    except BaseException as exc:
        serving.cancel()
        raise AssertionError(f"{plan}: {exc!r}") from exc


def seeds() -> list[int]:
    chosen = os.environ.get("STRESS_SEEDS")
    if chosen:
        return [int(x) for x in chosen.split(",")]
    return list(range(RUNS))


@pytest.mark.timeout(600)
def test_random_runs_deliver_every_byte_exactly(run, loop_kind, pki, client_context, plane_threads):
    all_seeds = seeds()

    async def main():
        for i in range(0, len(all_seeds), AT_ONCE):
            batch = [Plan.draw(seed) for seed in all_seeds[i : i + AT_ONCE]]
            await asyncio.gather(*(one_run(plan, pki, client_context) for plan in batch))
        assert _splice.stats()["active"] == 0

    run(main)
