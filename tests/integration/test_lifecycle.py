"""Health checks, the admin server's /quitquitquit and the SIGTERM delays, through the real CLI."""

from __future__ import annotations

import re
import resource
import signal
import time

import psycopg
import pytest

from .conftest import DB_NAME, DB_PASSWORD, DB_USER, URI, http_get, proxy_args
from .proxyproc import ProxyProcess, free_port_block


@pytest.fixture
def ports():
    base = free_port_block(4)
    return {"proxy": base, "http": base + 1, "admin": base + 2}


def start(emulator, ports, *args, ready=True):
    proc = ProxyProcess(
        proxy_args(
            emulator,
            ports,
            "--http-address",
            "127.0.0.1",
            "--http-port",
            str(ports["http"]),
            "--admin-port",
            str(ports["admin"]),
            *args,
        )
    )
    if ready:
        proc.wait_ready()
    return proc


def dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME}"


def test_health_endpoints(emulator, ports):
    proc = start(emulator, ports, "--health-check", "--max-connections", "1")
    try:
        base = f"http://127.0.0.1:{ports['http']}"
        proc.wait_for(rf"Starting health check server at 127\.0\.0\.1:{ports['http']}")
        assert http_get(f"{base}/startup") == (200, "ok")
        assert http_get(f"{base}/liveness", "POST") == (200, "ok")
        assert http_get(f"{base}/readiness") == (200, "ok")
        assert http_get(f"{base}/nope")[0] == 404
        with psycopg.connect(dsn(ports["proxy"])):
            status, body = http_get(f"{base}/readiness")
            assert status == 503 and body == "max connections reached (open = 1, max = 1)"
            proc.wait_for(
                r"\[Health Check\] Readiness failed: max connections reached", stream="stderr"
            )
        time.sleep(0.3)
        assert http_get(f"{base}/readiness") == (200, "ok")
    finally:
        assert proc.stop() == 143


def test_quitquitquit_exits_zero(emulator, ports):
    proc = start(emulator, ports, "--quitquitquit")
    proc.wait_for(rf"Enabling quitquitquit endpoint at localhost:{ports['admin']}")
    assert http_get(f"http://127.0.0.1:{ports['admin']}/quitquitquit", "PUT")[0] == 400
    assert http_get(f"http://127.0.0.1:{ports['admin']}/quitquitquit", "POST")[0] == 200
    assert proc.wait_exit() == 0
    assert "/quitquitquit received request. Shutting down..." in proc.output


def test_min_sigterm_delay_keeps_accepting(emulator, ports):
    proc = start(emulator, ports, "--min-sigterm-delay", "2s", "--health-check")
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_for("SIGTERM signal received. Shutting down...")
    # Still accepting during the delay, and readiness still 200 (as in the Go proxy).
    with psycopg.connect(dsn(ports["proxy"])) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert http_get(f"http://127.0.0.1:{ports['http']}/readiness") == (200, "ok")
    assert proc.wait_exit() == 143


def test_max_sigterm_delay_waits_for_connections_then_fails(emulator, ports):
    proc = start(emulator, ports, "--max-sigterm-delay", "1s")
    conn = psycopg.connect(dsn(ports["proxy"]), autocommit=True)
    conn.execute("SELECT 1")
    began = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait_exit() == 1
    waited = time.monotonic() - began
    conn.close()  # its tunnel ended with the process
    assert "error during shutdown: 1 connection(s) still open after waiting 1s" in proc.output
    assert 1.0 <= waited < 10, f"exited after {waited:.1f}s"


def test_max_sigterm_delay_lets_an_open_connection_finish(emulator, ports):
    """SIGTERM with a 5 s delay: the running query completes on its connection, and
    the proxy leaves as soon as that connection closes (after ≥ 1 s, well before 5 s)."""
    proc = start(emulator, ports, "--max-sigterm-delay", "5s")
    conn = psycopg.connect(dsn(ports["proxy"]), autocommit=True)
    began = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_for("SIGTERM signal received. Shutting down...")
    assert conn.execute("SELECT 42 FROM pg_sleep(1)").fetchone() == (42,)
    conn.close()
    assert proc.wait_exit() == 143
    waited = time.monotonic() - began
    assert 1.0 <= waited < 4.5, f"exited after {waited:.1f}s"
    assert "still open" not in proc.output


def test_max_sigterm_delay_ends_early_when_idle(emulator, ports):
    proc = start(emulator, ports, "--max-sigterm-delay", "30s", "--exit-zero-sigterm")
    began = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    assert time.monotonic() - began < 10  # not the 30 s: nothing was open
    # ...and the delay was read: a held connection would have kept it waiting.
    proc = start(emulator, ports, "--max-sigterm-delay", "2s", "--exit-zero-sigterm")
    conn = psycopg.connect(dsn(ports["proxy"]), autocommit=True)
    began = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait_exit() == 1
    assert time.monotonic() - began >= 2.0
    conn.close()


