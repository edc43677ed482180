"""The control plane under a slow or failing Admin API, through the real CLI.

One slow cluster must not stall the others, a burst of connections against a
failing API must not become a burst of requests, and a certificate that is
expired or refused is never used twice without a refresh.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time

import pytest

from proxy.emulator import Emulator

from .conftest import TOKEN_APP, URI, psql
from .fakes import TokensByPrefix, service_account_info
from .proxyproc import ProxyProcess, free_port_block

SHORT = "project-id.us-central1.clust.inst"
FAILED = re.escape(f"[{SHORT}] failed to connect to instance")


def open_clients(port: int, count: int) -> list[socket.socket]:
    """``count`` TCP clients of the proxy that say nothing (a dial starts on accept)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def count_lines(proxy, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(1 for line in proxy.stdout + proxy.stderr if regex.search(line))


def wait_lines(proxy, pattern: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while count_lines(proxy, pattern) < count:
        assert time.monotonic() < deadline, f"fewer than {count} lines {pattern!r}:\n{proxy.output}"
        time.sleep(0.005)


@pytest.fixture
def proxy_for():
    """Start the CLI against a given emulator; every process is stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(emu: Emulator, *args: str) -> ProxyProcess:
        proc = ProxyProcess([*args, "--alloydbadmin-api-endpoint", emu.admin_url])
        started.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


def cert_requests(emulator) -> int:
    return sum(1 for r in emulator.admin_requests if r.path.endswith(":generateClientCertificate"))


def test_slow_clusters_do_not_stall_a_healthy_instance(pg, proxy_for, fakes, tmp_path):
    """Admin API calls for eight slow clusters are in flight; the healthy instance's
    first connection (token from a refreshing source) must not wait behind them."""
    port = free_port_block(9)  # nine listeners (the port fixture checks four)
    emu = Emulator(postgres_host=pg.host, postgres_port=pg.port, tokens=TokensByPrefix(fakes))
    emu.add_instance(URI)
    slow = [URI.replace("clust/instances/inst", f"slow{n}/instances/i") for n in range(8)]
    for uri in slow:
        emu.add_instance(uri).faults.set(admin_latency=8.0)
    emu.start()
    key = tmp_path / "key.json"
    key.write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    clients: list[socket.socket] = []
    try:
        proxy_for(emu, *slow, URI, "--port", str(port), "--credentials-file", str(key))
        for n in range(len(slow)):
            clients += open_clients(port + n, 1)
        deadline = time.monotonic() + 10
        while sum(1 for r in emu.admin_requests if "/slow" in r.path) < 2 * len(slow):
            assert time.monotonic() < deadline, "the slow instances' requests never arrived"
            time.sleep(0.05)
        began = time.monotonic()
        result = psql("SELECT 1", host="127.0.0.1", port=port + len(slow))
        took = time.monotonic() - began
        assert result.stdout.strip() == "1"
        # Not a speed claim: the slow calls answer after 8 s, and waiting behind them
        # would take at least that long.
        assert took < 5.0, f"the healthy instance waited {took:.1f}s behind slow clusters"
    finally:
        for client in clients:
            client.close()
        emu.stop()


@pytest.mark.parametrize("status", [403, 429])
def test_a_burst_against_a_failing_admin_api_sends_few_requests(
    start_proxy, emulator, port, status
):
    emulator.faults.set(admin_status=status)
    proxy = start_proxy(URI, "--port", str(port))
    clients = []
    try:
        for n in range(1, 31):  # one after the other, each as soon as the last has failed
            clients += open_clients(port, 1)
            wait_lines(proxy, FAILED + ".*refresh error", n)
    finally:
        for client in clients:
            client.close()
    # One lookup (connectionInfo, and generateClientCertificate sent alongside it);
    # the other 29 connections get the remembered error. (08ffac6 sent about 90.)
    assert len(emulator.admin_requests) <= 2, [r.path for r in emulator.admin_requests]
    assert count_lines(proxy, f"googleapi: Error {status}") == 30


def test_an_expired_certificate_is_never_presented(start_proxy, emulator, port):
    emulator.faults.set(cert_lifetime=-60)
    proxy = start_proxy(URI, "--port", str(port))
    assert psql("SELECT 1", host="127.0.0.1", port=port, check=False).returncode != 0
    line = proxy.wait_for(FAILED, stream="stderr")
    assert (
        "refresh error: the Admin API issued a client certificate that has already expired" in line
    )
    assert re.search(r"expired at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line)
    assert cert_requests(emulator) == 2  # the first, and the forced refresh
    assert list(emulator.connections) == []  # no handshake went out


def test_a_refused_client_certificate_forces_a_refresh(start_proxy, emulator, port):
    """Under TLS 1.3 the server's refusal arrives on the first read, after the
    client's handshake has finished: it counts as a handshake failure."""
    proxy = start_proxy(URI, "--port", str(port), "--debug-logs")
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"
    assert cert_requests(emulator) == 1
    emulator.faults.set(reject_client_certs=True)
    assert psql("SELECT 2", host="127.0.0.1", port=port, check=False).returncode != 0
    line = proxy.wait_for(FAILED, stream="stderr")
    assert "dial error: handshake failed" in line
    if sys.version_info >= (3, 11):  # the emulator sends the TLS alert, and the proxy names it
        assert "alert unknown ca" in line.lower()
    proxy.wait_for("TLS handshake failed")
    deadline = time.monotonic() + 10
    while cert_requests(emulator) < 2:
        assert time.monotonic() < deadline, "no refresh after the refused certificate"
        time.sleep(0.05)
    emulator.faults.clear()
    assert psql("SELECT 3", host="127.0.0.1", port=port).stdout.strip() == "3"


def test_a_listener_without_its_ip_type_leaves_the_shared_cache_alone(
    make_emulator, proxy_for, port
):
    """The same instance twice: by private IP, and by a public IP it does not have."""
    emulator = make_emulator(instances={URI: {}})
    proxy = proxy_for(
        emulator, URI, f"{URI}?public-ip=true", "--port", str(port), "--token", TOKEN_APP
    )
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"
    before = len(emulator.admin_requests)
    assert psql("SELECT 2", host="127.0.0.1", port=port + 1, check=False).returncode != 0
    proxy.wait_for(r'config error: instance does not have IP of type "PUBLIC"', stream="stderr")
    assert psql("SELECT 3", host="127.0.0.1", port=port).stdout.strip() == "3"
    assert len(emulator.admin_requests) == before  # the private listener's cache survived
