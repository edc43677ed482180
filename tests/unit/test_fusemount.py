"""FuseMount.target without a mount: lookups of one name never open it twice at once."""

from __future__ import annotations

import asyncio
import threading
import time

from proxy.fusemount import FuseMount
from proxy.log import Logger

NAME = "p.r.c.i"


def test_concurrent_lookups_of_one_name_open_it_once(tmp_path):
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    state = {"now": 0, "most": 0, "calls": 0}

    async def open_socket(inst, mount):
        state["calls"] += 1
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0.3)
        state["now"] -= 1
        if state["calls"] == 1:
            raise OSError("the first try fails")

    mount = FuseMount(str(tmp_path), str(tmp_path / "s"), open_socket, loop, Logger(quiet=True))
    results: list[object] = []

    def lookup() -> None:
        try:
            results.append(mount.target(NAME))
        except OSError as exc:
            results.append(exc)

    threads = []
    previous = 0.0
    for at in (0, 0.1, 0.35, 0.5):  # the third starts as the failed first try ends
        time.sleep(at - previous)
        previous = at
        thread = threading.Thread(target=lookup)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(10)
    loop.call_soon_threadsafe(loop.stop)
    assert state["most"] == 1, state
    assert state["calls"] == 2  # the failed one, then one success shared by the rest
    assert sum(isinstance(r, str) for r in results) == 3
