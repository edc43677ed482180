"""A plain TCP echo server on loopback, on its own thread and event loop: the
backend of instances whose sessions should come back byte for byte
(``Emulator.add_instance(..., backend=(host, port))``), for benchmarks and for
tests that checksum every byte through the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any


def echo_backend(host: str = "127.0.0.1") -> tuple[int, Callable[[], None]]:
    """Start the server; (its port, a function that stops it). A client's EOF is
    answered with EOF once everything before it was echoed."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, host, 0, backlog=4096)
        state["port"] = server.sockets[0].getsockname()[1]
        state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        await state["stop"].wait()
        server.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="echo", daemon=True)
    thread.start()
    if not started.wait(30):
        raise RuntimeError("the echo server did not start")

    def stop() -> None:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)

    return state["port"], stop
