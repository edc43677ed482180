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
import threading
import time

import psycopg
import pytest

from ..conftest import DB_NAME, DB_PASSWORD, DB_USER, URI
from .fakes import service_account_info
from .streaming import StreamingLoad
from .test_credentials import home, run_proxy  # noqa: F401 (the credential tests' fixtures)
from .test_fault_matrix import echo_address, echo_uri, fd_count, rss_kib  # noqa: F401

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

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

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
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        return _soak(
            run_proxy, cred_emulator, fakes, echo_address, tmp_path, hold, token_life, bulk
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _soak(run_proxy, cred_emulator, fakes, echo_address, tmp_path, hold, token_life, bulk):  # noqa: F811
    uri = echo_uri("soak")
    cred_emulator.add_instance(uri, backend=echo_address)
    cred_emulator.faults.set(cert_lifetime=120)
    fakes.expires_in = token_life
    key = tmp_path / "key.json"
    key.write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    proxy = run_proxy(URI, "--credentials-file", str(key), instance=uri)
    echo_port, pg_port = proxy.port, proxy.port + 1
    pid = proxy.proc.pid
    idle_fds = fd_count(pid)
    cert_calls_before = _cert_calls(cred_emulator)
    token_calls_before = _token_calls(fakes)
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
        next_sample = hold_start
        while (now := time.monotonic()) < hold_start + hold:
            if now >= next_sample:
                samples.append(_sample(pid, now - hold_start, load))
                next_sample += 10
            time.sleep(0.5)
        samples.append(_sample(pid, time.monotonic() - hold_start, load))
        pg.stop()
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
        errors=sum(1 for s in streams if s.error) + len(pg.errors),
        error_examples=[s.error for s in streams if s.error][:3] + pg.errors[:3],
        bytes_lost=sum(s.lost for s in streams),
        ping_ms_first={"p50": percentile(first, 50) * 1e3, "p99": percentile(first, 99) * 1e3},
        ping_ms_last={"p50": percentile(last, 50) * 1e3, "p99": percentile(last, 99) * 1e3},
        query_ms_first={"p50": percentile(q_first, 50) * 1e3, "p99": percentile(q_first, 99) * 1e3},
        query_ms_last={"p50": percentile(q_last, 50) * 1e3, "p99": percentile(q_last, 99) * 1e3},
        window_s=edge,
        samples=samples,
    )

    # ---- bulk: random chunks, half-closes and resets, every byte checked ---------------
    rng = random.Random(7)
    bulk_load = StreamingLoad(echo_port, streams=0, max_chunk=256 * 1024, max_pause=0).start()
    endings = {"close": 0, "half-close": 0, "reset": 0}
    try:
        bulk_start, moved = time.monotonic(), 0
        active: list = []
        while moved < bulk or active:
            for s in [s for s in active if not s.alive]:
                active.remove(s)
                moved += s.verified if s.ending != "reset" else s.sent
            while moved + sum(s.budget for s in active) < bulk and len(active) < 20:
                ending = rng.choices(("close", "half-close", "reset"), (5, 3, 2))[0]
                budget = rng.randrange(1 << 20, 64 << 20)
                endings[ending] += 1
                active.append(bulk_load.add(echo_port, budget=budget, ending=ending))
            time.sleep(0.05)
        bulk_s = time.monotonic() - bulk_start
        bulk_streams = bulk_load.finish(timeout=60)
    finally:
        bulk_load.close()
    time.sleep(2)  # the proxy closes the instance side of the reset ones
    report.update(
        bulk_bytes=moved,
        bulk_mb_per_s=round(moved / bulk_s / 1e6, 1),
        bulk_streams=endings,
        bulk_errors=sum(1 for s in bulk_streams if s.error),
        bulk_error_examples=[s.error for s in bulk_streams if s.error][:3],
        bulk_bytes_lost=sum(s.lost for s in bulk_streams),
        cert_refreshes=_cert_calls(cred_emulator) - cert_calls_before,
        token_refreshes=_token_calls(fakes) - token_calls_before,
        fds_idle_before=idle_fds,
        fds_idle_after=fd_count(pid),
        proxy_alive=proxy.proc.poll() is None,
    )
    _print(report)
    if os.environ.get("ALLOYDB_SOAK_REPORT"):
        with open(os.environ["ALLOYDB_SOAK_REPORT"], "w") as fh:
            json.dump(report, fh, indent=2)
    return report


def _sample(pid: int, t: float, load: StreamingLoad) -> dict[str, float]:
    alive = sum(1 for s in load.streams if s.alive)
    return {"t": round(t), "rss_kib": rss_kib(pid), "fds": fd_count(pid), "streams": alive}


def _cert_calls(emulator) -> int:
    return sum(1 for r in emulator.admin_requests if r.path.endswith(":generateClientCertificate"))


def _token_calls(fakes) -> int:
    return sum(1 for p in fakes.paths() if p == "/token")


def _print(report: dict) -> None:
    print("\n| soak | value |\n| --- | --- |")
    for key, value in report.items():
        if key != "samples":
            print(f"| {key} | {value} |")
    print("\n| t (s) | RSS (KiB) | fds | echo streams open |\n| ---: | ---: | ---: | ---: |")
    for s in report["samples"]:  # type: ignore[union-attr]
        print(f"| {s['t']} | {s['rss_kib']} | {s['fds']} | {s['streams']} |")


def check(report: dict, hold: int, token_life: int) -> None:
    assert report["proxy_alive"]
    held = [s["streams"] for s in report["samples"]]
    assert all(n == CONNECTIONS - PG_SESSIONS for n in held), held  # every one, all along
    assert report["errors"] == 0, report["error_examples"]
    assert report["bytes_lost"] == 0 and report["bulk_bytes_lost"] == 0
    assert report["bulk_errors"] == 0, report["bulk_error_examples"]
    # The refreshes happened under the load: 2-minute certificates are renewed
    # as the rate limit allows (every 30 s), tokens before they expire.
    assert report["cert_refreshes"] >= hold // 30 - 1
    assert report["token_refreshes"] >= max(1, hold // token_life)
    # Nothing left behind: every connection's descriptors are closed again.
    assert report["fds_idle_after"] <= report["fds_idle_before"] + 2
    # Flat after warm-up: the last sample within 25 % (+16 MiB) of the one at a third.
    samples = report["samples"]
    warm = samples[len(samples) // 3]["rss_kib"]
    assert samples[-1]["rss_kib"] <= warm * 1.25 + 16 * 1024, samples
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
