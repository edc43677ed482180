"""The soak: 1,000 connections held under mixed work while certificates expire
every 2 minutes and tokens every 4, then bulk transfers with random chunk
sizes, half-closes and resets, every byte checked; the proxy's RSS and
descriptors are sampled every 10 s.

    python -m pytest -m soak -s tests/integration/test_soak.py    # 10 minutes + 10 GB

The default run holds the same 1,000 connections for 60 s with 30 s tokens and
moves 512 MiB (test_soak_short). Both print their report as a table; with
ALLOYDB_SOAK_REPORT=FILE it is also written there as JSON.

Mixed work: 50 PostgreSQL sessions (psycopg) run short queries with random
pauses; the other 950 connections go to an echo instance in request-response
rounds, a 100-byte ping (its round trip is the latency) or, one time in a
hundred, a 1 MiB echo, each followed by a random pause of up to a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import threading
import time

import psycopg
import pytest

from ..conftest import DB_NAME, DB_PASSWORD, DB_USER, URI
from .fakes import service_account_info
from .proxyproc import fd_count, free_port_block
from .streaming import ENDINGS, StreamingLoad, echo_uri
from .test_credentials import home, run_proxy  # noqa: F401 (the credential tests' fixtures)
from .test_fault_matrix import (  # noqa: F401 (echo_address: a fixture)
    echo_address,
    refresh_counts,
    rss_kib,
)

FULL = {"hold": 600, "token_life": 240, "bulk": 10 * 10**9}
SHORT = {"hold": 60, "token_life": 30, "bulk": 512 << 20}
CONNECTIONS, PG_SESSIONS = 1000, 50
QUERIES = (
    "SELECT %s::int * 2",
    "SELECT count(*) FROM generate_series(1, 1000 + %s %% 1000)",
    "SELECT md5(repeat(%s::text, 100))",
)


class PgWork:
    """PG_SESSIONS sessions through the proxy doing short queries until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.queries = 0
        self.errors: list[str] = []
        self.latencies: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.ready = threading.Event()

    def start(self) -> PgWork:
        self._thread.start()
        assert self.ready.wait(60), "the PostgreSQL sessions did not open"
        return self

    def stop(self) -> bool:
        """Stop; False if a session did not end within a minute (hung)."""
        self._stop.set()
        self._thread.join(60)
        return not self._thread.is_alive()

    async def _main(self) -> None:
        dsn = (
            f"host=127.0.0.1 port={self.port} user={DB_USER} password={DB_PASSWORD} "
            f"dbname={DB_NAME}"
        )
        conns = []
        for _ in range(PG_SESSIONS):
            try:
                conns.append(await psycopg.AsyncConnection.connect(dsn, autocommit=True))
            except psycopg.Error as exc:
                self.errors.append(f"connect: {exc}")
        self.ready.set()
        await asyncio.gather(*(self._session(c, i) for i, c in enumerate(conns)))
        for conn in conns:
            await conn.close()

    async def _session(self, conn: psycopg.AsyncConnection, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            n = rng.randrange(1_000_000)
            began = time.monotonic()
            try:
                await conn.execute(rng.choice(QUERIES), (n,))
            except psycopg.Error as exc:
                self.errors.append(str(exc))
                return
            self.latencies.append((began, time.monotonic() - began))
            self.queries += 1
            await asyncio.sleep(rng.uniform(0, 0.2))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def window(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [v for t, v in samples if start <= t < end]


def run_soak(run_proxy, cred_emulator, fakes, echo_address, tmp_path, *, hold, token_life, bulk):  # noqa: F811
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # This process holds both ends' worth: 1,000 clients, the emulator's 2,000, the echo's 1,000.
    if hard != resource.RLIM_INFINITY and hard < 5000:
        pytest.skip(
            f"the soak needs 5,000 open files in the test process; the hard limit is {hard}"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        return _soak(
            run_proxy, cred_emulator, fakes, echo_address, tmp_path, hold, token_life, bulk
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _soak(run_proxy, cred_emulator, fakes, echo_address, tmp_path, hold, token_life, bulk):  # noqa: F811
    uri = echo_uri("soak", "c-soak")  # a cluster of its own: its refreshes are its own
    cred_emulator.add_instance(uri, backend=echo_address)
    cred_emulator.faults.set(cert_lifetime=120)
    fakes.expires_in = token_life
    key = tmp_path / "key.json"
    key.write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    http_port = free_port_block(1)
    proxy = run_proxy(URI, "--credentials-file", str(key), "--prometheus", "--http-port",
                      str(http_port), instance=uri)  # fmt: skip
    metrics_url = f"http://127.0.0.1:{http_port}/metrics"
    short = "project-id.us-central1.c-soak.soak"
    echo_port, pg_port = proxy.port, proxy.port + 1
    pid = proxy.proc.pid
    idle_fds = fd_count(pid)
    report: dict[str, object] = {"hold_s": hold, "connections": CONNECTIONS}
    samples: list[dict[str, float]] = []

    # ---- hold: 1,000 connections under mixed work --------------------------------
    load = StreamingLoad(echo_port, streams=0, max_pause=1.0).start()
    try:
        began = time.monotonic()
        for _ in range(CONNECTIONS - PG_SESSIONS):
            load.add(echo_port, rounds=True, big=0.01)
        pg = PgWork(pg_port).start()
        opened_in = time.monotonic() - began
        hold_start = time.monotonic()
        refreshes_before, tokens_before = refresh_counts(metrics_url), _token_calls(fakes)
        next_sample = hold_start
        while (now := time.monotonic()) < hold_start + hold:
            if now >= next_sample:
                samples.append(_sample(pid, now - hold_start, load, pg))
                next_sample += 10
            time.sleep(0.5)
        samples.append(_sample(pid, time.monotonic() - hold_start, load, pg))
        refreshes_after, tokens_after = refresh_counts(metrics_url), _token_calls(fakes)
        pg_stopped = pg.stop()
        streams = load.finish(timeout=120)
    finally:
        load.close()
    hold_end = time.monotonic()
    edge = min(60.0, hold / 4)
    pings = [lat for s in streams for lat in s.latencies]
    first, last = (
        window(pings, hold_start, hold_start + edge),
        window(pings, hold_end - edge, hold_end),
    )
    q_first = window(pg.latencies, hold_start, hold_start + edge)
    q_last = window(pg.latencies, hold_end - edge, hold_end)
    report.update(
        opened_in_s=round(opened_in, 1),
        echo_rounds=len(pings),
        echo_bytes=sum(s.verified for s in streams),
        pg_queries=pg.queries,
        pg_stopped=pg_stopped,
        errors=sum(1 for s in streams if s.error) + len(pg.errors),
        error_examples=[s.error for s in streams if s.error][:3] + pg.errors[:3],
        bytes_lost=sum(s.lost for s in streams),
        ping_ms_first={"p50": percentile(first, 50) * 1e3, "p99": percentile(first, 99) * 1e3},
        ping_ms_last={"p50": percentile(last, 50) * 1e3, "p99": percentile(last, 99) * 1e3},
        query_ms_first={"p50": percentile(q_first, 50) * 1e3, "p99": percentile(q_first, 99) * 1e3},
        query_ms_last={"p50": percentile(q_last, 50) * 1e3, "p99": percentile(q_last, 99) * 1e3},
        window_s=edge,
        cert_refreshes=_count(refreshes_after, "success", short)
        - _count(refreshes_before, "success", short),
        cert_refresh_failures=_count(refreshes_after, "failure", short)
        - _count(refreshes_before, "failure", short),
        token_refreshes=tokens_after - tokens_before,
        samples=samples,
    )

    # ---- bulk: random chunks, half-closes and resets, every byte checked ---------------
    rng = random.Random(7)
    bulk_load = StreamingLoad(echo_port, streams=0, max_chunk=256 * 1024, max_pause=0).start()
    try:
        bulk_start, checked, failed = time.monotonic(), 0, False
        deadline = bulk_start + bulk / 10e6 + 300  # far beyond the ~120 MB/s seen
        active: list = []
        while active or (checked < bulk and not failed):
            if time.monotonic() > deadline:
                break  # finish() below marks what still runs as an error
            for s in [s for s in active if not s.alive]:
                active.remove(s)
                checked += s.verified
                failed = failed or s.error is not None  # stop starting new ones
            while (
                not failed and checked + sum(s.budget for s in active) < bulk and len(active) < 20
            ):
                ending = rng.choices(("close", "half-close", "reset"), (5, 3, 2))[0]
                budget = rng.randrange(1 << 20, 64 << 20)
                active.append(bulk_load.add(echo_port, budget=budget, ending=ending))
            time.sleep(0.05)
        bulk_s = time.monotonic() - bulk_start
        bulk_streams = bulk_load.finish(timeout=60)
    finally:
        bulk_load.close()
    rss_after_bulk = rss_kib(pid)
    time.sleep(2)  # the proxy closes the instance side of the reset ones
    endings = {e: sum(1 for s in bulk_streams if s.ending == e and s.opened) for e in ENDINGS}
    report.update(
        bulk_bytes_checked=sum(s.verified for s in bulk_streams),
        bulk_mb_per_s=round(sum(s.verified for s in bulk_streams) / bulk_s / 1e6, 1),
        bulk_streams=endings,
        bulk_errors=sum(1 for s in bulk_streams if s.error),
        bulk_error_examples=[s.error for s in bulk_streams if s.error][:3],
        bulk_bytes_lost=sum(s.lost for s in bulk_streams),
        rss_kib_after_bulk=rss_after_bulk,
        fds_idle_before=idle_fds,
        fds_idle_after=fd_count(pid),
        connections_left=_data_connections(pid, {echo_port, pg_port}),
        proxy_alive=proxy.proc.poll() is None,
    )
    _print(report)
    if os.environ.get("ALLOYDB_SOAK_REPORT"):
        with open(os.environ["ALLOYDB_SOAK_REPORT"], "w") as fh:
            json.dump(report, fh, indent=2)
    return report


def _sample(pid: int, t: float, load: StreamingLoad, pg: PgWork) -> dict[str, float]:
    alive = sum(1 for s in load.streams if s.alive)
    return {"t": round(t), "rss_kib": rss_kib(pid), "fds": fd_count(pid), "streams": alive,
            "queries": pg.queries}  # fmt: skip


def _data_connections(pid: int, listener_ports: set[int]) -> list[str]:
    """The proxy's TCP connections still open to a client of its listeners or to
    an instance (port 5433), in any state (a CLOSE-WAIT one is a leak too)."""
    out = subprocess.run(["ss", "-Htanp"], capture_output=True, text=True, check=True).stdout
    left = []
    for line in out.splitlines():
        fields = line.split()
        if f"pid={pid}," not in line or fields[0] == "LISTEN" or len(fields) < 5:
            continue
        local_port, peer_port = int(fields[3].rsplit(":", 1)[1]), int(fields[4].rsplit(":", 1)[1])
        if local_port in listener_ports or peer_port == 5433:
            left.append(line)
    return left


def _count(counts: dict[str, dict[str, int]], kind: str, short: str) -> int:
    return counts[kind].get(short, 0)


def _token_calls(fakes) -> int:
    return sum(1 for p in fakes.paths() if p == "/token")


def _print(report: dict) -> None:
    print("\n| soak | value |\n| --- | --- |")
    for key, value in report.items():
        if key != "samples":
            print(f"| {key} | {value} |")
    print("\n| t (s) | RSS (KiB) | fds | echo streams open | queries so far |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for s in report["samples"]:  # type: ignore[union-attr]
        print(f"| {s['t']} | {s['rss_kib']} | {s['fds']} | {s['streams']} | {s['queries']} |")


def check(report: dict, hold: int, token_life: int) -> None:
    assert report["proxy_alive"]
    samples = report["samples"]
    # Every connection open at every sample: the 950 echo streams counted, the
    # 50 sessions shown alive by queries done between each two samples.
    held = [s["streams"] for s in samples]
    assert all(n == CONNECTIONS - PG_SESSIONS for n in held), held
    queries = [s["queries"] for s in samples]
    assert all(b > a for a, b in zip(queries, queries[1:], strict=False)), queries
    assert report["pg_stopped"], "a PostgreSQL session hung"
    assert report["errors"] == 0, report["error_examples"]
    assert report["bytes_lost"] == 0 and report["bulk_bytes_lost"] == 0
    assert report["bulk_errors"] == 0, report["bulk_error_examples"]
    # The refreshes happened under the load: the echo instance's 2-minute
    # certificate as often as the rate limit allows (every 30 s), never failing,
    # so every token it was asked with was valid: the tokens were renewed in time.
    assert report["cert_refreshes"] >= hold // 30 - 1, report["cert_refreshes"]
    assert report["cert_refresh_failures"] == 0
    assert report["token_refreshes"] >= max(1, hold // token_life)
    # Nothing grows: descriptors flat while held; after everything closed no
    # connection to a client or an instance is left, in any state, and the
    # descriptors are back to idle (+6: kept-alive HTTP connections to the Admin
    # API, the token endpoint and from the metrics scrapes may stay);
    # RSS after warm-up and after the bulk within 25 % (+16 MiB) of the sample at a third.
    fds = [s["fds"] for s in samples]
    assert max(fds) - min(fds) <= 2, fds
    assert report["connections_left"] == [], report["connections_left"]
    assert report["fds_idle_after"] <= report["fds_idle_before"] + 6
    warm = samples[len(samples) // 3]["rss_kib"]
    assert samples[-1]["rss_kib"] <= warm * 1.25 + 16 * 1024, samples
    assert report["rss_kib_after_bulk"] <= warm * 1.25 + 16 * 1024, report["rss_kib_after_bulk"]
    # No drift worth the name: the last window's p99 ping within 3x the first's (+20 ms).
    first, last = report["ping_ms_first"]["p99"], report["ping_ms_last"]["p99"]
    assert last <= 3 * first + 20, (first, last)


def test_soak_short(run_proxy, cred_emulator, fakes, echo_address, tmp_path):  # noqa: F811
    """The soak, 60 s and 512 MiB (the default run's version)."""
    report = run_soak(run_proxy, cred_emulator, fakes, echo_address, tmp_path, **SHORT)
    check(report, SHORT["hold"], SHORT["token_life"])


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_full(run_proxy, cred_emulator, fakes, echo_address, tmp_path):  # noqa: F811
    """The soak, 10 minutes and 10 GB: python -m pytest -m soak -s tests/integration/test_soak.py"""
    report = run_soak(run_proxy, cred_emulator, fakes, echo_address, tmp_path, **FULL)
    check(report, FULL["hold"], FULL["token_life"])
