"""asyncio binding for ``plane.TLSConnection``: handshake and the metadata exchange.

These run once per connection, before the splice core takes over, so plain
Python is fine here. Each waits for socket readiness with a one-shot loop
reader or writer and gives up after ``timeout`` seconds (``TimeoutError``).
"""

from __future__ import annotations

import asyncio
import time

from proxy.dataplane import plane


async def _wait(conn: plane.TLSConnection, want: int, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    fd = conn.fileno()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if want == plane.WANT_READ:
        loop.add_reader(fd, wake)
    else:
        loop.add_writer(fd, wake)
    try:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out waiting for the instance")
        await asyncio.wait_for(ready, left)
    finally:
        if want == plane.WANT_READ:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)


async def handshake(conn: plane.TLSConnection, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (want := conn.do_handshake()) != 0:
        await _wait(conn, want, deadline)


async def send_all(conn: plane.TLSConnection, data: bytes, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        # Retry with the same bytes after a WANT_*; OpenSSL requires it.
        sent = conn.write(bytes(view))
        if sent < 0:
            await _wait(conn, -sent, deadline)
        else:
            view = view[sent:]


async def recv_exactly(conn: plane.TLSConnection, n: int, *, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    missing = n
    while missing:
        got = conn.read(missing)
        if isinstance(got, int):
            await _wait(conn, -got, deadline)
            continue
        if not got:
            raise ConnectionError(
                f"connection closed by the instance after {n - missing} of {n} bytes"
            )
        chunks.append(got)
        missing -= len(got)
    return b"".join(chunks)
