"""Event loop selection: uvloop where it is installed, asyncio otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def run_until_complete(main: Callable[[], Awaitable[T]]) -> T:
    async def runner() -> T:
        return await main()

    try:
        import uvloop
    except ImportError:  # e.g. Windows, where uvloop does not exist
        return asyncio.run(runner())
    return uvloop.run(runner())
