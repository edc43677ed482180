"""Splice: bytes in both directions, end of stream, errors, backpressure, fds."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import random
import resource
import select
import socket
import struct
import threading
import time

import pytest

from proxy import tlsconn
from proxy.dataplane import plane as _splice

from . import splicing
from .conftest import close_notify
from .splicing import pattern
from .test_tls import connect


def _fds_now() -> int:
    # Collect first: sockets of earlier tests awaiting GC would skew the count.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def fd_count() -> int:
    """The fd count once it holds still: an earlier test's TLS server thread may
    still be closing its side, which would move the baseline during this test."""
    last, deadline = _fds_now(), time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _fds_now()
        if now == last:
            return now
        last = now
    return last


def assert_fds_back_to(before: int) -> None:
    """The test's TLS server threads close their side a moment later: poll briefly."""
    deadline = time.monotonic() + 3
    while _fds_now() != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _fds_now() == before


async def spliced(ctx, port, *, linger=5.0):
    """A client socket whose peer is spliced to a TLS connection to the server."""
    conn = await connect(ctx, port)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    done = asyncio.get_running_loop().create_future()
    calls = []

    def on_done(kind, message):
        calls.append((kind, message))
        if not done.done():
            done.set_result((kind, message))

    splice = _splice.Splice(theirs.detach(), conn, on_done, linger)
    splice.start(asyncio.get_running_loop())
    return ours, splice, done, calls


async def recv_all(sock, n=None):
    loop = asyncio.get_running_loop()
    chunks = []
    got = 0
    while n is None or got < n:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def test_echo_random_chunks_and_pauses(run, tls_server, client_context):
    server = tls_server()
    payload = os.urandom(3 * 1024 * 1024)

    async def main():
        loop = asyncio.get_running_loop()
        sock, splice, done, calls = await spliced(client_context, server.port)
        rnd = random.Random(7)

        async def writer():
            pos = 0
            while pos < len(payload):
                size = rnd.choice([1, 7, 100, 4096, 16384, 65536, 200000])
                await loop.sock_sendall(sock, payload[pos : pos + size])
                pos += size
                if rnd.random() < 0.05:
                    await asyncio.sleep(0.01)
            sock.shutdown(socket.SHUT_WR)

        _, echoed = await asyncio.gather(writer(), recv_all(sock))
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        assert await asyncio.wait_for(done, 10) == (_splice.CLIENT_CLOSED, "")
        assert splice.bytes_client_to_server == splice.bytes_server_to_client == len(payload)
        sock.close()
        assert len(calls) == 1

    before = fd_count()
    run(main)
    assert_fds_back_to(before)


