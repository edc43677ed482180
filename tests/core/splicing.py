"""Helpers for splice tests that need small buffers, slow peers and exact bytes."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

from proxy.dataplane import plane as _splice

from .test_tls import connect


def set_buffers(
    fd: int, sndbuf: int | None = None, rcvbuf: int | None = None, *, nodelay: bool = False
) -> None:
    """Shrink a socket's kernel buffers (by fd, without taking ownership).

    nodelay as the proxy's dialer does: with tiny windows, Nagle's algorithm
    against delayed ACKs would stall each window for 40 ms.
    """
    sock = socket.socket(fileno=os.dup(fd))
    try:
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    finally:
        sock.close()


class Spliced:
    """A client socket spliced to a TLS connection, and the splice's one outcome."""

    def __init__(
        self,
        sock: socket.socket,
        splice: _splice.Splice,
        done: asyncio.Future,
        fds: tuple[int, int],
    ):
        self.sock = sock
        self.splice = splice
        self.done = done
        self.fds = fds  # the splice's client and instance fds (owned by it)
        self.calls: list[tuple[int, str]] = []

    async def outcome(self, timeout: float = 10) -> tuple[int, str]:
        return await asyncio.wait_for(asyncio.shield(self.done), timeout)


async def spliced(
    ctx,
    port: int,
    *,
    linger: float = 5.0,
    proxy_sndbuf: int | None = None,
    proxy_rcvbuf: int | None = None,
    client_rcvbuf: int | None = None,
    client_sndbuf: int | None = None,
    instance_sndbuf: int | None = None,
    instance_rcvbuf: int | None = None,
    tcp_client: bool = False,
) -> Spliced:
    """Splice a fresh client socket to a TLS connection to 127.0.0.1:port.

    proxy_* are the buffers of the splice's client-side socket,
    instance_* those of its socket to the instance, client_* those of
    the socket the test reads and writes. tcp_client uses a loopback TCP
    pair instead of a socketpair (for urgent data, resets).
    """
    conn = await connect(ctx, port)
    set_buffers(conn.fileno(), instance_sndbuf, instance_rcvbuf, nodelay=True)
    if tcp_client:
        listener = socket.create_server(("127.0.0.1", 0))
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
        listener.close()
    else:
        ours, theirs = socket.socketpair()
    for sock, snd, rcv in (
        (theirs, proxy_sndbuf, proxy_rcvbuf),
        (ours, client_sndbuf, client_rcvbuf),
    ):
        set_buffers(sock.fileno(), snd, rcv)
        sock.setblocking(False)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    result: Spliced

    def on_done(kind: int, message: str) -> None:
        result.calls.append((kind, message))
        if not done.done():
            done.set_result((kind, message))

    fds = (theirs.fileno(), conn.fileno())
    splice = _splice.Splice(theirs.detach(), conn, on_done, linger)
    result = Spliced(ours, splice, done, fds)
    splice.start(loop)
    return result


async def read_slowly(
    sock: socket.socket,
    *,
    chunk: int = 1000,
    pause: float = 0.0002,
    limit: int | None = None,
    at: int | None = None,
    then=None,
) -> bytes:
    """Read to EOF (or `limit` bytes) in small reads with pauses.

    `then()` is called once, when `at` bytes have been read.
    """
    loop = asyncio.get_running_loop()
    got = bytearray()
    while limit is None or len(got) < limit:
        if at is not None and then is not None and len(got) >= at:
            then()
            then = None
        data = await loop.sock_recv(sock, chunk)
        if not data:
            break
        got += data
        if pause:
            await asyncio.sleep(pause)
    return bytes(got)


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes where every offset is distinguishable (duplicates and gaps show)."""
    out = bytearray()
    i = seed * 1_000_003
    while len(out) < n:
        out += i.to_bytes(8, "big")
        i += 1
    return bytes(out[:n])


def raw_send(tls: ssl.SSLSocket, data: bytes) -> None:
    """Write bytes on the TCP socket under a TLS one (a forged record)."""
    raw = socket.socket(fileno=os.dup(tls.fileno()))
    try:
        raw.setblocking(True)
        raw.sendall(data)
    finally:
        raw.close()


async def fill_lower_threads(ctx, port: int) -> list[Spliced]:
    """Idle splices (to the echo server at ``port``) on the data-plane threads
    but the last, until the last is the least loaded, so that the test's next
    connection runs there: the many-thread variant of a one-connection test is
    then not thread 0 again. (Connections a previous test has not seen end
    yet may still count on some thread.)"""
    spacers: list[Spliced] = []
    count = _splice.threads()
    while count > 1:
        loads = _splice.thread_loads()[:count]
        if loads[-1] < min(loads[:-1]):
            break
        assert len(spacers) < 64, loads
        spacers.append(await spliced(ctx, port))
    return spacers


async def release(spacers: list[Spliced]) -> None:
    for s in spacers:
        s.sock.close()
        await s.outcome()
