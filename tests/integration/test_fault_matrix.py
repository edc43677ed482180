"""The fault matrix: each row injects one fault while 50 checksummed streams run
through the real CLI, and checks its defined outcome (docs/reliability.md has
the table). The streams go to instances whose backend is an echo server, so
every byte is compared with the byte sent (tests/integration/streaming.py).

The Admin API rows share one run (``admin_fault_run``): seven instances, each
in a cluster of its own so that each can be given its own Admin API fault,
with two-minute certificates, so that a refresh comes every 30 s (the rate
limit) and the faults meet real refreshes.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

from proxy.emulator.echo import echo_backend

from .. import leakcheck
from .proxyproc import ProxyProcess, fd_count, free_port_block
from .streaming import STARTUP, StreamingLoad, echo_uri
from .test_credentials import home, run_proxy  # noqa: F401 (the credential tests' fixtures)

pytestmark = pytest.mark.faultmatrix


@pytest.fixture
def echo_address():
    port, stop = echo_backend()
    yield ("127.0.0.1", port)
    stop()


@pytest.fixture
def echo_instances(emulator, echo_address):
    """add(name, cluster="clust") -> URI of a new instance whose backend echoes."""

    def add(name: str, cluster: str = "clust") -> str:
        uri = echo_uri(name, cluster)
        emulator.add_instance(uri, backend=echo_address)
        return uri

    return add


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1))


def assert_clean(streams, what: str = "streams") -> None:
    """Every stream finished: every byte it sent came back, in order."""
    broken = [s for s in streams if not s.finished]
    assert not broken, f"{len(broken)} {what} did not finish cleanly: " + "; ".join(
        f"#{s.ident}: {s.error}" for s in broken[:5]
    )
    assert sum(s.lost for s in streams) == 0
    assert all(s.verified == s.sent for s in streams)


def opened_at_once(stream) -> None:
    """A connection made mid-fault was served at once, on the certificate in hand."""
    assert stream.opened and stream.open_s < 5, (stream.open_s, stream.error)


def test_instance_resets_one_connection(start_proxy, emulator, echo_instances):
    """The instance resets one connection: that one ends, the 50 others do not notice."""
    uri = echo_instances("echo")
    port = free_port_block(1)
    proxy = start_proxy(uri, "--port", str(port))
    with StreamingLoad(port) as load:
        load.wait_progress()
        emulator.instances[uri].faults.set(reset_after_bytes=200_000)
        victim = load.add(port)
        emulator.instances[uri].faults.clear()
        load.wait_ended([victim], timeout=30)
        assert victim.error is not None and victim.verified <= 200_000
        load.wait_progress(streams=load.streams[:50])
        streams = load.finish()
    assert_clean(streams[:50])
    assert proxy.proc.poll() is None


def test_instance_restart_ends_its_connections_only(start_proxy, emulator, echo_instances):
    """A maintenance restart of one instance: its connections end (none hangs),
    the other instance's go on, and new connections succeed once it is back."""
    restarting, steady = echo_instances("restarting"), echo_instances("steady")
    port = free_port_block(2)
    proxy = start_proxy(restarting, steady, "--port", str(port))
    with StreamingLoad([port, port + 1]) as load:
        load.wait_progress()
        emulator.restart_instance(restarting, down_for=1.0)
        on_restarting = [s for s in load.streams if s.port == port]
        load.wait_ended(on_restarting, timeout=30)
        assert all(s.error for s in on_restarting)
        on_steady = [s for s in load.streams if s.port == port + 1]
        load.wait_progress(streams=on_steady)
        after = load.add(port)
        assert after.error is None, after.error
        load.wait_progress(streams=[after])
        load.finish()
    assert_clean([*on_steady, after])
    assert proxy.proc.poll() is None