def test_fifty_megabytes_each_way(run, tls_server, client_context):
    server = tls_server()
    size = 50 * 1024 * 1024

    async def main():
        loop = asyncio.get_running_loop()
        sock, _, done, _ = await spliced(client_context, server.port)
        block = os.urandom(1024 * 1024)
        sent = hashlib.sha256()

        async def writer():
            for _ in range(size // len(block)):
                sent.update(block)
                await loop.sock_sendall(sock, block)
            sock.shutdown(socket.SHUT_WR)

        async def reader():
            got = hashlib.sha256()
            while data := await loop.sock_recv(sock, 262144):
                got.update(data)
            return got

        _, got = await asyncio.gather(writer(), reader())
        assert got.digest() == sent.digest()
        await asyncio.wait_for(done, 10)
        sock.close()

    run(main)


def test_bytes_buffered_before_start_are_not_lost(run, tls_server, client_context):
    def greet_then_echo(tls):
        # Two records at once: the client reads only the first before splicing.
        tls.sendall(b"\x00\x00\x00\x02OK" + b"early-bytes")
        while data := tls.recv(65536):
            tls.sendall(data)

    server = tls_server(greet_then_echo)

    async def main():
        conn = await connect(client_context, server.port)
        await asyncio.sleep(0.2)  # let both records arrive in one socket read
        assert await tlsconn.recv_exactly(conn, 6, timeout=5) == b"\x00\x00\x00\x02OK"
        # The path this test is named after: both records came in one socket read,
        # so the second is in OpenSSL's buffers and nothing is left for the socket
        # to report. (Were it still in the kernel, the test would prove nothing.)
        assert select.select([conn.fileno()], [], [], 0)[0] == []
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        splice = _splice.Splice(theirs.detach(), conn, lambda k, m: None)
        splice.start(asyncio.get_running_loop())
        assert await asyncio.wait_for(recv_all(ours, 11), 5) == b"early-bytes"
        splice.abort()
        ours.close()

    run(main)


def test_client_half_close_keeps_the_tail(run, tls_server, client_context, plane_threads):
    tail = os.urandom(2 * 1024 * 1024)

    def read_all_then_answer(tls):
        got = b""
        while data := tls.recv(65536):
            got += data
        tls.sendall(struct.pack(">I", len(got)) + tail)

    # strict: the client's half-close must reach the instance as close_notify.
    server = tls_server(read_all_then_answer, strict=True)
    spacer_server = tls_server()

    async def main():
        loop = asyncio.get_running_loop()
        spacers = await splicing.fill_lower_threads(client_context, spacer_server.port)
        sock, _, done, _ = await spliced(client_context, server.port)
        await loop.sock_sendall(sock, b"x" * 100000)
        sock.shutdown(socket.SHUT_WR)
        answer = await recv_all(sock)
        assert struct.unpack(">I", answer[:4])[0] == 100000
        assert answer[4:] == tail
        assert (await asyncio.wait_for(done, 10))[0] == _splice.CLIENT_CLOSED
        sock.close()
        await splicing.release(spacers)

    run(main)


def test_instance_close_flushes_everything(run, tls_server, client_context):
    """The instance sends 2 MiB and closes while the client is slow: through 4 KiB
    socket buffers the tail leaves in many partial sends, and every byte arrives once."""
    goodbye = pattern(2 * 1024 * 1024 + 123, seed=11)

    def send_and_close(tls):
        tls.recv(10)
        tls.sendall(goodbye)
        tls.unwrap()

    server = tls_server(send_and_close)

    async def main():
        loop = asyncio.get_running_loop()
        s = await splicing.spliced(
            client_context, server.port, proxy_sndbuf=4096, client_rcvbuf=4096
        )
        await loop.sock_sendall(s.sock, b"go")
        await asyncio.sleep(0.3)  # the client is slow to read; bytes must wait for it
        got = await splicing.read_slowly(s.sock, chunk=3000, pause=0.0005)
        assert len(got) == len(goodbye) and got == goodbye
        assert await s.outcome() == (_splice.INSTANCE_CLOSED, "")
        s.sock.close()

    run(main)


def test_instance_reset_mid_stream(run, tls_server, client_context, plane_threads):
    def reset(tls):
        tls.recv(10)
        tls.sendall(b"partial")
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()

    server = tls_server(reset)
    spacer_server = tls_server()

    async def main():
        loop = asyncio.get_running_loop()
        spacers = await splicing.fill_lower_threads(client_context, spacer_server.port)
        sock, _, done, calls = await spliced(client_context, server.port)
        await loop.sock_sendall(sock, b"go")
        kind, message = await asyncio.wait_for(done, 10)
        assert kind in (_splice.ERROR_READ_INSTANCE, _splice.ERROR_WRITE_INSTANCE)
        assert "reset" in message
        # Both of the splice's fds are closed: the client sees the end.
        await asyncio.wait_for(recv_all(sock), 5)
        sock.close()
        assert len(calls) == 1
        await splicing.release(spacers)

    before = fd_count()
    run(main)
    assert_fds_back_to(before)


def test_client_reset_mid_stream(run, tls_server, client_context, plane_threads):
    server = tls_server()

    async def main():
        loop = asyncio.get_running_loop()
        spacers = await splicing.fill_lower_threads(client_context, server.port)
        # A TCP pair so the client can send a real RST.
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        listener.close()
        accepted.setblocking(False)
        conn = await connect(client_context, server.port)
        done = loop.create_future()
        splice = _splice.Splice(accepted.detach(), conn, lambda k, m: done.set_result((k, m)))
        splice.start(loop)
        client.sendall(b"hello")
        await asyncio.sleep(0.1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        kind, message = await asyncio.wait_for(done, 10)
        assert kind in (_splice.ERROR_READ_CLIENT, _splice.ERROR_WRITE_CLIENT)
        assert "reset" in message
        await splicing.release(spacers)

    before = fd_count()
    run(main)
    assert_fds_back_to(before)


def test_client_that_stops_reading_applies_backpressure(
    run, tls_server, client_context, plane_threads
):
    """A counting pattern, 4 KiB buffers: the splice stops while nobody reads, then
    resumes where it stopped, every byte in order."""
    stream = pattern(8 * 1024 * 1024, seed=12)
    stop = threading.Event()

    def firehose(tls):
        tls.settimeout(0.5)
        view = memoryview(stream)
        while view and not stop.is_set():
            try:
                sent = tls.send(view[:65536])
            except (TimeoutError, OSError):
                continue
            view = view[sent:]
        close_notify(tls)

    server = tls_server(firehose)
    spacer_server = tls_server()

    async def main():
        spacers = await splicing.fill_lower_threads(client_context, spacer_server.port)
        s = await splicing.spliced(
            client_context, server.port, proxy_sndbuf=4096, client_rcvbuf=4096
        )
        head = await splicing.read_slowly(s.sock, chunk=4096, limit=100_000)
        await asyncio.sleep(0.5)
        first = s.splice.bytes_server_to_client
        await asyncio.sleep(0.5)
        # Nothing reads the client socket: the splice stops taking bytes from the instance.
        assert s.splice.bytes_server_to_client == first
        assert first < len(stream)
        rest = await splicing.read_slowly(s.sock, chunk=5000, pause=0.0002)
        got = head + rest
        assert len(got) == len(stream) and got == stream
        assert await s.outcome() == (_splice.INSTANCE_CLOSED, "")
        stop.set()
        s.sock.close()
        await splicing.release(spacers)

    run(main)


def test_two_hundred_concurrent_splices(run, tls_server, client_context):
    server = tls_server()

    async def one(i):
        loop = asyncio.get_running_loop()
        sock, _, done, _ = await spliced(client_context, server.port)
        data = os.urandom(20000 + i)
        await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)
        assert await recv_all(sock) == data
        kind, _ = await asyncio.wait_for(done, 20)
        sock.close()
        return kind

    async def main():
        kinds = await asyncio.gather(*(one(i) for i in range(200)))
        assert set(kinds) == {_splice.CLIENT_CLOSED}
        assert _splice.stats()["active"] == 0

    before = fd_count()
    run(main)
    assert_fds_back_to(before)


def test_on_done_exception_goes_to_the_loop_handler(run, tls_server, client_context):
    server = tls_server()

    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        loop.set_exception_handler(lambda _loop, context: seen.append(context["message"]))
        conn = await connect(client_context, server.port)
        ours, theirs = socket.socketpair()

        def boom(kind, message):
            raise RuntimeError("boom")

        splice = _splice.Splice(theirs.detach(), conn, boom)
        splice.start(loop)
        splice.abort()
        # The data-plane thread tears down, then the loop delivers on_done.
        for _ in range(500):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == ["exception in splice on_done callback"]
        ours.close()

    run(main)


def test_one_gigabyte_checksummed(run, tls_server, client_context, plane_threads):
    """1 GiB echoed and checksummed: through one connection on one thread, or
    as four concurrent 256 MiB streams, one on each of four threads."""
    server = tls_server()
    block = os.urandom(4 * 1024 * 1024)
    streams = plane_threads
    per_stream = 1024 * 1024 * 1024 // streams

    async def one_stream(sock):
        loop = asyncio.get_running_loop()
        sent = hashlib.sha256()

        async def writer():
            for _ in range(per_stream // len(block)):
                await loop.sock_sendall(sock, block)
                sent.update(block)
            sock.shutdown(socket.SHUT_WR)

        async def reader():
            got = hashlib.sha256()
            n = 0
            while data := await loop.sock_recv(sock, 1 << 20):
                got.update(data)
                n += len(data)
            return n, got.digest()

        _, (n, digest) = await asyncio.gather(writer(), reader())
        assert n == per_stream
        assert digest == sent.digest()

    async def main():
        opened = [await spliced(client_context, server.port) for _ in range(streams)]
        if _splice.threads() == streams:  # native: the least-loaded thread takes each one
            assert _splice.thread_loads()[:streams] == [1] * streams
        start = time.monotonic()
        await asyncio.gather(*(one_stream(sock) for sock, _, _, _ in opened))
        print(f"1 GiB echoed over {streams} stream(s) in {time.monotonic() - start:.1f}s")
        for sock, _, done, _ in opened:
            assert (await asyncio.wait_for(done, 10))[0] == _splice.CLIENT_CLOSED
            sock.close()

    run(main)


def test_one_thousand_concurrent_connections(run, tls_server, client_context, plane_threads):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 5000:
        pytest.skip(f"needs 5000 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 5000), hard))
    server = tls_server()
    count = 1000

    async def one(i, setup, all_open):
        loop = asyncio.get_running_loop()
        async with setup:  # the test server's accept backlog is small
            sock, _, done, _ = await spliced(client_context, server.port)
        opened.append(sock)
        if len(opened) == count:
            all_open.set()
        await all_open.wait()  # every connection is open before any data moves
        data = os.urandom(1000 + i)
        await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)
        assert await recv_all(sock) == data
        kind, message = await asyncio.wait_for(done, 60)
        sock.close()
        return kind, message

    opened: list[socket.socket] = []

    async def main():
        opened.clear()
        setup, all_open = asyncio.Semaphore(50), asyncio.Event()
        results = await asyncio.gather(*(one(i, setup, all_open) for i in range(count)))
        assert results == [(_splice.CLIENT_CLOSED, "")] * count
        assert _splice.stats()["active"] == 0

    before = fd_count()
    try:
        run(main)
        assert_fds_back_to(before)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
