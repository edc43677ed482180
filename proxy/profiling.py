"""``--debug``: Python counterparts of Go's pprof endpoints on the admin server.

Go serves pprof profiles; a Python process has other insides, so the same
paths answer in plain text about Python:

  /debug/pprof/            index of these endpoints
  /debug/pprof/goroutine   every asyncio task and every thread, with stacks
  /debug/pprof/heap        RSS, gc counters, the data plane's counters, and the
                           top allocations when tracemalloc is on
                           (PYTHONTRACEMALLOC=25 in the environment)
  /debug/pprof/profile     ?seconds=N (default 30): where the event-loop thread
                           spends its time, sampled every 5 ms from another
                           thread, so the loop keeps serving meanwhile
  /debug/pprof/cmdline     the command line, NUL-separated as in Go
  /debug/pprof/symbol, /debug/pprof/trace  501: nothing like them in Python
"""

from __future__ import annotations

import asyncio
import collections
import gc
import sys
import threading
import time
import traceback
import tracemalloc
import urllib.parse

from proxy import workers
from proxy.dataplane import plane
from proxy.health import Handler

PREFIX = "/debug/pprof/"
MAX_PROFILE_SECONDS = 300.0
SAMPLE_INTERVAL = 0.005


def _index() -> str:
    doc = __doc__ or ""
    listing = doc[doc.index("  /debug") : doc.rindex("\n")]
    return "Profiling endpoints of alloydb-auth-proxy (Python):\n\n" + listing + "\n"


def _goroutine() -> str:
    out: list[str] = []
    tasks = asyncio.all_tasks()
    out.append(f"{len(tasks)} asyncio task(s)\n")
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out.append(f"\ntask {task.get_name()} {task.get_coro()!r}\n")
        for frame in task.get_stack():
            out.extend(traceback.format_stack(frame, limit=1))
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    out.append(f"\n{len(frames)} Python thread(s) (the data-plane threads run native code)\n")
    for ident, frame in frames.items():
        out.append(f"\nthread {names.get(ident, ident)}\n")
        out.extend(traceback.format_stack(frame))
    return "".join(out)


def _rss_kib() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _heap() -> str:
    lines = [f"rss_kib {_rss_kib()}"]
    lines += [f"gc_count_gen{i} {n}" for i, n in enumerate(gc.get_count())]
    lines += [f"gc_objects {len(gc.get_objects())}"]
    lines += [f"data_plane_{k} {v}" for k, v in plane.stats().items()]
    lines += [f"data_plane_thread_{i}_connections {n}" for i, n in enumerate(plane.thread_loads())]
    if tracemalloc.is_tracing():
        lines.append("\ntop allocations (tracemalloc):")
        for stat in tracemalloc.take_snapshot().statistics("lineno")[:25]:
            lines.append(str(stat))
    else:
        lines.append(
            "\ntracemalloc is off: start the proxy with PYTHONTRACEMALLOC=25 for allocations"
        )
    return "\n".join(lines) + "\n"


def _sample(thread_id: int, seconds: float) -> str:
    """Count the stacks of one thread, sampled from this (another) thread."""
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    samples = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(thread_id)
        if frame is not None:
            samples += 1
            stack = tuple(
                f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                for f, _ in traceback.walk_stack(frame)
            )
            stacks[stack[:8]] += 1
            own[stack[0]] += 1
        time.sleep(SAMPLE_INTERVAL)
    out = [f"{samples} samples of the event-loop thread over {seconds:g}s\n", "\nself (top 30):"]
    out += [
        f"{n:6d} {100 * n / max(samples, 1):5.1f}%  {where}" for where, n in own.most_common(30)
    ]
    out.append("\nstacks (top 10, innermost first):")
    for stack, n in stacks.most_common(10):
        out.append(f"\n{n:6d} {100 * n / max(samples, 1):5.1f}%")
        out += [f"         {where}" for where in stack]
    return "\n".join(out) + "\n"


def debug_routes() -> dict[str, Handler]:
    loop_thread = threading.get_ident()  # built on the loop, so this is its thread

    async def index(_method: str, _query: str) -> tuple[int, str]:
        return 200, _index()

    async def goroutine(_method: str, _query: str) -> tuple[int, str]:
        return 200, _goroutine()

    async def heap(_method: str, _query: str) -> tuple[int, str]:
        return 200, _heap()

    busy: list[bool] = []  # one profile at a time

    async def profile(_method: str, query: str) -> tuple[int, str]:
        raw = urllib.parse.parse_qs(query).get("seconds", ["30"])[0]
        try:
            seconds = float(raw)
        except ValueError:
            return 400, f'invalid value for "seconds": "{raw}"\n'
        if not 0 < seconds <= MAX_PROFILE_SECONDS:
            return 400, f'"seconds" must be between 0 and {MAX_PROFILE_SECONDS:g}\n'
        if busy:
            return 429, "a profile is already being taken; try again when it ends\n"
        busy.append(True)
        try:
            # Its own thread: a long profile must not hold one that Admin
            # API calls or token fetches need.
            return 200, await workers.PROFILE.run(_sample, loop_thread, seconds)
        finally:
            busy.clear()

    async def cmdline(_method: str, _query: str) -> tuple[int, str]:
        return 200, "\x00".join(redacted_argv(sys.argv))

    async def unavailable(_method: str, _query: str) -> tuple[int, str]:
        return 501, "not available in the Python proxy; see /debug/pprof/\n"

    return {
        PREFIX: index,
        PREFIX.rstrip("/"): index,
        PREFIX + "goroutine": goroutine,
        PREFIX + "heap": heap,
        PREFIX + "profile": profile,
        PREFIX + "cmdline": cmdline,
        PREFIX + "symbol": unavailable,
        PREFIX + "trace": unavailable,
    }


#: Flags whose values are secrets: never shown by /debug/pprof/cmdline.
SECRET_FLAGS = ("--token", "-t", "--login-token", "--json-credentials", "-j")


def redacted_argv(argv: list[str]) -> list[str]:
    """``argv`` with the values of SECRET_FLAGS replaced (every spelling click takes)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("REDACTED")
            hide_next = False
            continue
        if arg in SECRET_FLAGS:
            hide_next = True
            out.append(arg)
            continue
        flag, eq, _ = arg.partition("=")
        if eq and flag in SECRET_FLAGS:
            out.append(f"{flag}=REDACTED")
        elif arg[:2] in ("-t", "-j") and not arg.startswith("--") and len(arg) > 2:
            out.append(arg[:2] + "REDACTED")
        else:
            out.append(arg)
    return out