def test_a_client_that_stops_reading(start_proxy, echo_instances):
    """A client sends 64 MiB and never reads: the proxy stops reading its instance
    side (what it holds stays bounded) and the 50 others go on."""
    uri = echo_instances("echo")
    port = free_port_block(1)
    proxy = start_proxy(uri, "--port", str(port))
    with StreamingLoad(port) as load:
        load.wait_progress()
        before = rss_kib(proxy.proc.pid)
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.setblocking(False)
            pushed, block = 0, STARTUP + os.urandom(1 << 20)
            deadline = time.monotonic() + 10
            while pushed < 64 << 20 and time.monotonic() < deadline:
                try:
                    pushed += slow.send(block[: (64 << 20) - pushed])
                except BlockingIOError:
                    time.sleep(0.01)
            load.wait_progress()
            grown = rss_kib(proxy.proc.pid) - before
        load.wait_progress()
        streams = load.finish()
    # The client could push only what the buffers on the way hold (loopback's
    # grow to several MiB per socket, and the path has ten of them), not 64 MiB.
    print(f"slow reader pushed {pushed >> 20} MiB; proxy RSS grew {grown} KiB")
    assert pushed < 64 << 20, pushed
    assert grown < 16 * 1024, f"proxy RSS grew by {grown} KiB"
    assert_clean(streams)


def test_running_out_of_file_descriptors_under_load(emulator, echo_instances):
    """EMFILE: the proxy refuses what it cannot take, keeps the 50 streams, accepts
    again once descriptors are free, and holds none of the refused ones after."""
    uri = echo_instances("echo")
    port = free_port_block(1)
    proxy = ProxyProcess(
        [uri, "--port", str(port), "--token", "tok-app",
         "--alloydbadmin-api-endpoint", emulator.admin_url],
        prefix=["prlimit", "--nofile=200:200", "--"],
    )  # fmt: skip
    extra: list[socket.socket] = []
    try:
        proxy.wait_ready()
        idle_fds = fd_count(proxy.proc.pid)
        with StreamingLoad(port) as load:
            load.wait_progress()
            for _ in range(200):
                extra.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                extra[-1].sendall(STARTUP)
                time.sleep(0.01)
                if "Too many open files" in proxy.output:
                    break
            proxy.wait_for(r"Too many open files", stream="stderr")
            load.wait_progress()
            for sock in extra:
                sock.close()
            extra.clear()
            time.sleep(1.5)
            after = load.add(port)
            assert after.error is None, after.error
            load.wait_progress()
            streams = load.finish()
        assert_clean(streams)
        assert proxy.proc.poll() is None
        deadline = time.monotonic() + 10
        while fd_count(proxy.proc.pid) > idle_fds + 2:
            assert time.monotonic() < deadline, f"{fd_count(proxy.proc.pid)} fds, {idle_fds} idle"
            time.sleep(0.2)
    finally:
        for sock in extra:
            sock.close()
        proxy.stop()


def test_sigterm_with_max_sigterm_delay_loses_nothing(start_proxy, echo_instances):
    """SIGTERM with --max-sigterm-delay 20s: new connections are refused, and the 50
    transfers, ended within the delay, lose nothing; the proxy then exits (143)."""
    uri = echo_instances("echo")
    port = free_port_block(1)
    proxy = start_proxy(uri, "--port", str(port), "--max-sigterm-delay", "20s")
    with StreamingLoad(port) as load:
        load.wait_progress()
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_for("SIGTERM signal received")
        load.wait_progress()  # still flowing after the signal
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        streams = load.finish()
    assert_clean(streams)
    assert proxy.wait_exit() == 143
    assert "still open" not in proxy.output