def test_bad_duration_is_a_bad_command(emulator, ports):
    proc = start(emulator, ports, "--max-sigterm-delay", "10", ready=False)
    assert proc.wait_exit() == 1
    assert proc.stderr[0] == (
        'Error: invalid argument "10" for "--max-sigterm-delay" flag: '
        'time: missing unit in duration "10"'
    )


def test_health_port_in_use_is_a_terminal_error(emulator, ports):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["http"]))
        busy.listen()
        proc = start(emulator, ports, "--health-check")
        assert proc.wait_exit() == 1
    assert "The proxy has encountered a terminal error: failed to start HTTP server:" in proc.output


def test_systemd_notify(emulator, ports, tmp_path):
    import socket as socketlib

    path = str(tmp_path / "notify.sock")
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(20)
        proc = ProxyProcess(
            [
                URI,
                "--port",
                str(ports["proxy"]),
                "--token",
                "tok-app",
                "--alloydbadmin-api-endpoint",
                emulator.admin_url,
            ],
            env={"NOTIFY_SOCKET": path},
        )
        proc.wait_ready()
        assert systemd.recv(100) == b"READY=1"
        assert proc.stop() == 143
        assert systemd.recv(100) == b"STOPPING=1"


def test_run_connection_test(emulator, ports):
    proc = start(emulator, ports, "--run-connection-test")
    proc.wait_for("Connection test passed")
    assert emulator.mdx_requests  # it really dialled, exchange included
    assert proc.stop() == 143
    emulator.instances[URI].faults.set(mdx_error="not today")
    proc = start(emulator, ports, "--run-connection-test", ready=False)
    assert proc.wait_exit() == 1
    assert "Connection test failed" in proc.output
    assert proc.stderr[-1].endswith("The proxy has encountered a terminal error: not today")


def run_sub(*args, timeout=60):
    proc = ProxyProcess(list(args))
    proc.wait_exit(timeout)
    return proc


def test_wait_and_shutdown_subcommands(emulator, ports):
    http, admin = str(ports["http"]), str(ports["admin"])
    assert run_sub("shutdown", "--admin-port", admin).proc.returncode == 1
    waited = run_sub("wait", "--http-port", http, "--max", "1s")
    assert waited.proc.returncode == 1
    assert waited.stderr == ["Error: command failed to complete successfully"]
    proc = start(emulator, ports, "--health-check", "--quitquitquit", ready=False)
    assert run_sub("wait", "--http-address", "127.0.0.1", "--http-port", http).proc.returncode == 0
    assert run_sub("shutdown", "--admin-port", admin).proc.returncode == 0
    assert proc.wait_exit() == 0


def test_completion_and_help_subcommands():
    assert "_ALLOYDB_AUTH_PROXY_COMPLETE" in run_sub("completion", "bash").output
    assert "--credentials-file" in run_sub("help").output


def test_prometheus_metrics(emulator, ports):
    base = f"http://127.0.0.1:{ports['http']}/metrics"
    proc = start(emulator, ports, "--prometheus", "--prometheus-namespace", "my-app")
    proc.wait_for("Starting health check server at")
    try:
        assert http_get(base) == (200, "")  # no series before the first dial, as in the Go proxy
        with psycopg.connect(dsn(ports["proxy"])) as conn:
            conn.execute("SELECT repeat('x', 100000)").fetchone()
            status, text = http_get(base)
            assert status == 200
            assert "# TYPE my_app_alloydbconn_open_connections gauge" in text
            assert 'alloydb_instance="project-id.us-central1.clust.inst"} 1' in text
        time.sleep(0.3)
        _, text = http_get(base)
        series = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        short = 'alloydb_instance="project-id.us-central1.clust.inst"'
        by_name = {k.split("{")[0]: v for k, v in series.items() if short in k or URI in k}
        assert by_name["my_app_alloydbconn_dial_latency_count"] == "1"
        assert by_name["my_app_alloydbconn_open_connections"] == "0"
        assert by_name["my_app_alloydbconn_refresh_success_count"] == "1"
        assert int(by_name["my_app_alloydbconn_bytes_received"]) > 100000
        assert int(by_name["my_app_alloydbconn_bytes_sent"]) > 0
        assert "# TYPE my_app_alloydbconn_bytes_sent counter" in text
        assert "_total" not in text
    finally:
        proc.stop()


