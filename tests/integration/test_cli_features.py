"""Flags beyond the main path: --debug, --with-backend-check, --static-connection-info,
IPv6 listeners, log formats and --user-agent (real CLI subprocess)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import socket
import time
from pathlib import Path

import psycopg
import pytest

from proxy import dataplane
from proxy.emulator.pki import key_pem, new_key

from .conftest import DB_NAME, DB_PASSWORD, DB_USER, URI, http_get, psql
from .proxyproc import ProxyProcess, free_port_block

SHORT = "project-id.us-central1.clust.inst"


def test_debug_serves_python_profiles_on_the_admin_port(start_proxy, port):
    admin = free_port_block(1)
    proxy = start_proxy(URI, "--port", str(port), "--debug", "--admin-port", str(admin))
    proxy.wait_for(f"Enabling pprof endpoints at localhost:{admin}")
    base = f"http://127.0.0.1:{admin}/debug/pprof/"

    status, index = http_get(base)
    assert status == 200
    for name in ("goroutine", "heap", "profile", "cmdline"):
        assert f"/debug/pprof/{name}" in index
    status, tasks = http_get(base + "goroutine")
    assert status == 200 and "asyncio task(s)" in tasks and "thread" in tasks
    status, heap = http_get(base + "heap")
    assert status == 200 and re.search(r"^rss_kib \d+$", heap, re.M)
    assert re.search(r"^data_plane_thread_0_connections \d+$", heap, re.M)
    status, profile = http_get(base + "profile?seconds=1")
    assert status == 200 and "samples of the event-loop thread over 1s" in profile
    assert http_get(base + "profile?seconds=nope")[0] == 400
    status, cmdline = http_get(base + "cmdline")
    assert status == 200 and URI in cmdline.split("\x00")
    assert http_get(base + "trace")[0] == 501
    # The proxy kept serving while it was being profiled.
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"


def test_with_backend_check_dials_on_every_startup_probe(start_proxy, emulator, port):
    http = free_port_block(1)
    proxy = start_proxy(
        URI, "--port", str(port), "--health-check", "--with-backend-check",
        "--http-address", "127.0.0.1", "--http-port", str(http),
    )  # fmt: skip
    proxy.wait_for("Starting health check server")
    startup = f"http://127.0.0.1:{http}/startup"
    assert http_get(startup) == (200, "ok")

    emulator.instances[URI].faults.set(mdx_error="instance is in maintenance")
    status, body = http_get(startup)
    assert status == 503 and "instance is in maintenance" in body
    proxy.wait_for(r"\[Health Check\] Startup failed: .*instance is in maintenance")

    emulator.instances[URI].faults.set(mdx_error=None)
    assert http_get(startup) == (200, "ok")


def test_without_backend_check_startup_does_not_dial(start_proxy, emulator, port):
    http = free_port_block(1)
    proxy = start_proxy(
        URI, "--port", str(port), "--health-check",
        "--http-address", "127.0.0.1", "--http-port", str(http),
    )  # fmt: skip
    proxy.wait_for("Starting health check server")
    emulator.instances[URI].faults.set(mdx_error="instance is in maintenance")
    assert http_get(f"http://127.0.0.1:{http}/startup") == (200, "ok")


def static_info_file(emulator, tmp_path):
    inst = emulator.instances[URI]
    key = new_key()
    leaf = inst.ca.client_certificate(key.public_key(), dt.timedelta(hours=1))
    path = tmp_path / "static.json"
    path.write_text(
        json.dumps(
            {
                "publicKey": "",
                "privateKey": key_pem(key).decode(),
                URI: {
                    "ipAddress": inst.private_ip,
                    "publicIpAddress": inst.public_ip,
                    "pscInstanceConfig": {"pscDnsName": inst.psc_dns_name},
                    "pemCertificateChain": inst.ca.chain_pems(leaf),
                    "caCert": inst.ca.root_pem,
                },
            }
        )
    )
    return path


def test_static_connection_info_needs_no_admin_api(emulator, port, tmp_path):
    path = static_info_file(emulator, tmp_path)
    before = len(emulator.admin_requests)
    dead_api = f"http://127.0.0.1:{free_port_block(1)}"
    with ProxyProcess(
        [URI, "--port", str(port), "--token", "tok-app",
         "--static-connection-info", str(path), "--alloydbadmin-api-endpoint", dead_api],
    ) as proxy:  # fmt: skip
        proxy.wait_ready()
        assert psql("SELECT 40 + 2", host="127.0.0.1", port=port).stdout.strip() == "42"
    assert len(emulator.admin_requests) == before


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, r"open {path}: no such file or directory"),
        ("{not json", r"{path}: invalid JSON: "),
        ('{"privateKey": "x", "' + URI + '": {"caCert": "c"}}',
         r'{path}: instance "{uri}": "pemCertificateChain" must be a list of PEM strings'),
    ],
    ids=["missing", "not-json", "no-chain"],
)  # fmt: skip
def test_bad_static_connection_info_is_a_terminal_error(emulator, tmp_path, content, reason):
    path = tmp_path / "static.json"
    if content is not None:
        path.write_text(content)
    proxy = ProxyProcess(
        [URI, "--port", str(free_port_block(1)), "--token", "tok-app",
         "--static-connection-info", str(path)],
    )  # fmt: skip
    assert proxy.wait_exit() == 1
    expected = reason.format(path=re.escape(str(path)), uri=re.escape(URI))
    proxy.wait_for(
        r"The proxy has encountered a terminal error: unable to start: "
        r"error initializing dialer: " + expected,
        stream="stderr",
    )


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _dataplane_threads(pid: int) -> list[str]:
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            names.append((task / "comm").read_text().strip())
    return sorted(n for n in names if n.startswith("dataplane-"))


@pytest.mark.skipif(
    dataplane.NAME != "native", reason="the portable plane has no threads of its own"
)
def test_data_plane_threads_spread_connections(start_proxy, port):
    """--data-plane-threads 3: six sessions held open run on three named threads,
    each started by its first connection; the default is one per usable CPU."""
    proxy = start_proxy(URI, "--port", str(port), "--data-plane-threads", "3", "--debug-logs")
    proxy.wait_for("Data plane threads: 3")
    assert _dataplane_threads(proxy.proc.pid) == []  # none before the first connection
    dsn = f"host=127.0.0.1 port={port} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME}"
    sessions = [psycopg.connect(dsn) for _ in range(6)]
    try:
        for i, conn in enumerate(sessions):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        assert _dataplane_threads(proxy.proc.pid) == ["dataplane-0", "dataplane-1", "dataplane-2"]
    finally:
        for conn in sessions:
            conn.close()

    default = start_proxy(URI, "--port", str(port + 1), "--debug-logs")
    default.wait_for(f"Data plane threads: {min(len(os.sched_getaffinity(0)), 16)}")


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_ipv6_listeners(start_proxy, port):
    proxy = start_proxy(URI, "--address", "::1", "--port", str(port))
    assert f"[{SHORT}] Listening on [::1]:{port}" in proxy.output
    assert psql("SELECT 1", host="::1", port=port).stdout.strip() == "1"

    other = free_port_block(1)
    query = start_proxy(f"{URI}?address=::1&port={other}")
    assert f"[{SHORT}] Listening on [::1]:{other}" in query.output


def test_structured_logs_are_json_lines(start_proxy, port):
    proxy = start_proxy(URI, "--port", str(port), "--structured-logs")
    psql("SELECT 1", host="127.0.0.1", port=port)
    proxy.wait_for("accepted connection")
    records = [json.loads(line) for line in proxy.stdout if line.strip()]
    assert records, "no log lines"
    for record in records:
        assert set(record) == {"timestamp", "severity", "message"}
        dt.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    assert any(
        r["severity"] == "INFO" and r["message"].endswith("ready for new connections!")
        for r in records
    )


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_quiet_logs_errors_only(start_proxy, emulator, port):
    # No ready line under --quiet: wait for the listener instead.
    proxy = start_proxy(URI, "--port", str(port), "--quiet", ready=False)
    wait_listening(port)
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"
    emulator.instances[URI].faults.set(mdx_error="refused for the test")
    psql("SELECT 1", host="127.0.0.1", port=port, check=False)
    proxy.wait_for("refused for the test", stream="stderr")
    assert proxy.stdout == []


def test_user_agent_is_appended_in_admin_api_calls(start_proxy, emulator, port):
    start_proxy(URI, "--port", str(port), "--user-agent", "custom-agent/0.0.1 etl/2")
    psql("SELECT 1", host="127.0.0.1", port=port)
    agents = {r.user_agent for r in emulator.admin_requests}
    assert any(
        re.fullmatch(
            r"alloydb-python-proxy/\S+ alloy-db-auth-proxy/\S+ custom-agent/0.0.1 etl/2", a
        )
        for a in agents
    ), agents
