"""Event loop selection: uvloop where it is installed, asyncio otherwise.

Without uvloop (Windows, or a platform it has no wheel for) the plain asyncio
loop runs; on Windows that is the selector loop, because the portable data
plane waits on sockets with add_reader/add_writer, which the default
proactor loop lacks.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        if sys.platform == "win32":
            return asyncio.SelectorEventLoop()
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_until_complete(main: Callable[[], Awaitable[T]]) -> T:
    async def runner() -> T:
        return await main()

    try:
        import uvloop
    except ImportError:
        if sys.platform == "win32":
            asyncio.set_event_loop_policy(asyncio.WindowsSelectorEventLoopPolicy())  # type: ignore[attr-defined,unused-ignore]
        return asyncio.run(runner())
    return uvloop.run(runner())