def test_prometheus_failure_series_are_exact(emulator, ports):
    """After an induced Admin API failure: the exact dial-failure and refresh-failure
    series, the error code being the API's ErrorInfo reason."""
    other = URI.replace("/instances/inst", "/instances/other")
    emulator.add_instance(other).faults.set(admin_status=429, admin_status_method="connectionInfo")
    http_port = free_port_block(1)
    base = f"http://127.0.0.1:{http_port}/metrics"
    proc = ProxyProcess(
        [URI, other, "--port", str(ports["proxy"]), "--token", "tok-app",
         "--alloydbadmin-api-endpoint", emulator.admin_url, "--prometheus",
         "--http-address", "127.0.0.1", "--http-port", str(http_port)]
    )  # fmt: skip
    with proc:
        proc.wait_ready()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn(ports["proxy"] + 1), connect_timeout=20)
        proc.wait_for("failed to connect to instance", stream="stderr")
        with psycopg.connect(dsn(ports["proxy"])) as conn:
            conn.execute("SELECT 1")
        _, text = http_get(base)
    dialer = r'alloydb_dialer_id="[0-9a-f-]{36}"'
    other_short = "project-id.us-central1.clust.other"
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    expected = [
        rf'alloydbconn_dial_failure_count\{{{dialer},alloydb_instance="{other}"\}} 1',
        rf"alloydbconn_refresh_failure_count\{{{dialer},"
        rf'alloydb_error_code="RATE_LIMIT_EXCEEDED",alloydb_instance="{other_short}"\}} 1',
        rf"alloydbconn_refresh_success_count\{{{dialer},"
        rf'alloydb_instance="project-id.us-central1.clust.inst"\}} 1',
    ]
    for pattern in expected:
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, lines)
    assert not any("dial_failure_count" in line and URI + '"' in line for line in lines)


def test_open_file_limit_is_raised_to_the_hard_limit(emulator, ports):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    # Start the proxy with a soft limit of 1024, as a login shell would.
    proc = ProxyProcess(
        [URI, "--port", str(ports["proxy"]), "--token", "tok-app",
         "--alloydbadmin-api-endpoint", emulator.admin_url],
        prefix=["prlimit", "--nofile=1024:", "--"],
    )  # fmt: skip
    with proc:
        proc.wait_ready()
        with open(f"/proc/{proc.proc.pid}/limits") as fh:
            line = next(row for row in fh if row.startswith("Max open files"))
        soft = line.split()[3]
        assert soft == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard))


def test_systemd_hears_stopping_once_when_the_connection_test_fails(emulator, ports, tmp_path):
    """READY=1 comes before the connection test (as in Go); a failed test must still
    say STOPPING=1, once."""
    import socket as socketlib

    path = str(tmp_path / "notify.sock")
    emulator.instances[URI].faults.set(mdx_error="not today")
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(20)
        proc = ProxyProcess(
            [URI, "--port", str(ports["proxy"]), "--token", "tok-app", "--run-connection-test",
             "--alloydbadmin-api-endpoint", emulator.admin_url],
            env={"NOTIFY_SOCKET": path},
        )  # fmt: skip
        assert proc.wait_exit() == 1
        assert systemd.recv(100) == b"READY=1"
        assert systemd.recv(100) == b"STOPPING=1"
        systemd.settimeout(0.5)
        with pytest.raises(TimeoutError):
            systemd.recv(100)


def test_the_connection_test_dials_every_listener_of_an_instance(emulator):
    """Two listeners of one instance with different options are two dials (as Go
    dials each mount): the one asking for an IP type the instance lacks fails it."""
    private_only = URI.replace("/instances/inst", "/instances/private")
    emulator.add_instance(private_only)
    base = free_port_block(2)
    proc = ProxyProcess(
        [f"{private_only}?port={base}&public-ip=true", f"{private_only}?port={base + 1}",
         "--run-connection-test", "--token", "tok-app",
         "--alloydbadmin-api-endpoint", emulator.admin_url]
    )  # fmt: skip
    assert proc.wait_exit() == 1
    assert 'instance does not have IP of type "PUBLIC"' in proc.stderr[-1]


def test_startup_with_backend_check_fails_while_shutting_down(emulator, ports):
    """Between SIGTERM and the end of --max-sigterm-delay the listeners are gone:
    /startup with --with-backend-check must not call that healthy."""
    proc = start(emulator, ports, "--health-check", "--with-backend-check",
                 "--max-sigterm-delay", "10s")  # fmt: skip
    http = f"http://127.0.0.1:{ports['http']}"
    proc.wait_for("Starting health check server")  # it starts after the ready line
    deadline = time.monotonic() + 10
    while http_get(f"{http}/startup") != (200, "ok"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    dsn = f"host=127.0.0.1 port={ports['proxy']} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME}"
    with psycopg.connect(dsn) as held:  # keeps the shutdown waiting
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_for("SIGTERM signal received. Shutting down...")
        time.sleep(0.5)
        status, body = http_get(f"{http}/startup")
        assert status == 503 and "dialer is closed" in body, (status, body)
        held.execute("SELECT 1")
    assert proc.wait_exit() == 143