FAKETIME = next(iter(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")), "")


@pytest.mark.skipif(not FAKETIME, reason="libfaketime is not installed (Debian's faketime)")
def test_a_wall_clock_jump_forward_refreshes_the_certificate(emulator, echo_instances, tmp_path):
    """The wall clock jumps 15 minutes ahead (monotonic time does not, as on a real
    jump): the ten-minute certificate now looks expired, and the next connection
    makes the proxy fetch a new one instead of dialing with it. The open streams
    do not notice."""
    uri = echo_instances("echo")
    port = free_port_block(1)
    emulator.faults.set(cert_lifetime=600)
    clock = tmp_path / "clock"
    clock.write_text("+0\n")
    proxy = ProxyProcess(
        [uri, "--port", str(port), "--token", "tok-app",
         "--alloydbadmin-api-endpoint", emulator.admin_url],
        env={"LD_PRELOAD": FAKETIME, "FAKETIME_TIMESTAMP_FILE": str(clock),
             "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
             "FAKETIME_DONT_RESET": "1"},
    )  # fmt: skip
    try:
        proxy.wait_ready()
        with StreamingLoad(port) as load:
            load.wait_progress()
            issued = cert_calls(emulator)
            emulator.faults.set(cert_lifetime=7200)  # the next one looks valid after the jump
            clock.write_text("+15m\n")
            time.sleep(2.5)  # libfaketime reads the file at most once a second
            after = load.add(port)
            assert after.error is None, after.error
            assert cert_calls(emulator) > issued
            load.wait_progress()
            streams = load.finish()
        assert_clean(streams)
    finally:
        proxy.stop()


def cert_calls(emulator, cluster: str | None = None) -> int:
    return sum(
        1
        for r in emulator.admin_requests
        if r.path.endswith(":generateClientCertificate")
        and (cluster is None or f"/clusters/{cluster}:" in r.path)
    )


def test_token_endpoint_failing_while_connections_are_open(
    run_proxy,  # noqa: F811
    cred_emulator,
    fakes,
    echo_address,
    tmp_path,
):
    """The OAuth2 token endpoint starts answering 500 with 50 streams open: they go
    on; new connections go on while the token is valid, fail with an error that
    names the token once it has expired, and work again when the endpoint does."""
    import json

    from .fakes import service_account_info

    uri = echo_uri("echo")
    cred_emulator.add_instance(uri, backend=echo_address)
    fakes.expires_in = 10
    (tmp_path / "key.json").write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    proxy = run_proxy("--credentials-file", str(tmp_path / "key.json"), instance=uri)
    with StreamingLoad(proxy.port) as load:
        load.wait_progress()
        fakes.token_status = 500
        valid_still = load.add(proxy.port)
        opened_at_once(valid_still)
        time.sleep(11)  # every token issued before the failure has expired now
        refused = load.add(proxy.port)
        assert not refused.opened, "a connection worked without a valid token"
        line = proxy.wait_for(r"failed to connect to instance", stream="stderr")
        assert line.endswith(
            f"failed to get an OAuth2 token ({tmp_path / 'key.json'}): temporarily_unavailable"
        ), line
        fakes.token_status = None
        deadline = time.monotonic() + 20
        while (after := load.add(proxy.port)).error is not None:
            assert time.monotonic() < deadline, f"no recovery: {after.error}"
            time.sleep(1)
        load.wait_progress(streams=load.streams[:50])
        streams = load.finish()
    assert_clean([*streams[:50], valid_still, after])


# ---- the Admin API rows: one shared run ----------------------------------------------

ADMIN_ROWS = ("steady", "e500", "e503", "malformed", "slow", "hang", "down")
_SERIES = re.compile(
    r'refresh_(success|failure)_count\{[^}]*alloydb_instance="([^"]+)"[^}]*\} (\d+)'
)


def short_name(row: str) -> str:
    return f"project-id.us-central1.c-{row}.{row}"


def refresh_counts(metrics_url: str) -> dict[str, dict[str, int]]:
    """{"success"|"failure": {instance short name: refreshes}} from /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    leakcheck.record(f"GET {metrics_url}", text)
    counts: dict[str, dict[str, int]] = {"success": {}, "failure": {}}
    for kind, short, n in _SERIES.findall(text):
        counts[kind][short] = counts[kind].get(short, 0) + int(n)
    return counts


@dataclass
class AdminFaultRun:
    """What the shared run saw, per row (instance)."""

    before: dict[str, dict[str, int]]  # refresh counts when the faults were set
    after: dict[str, dict[str, int]]  # and at the end
    during: dict[str, object] = field(default_factory=dict)  # per row: a stream opened mid-fault
    expired_dial: str = ""  # the proxy's log line for the failed dial after expiry
    recovered_after_expiry: object = None
    streams: list = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    alive: bool = False
    timeline: list[str] = field(default_factory=list)  # Admin API calls, seconds after the set

    def calls(self, row: str) -> str:
        return "; ".join(t for t in self.timeline if f"c-{row}" in t)

    def delta(self, kind: str, row: str, now: dict[str, dict[str, int]] | None = None) -> int:
        """Refreshes of ``kind`` ("success"/"failure") for the row since the faults were set."""
        short = short_name(row)
        return (now or self.after)[kind].get(short, 0) - self.before[kind].get(short, 0)

    def settled(self, now: dict[str, dict[str, int]]) -> bool:
        """Every row has shown its whole outcome."""
        return (
            self.recovered_after_expiry is not None
            and all(r in self.during for r in ("e500", "e503", "malformed", "slow", "hang"))
            and all(self.delta("failure", r, now) >= 1 for r in ("e500", "malformed", "hang"))
            and all(self.delta("success", r, now) >= 1 for r in ADMIN_ROWS if r != "down")
        )


@pytest.fixture(scope="module")
def admin_fault_run(make_emulator_module, echo_address_module):
    """One proxy, seven echo instances (a cluster each), 50 streams; the faults
    meet the refreshes that come every 30 s. About 100 s in all."""
    emulator = make_emulator_module
    uris = {row: echo_uri(row, f"c-{row}") for row in ADMIN_ROWS}
    for uri in uris.values():
        emulator.add_instance(uri, backend=echo_address_module)
    emulator.faults.set(cert_lifetime=120)  # refresh at once, then as the rate limit allows
    emulator.instances[uris["down"]].faults.set(cert_lifetime=45)
    base = free_port_block(len(ADMIN_ROWS) + 1)
    http_port = base + len(ADMIN_ROWS)
    ports = {row: base + i for i, row in enumerate(ADMIN_ROWS)}
    proxy = ProxyProcess(
        [*uris.values(), "--port", str(base), "--token", "tok-app", "--prometheus",
         "--http-port", str(http_port), "--alloydbadmin-api-endpoint", emulator.admin_url],
    )  # fmt: skip
    metrics_url = f"http://127.0.0.1:{http_port}/metrics"
    try:
        proxy.wait_ready()
        with StreamingLoad(list(ports.values())) as load:
            load.wait_progress()
            time.sleep(3)  # the first fetch and the immediate refresh are done
            set_at = time.monotonic()
            run = AdminFaultRun(before=refresh_counts(metrics_url), after={}, ports=ports)
            faults = {row: emulator.instances[uris[row]].faults for row in ADMIN_ROWS}
            faults["e500"].set(admin_status=500, admin_status_count=1)
            faults["e503"].set(admin_status=503, admin_status_count=3)
            faults["malformed"].set(admin_malformed=True, admin_status_count=1)
            faults["slow"].set(admin_latency=30.0)
            faults["hang"].set(admin_latency=65.0)  # past the 60 s request deadline
            faults["down"].set(admin_status=500)  # fails at once (a 503 is retried for 60 s)

            def called_since(row: str) -> bool:
                return any(
                    r.at > set_at and f"/clusters/c-{row}" in r.path
                    for r in list(emulator.admin_requests)
                )

            stopped_latency: set[str] = set()
            probed: set[str] = set()
            deadline = set_at + 150
            while time.monotonic() < deadline:
                for row in ("slow", "hang"):
                    if row not in stopped_latency and called_since(row):
                        faults[row].set(admin_latency=0.0)  # only the call in flight is slow
                        stopped_latency.add(row)
                # A new connection while the refresh is failing or in flight uses
                # the certificate the proxy has.
                for row in ("e500", "e503", "malformed", "slow", "hang"):
                    if row not in probed and called_since(row):
                        time.sleep(0.5)
                        run.during[row] = load.add(ports[row], timeout=10)
                        probed.add(row)
                if not run.expired_dial and time.monotonic() > set_at + 62:
                    # down's 45 s certificate expired near +41 and the refresh
                    # near +56 failed too: a new connection cannot be served.
                    refused = load.add(ports["down"], timeout=20)
                    assert not refused.opened, "a dial with an expired certificate worked"
                    run.expired_dial = proxy.wait_for(
                        rf"\[{re.escape(short_name('down'))}\] failed to connect", stream="stderr"
                    )
                    faults["down"].clear()
                if run.expired_dial and run.recovered_after_expiry is None:
                    attempt = load.add(ports["down"], timeout=10)
                    if attempt.opened:
                        run.recovered_after_expiry = attempt
                counts = refresh_counts(metrics_url)
                if run.settled(counts):
                    break
                time.sleep(1)
            load.wait_progress()
            run.streams = load.finish()
        run.after = refresh_counts(metrics_url)
        run.timeline = [
            f"+{r.at - set_at:.1f} {r.path.rsplit('/', 3)[-3]}/{r.path.rsplit('/', 1)[-1]}"
            for r in list(emulator.admin_requests)
            if r.at > set_at - 10
        ]
        run.alive = proxy.proc.poll() is None
        yield run
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def make_emulator_module(pg):
    from proxy.emulator import Emulator

    from ..conftest import TOKENS

    emu = Emulator(postgres_host=pg.host, postgres_port=pg.port, tokens=TOKENS)
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture(scope="module")
def echo_address_module():
    port, stop = echo_backend()
    yield ("127.0.0.1", port)
    stop()


def test_open_streams_survive_every_admin_api_fault(admin_fault_run):
    """All 50 streams (plus the ones opened mid-fault) kept every byte, and the proxy lives."""
    assert admin_fault_run.alive
    opened_later = [s for s in admin_fault_run.streams if s.ident >= 50 and s.opened]
    assert len(opened_later) >= 6  # the five mid-fault ones and the recovered one
    assert_clean([*admin_fault_run.streams[:50], *opened_later])


@pytest.mark.parametrize("row", ["e500", "malformed"])
def test_a_failed_refresh_is_retried_later_and_new_connections_go_on(admin_fault_run, row):
    """HTTP 500 / a malformed JSON answer during a refresh: the refresh fails, new
    connections use the still-valid certificate, the next try (rate limited) succeeds."""
    opened_at_once(admin_fault_run.during[row])
    # The first call after the faults were set takes the fault (the rate limit
    # leaves no refresh in between), so every success counted is a later retry.
    assert admin_fault_run.delta("failure", row) >= 1, admin_fault_run.calls(row)
    assert admin_fault_run.delta("success", row) >= 1, admin_fault_run.calls(row)


def test_a_503_is_retried_within_the_refresh(admin_fault_run):
    """503 three times: retried with back-off inside the same refresh, which succeeds."""
    opened_at_once(admin_fault_run.during["e503"])
    assert admin_fault_run.delta("failure", "e503") == 0
    assert admin_fault_run.delta("success", "e503") >= 1


@pytest.mark.parametrize("row", ["slow", "hang"])
def test_a_slow_or_silent_admin_api_holds_no_connection(admin_fault_run, row):
    """An answer after 30 s, or none within the 60 s deadline: the refresh waits (or
    times out and is tried again) while new connections use the current certificate."""
    opened_at_once(admin_fault_run.during[row])
    if row == "hang":  # the timed-out call failed the refresh; the retry succeeded
        assert admin_fault_run.delta("failure", row) >= 1, admin_fault_run.calls(row)
        assert admin_fault_run.delta("success", row) >= 1, admin_fault_run.calls(row)
    else:
        assert admin_fault_run.delta("failure", row) == 0
        assert admin_fault_run.delta("success", row) >= 1


def test_admin_api_down_past_certificate_expiry(admin_fault_run):
    """Down (HTTP 500) until the certificate expired: new connections fail with a clear error,
    the open ones go on, and it recovers once the API answers again."""
    run = admin_fault_run
    assert "Error 500" in run.expired_dial, run.expired_dial
    assert run.recovered_after_expiry is not None, run.calls("down")
    assert run.recovered_after_expiry.finished
    on_down = [s for s in run.streams[:50] if s.port == run.ports["down"]]
    assert on_down and all(s.finished for s in on_down)
