"""Certificate and token refresh paths through the real CLI, counted at the emulator.

Each test names the refresh it is about and checks that it happened (or did
not) by the Admin API and token requests, not only by a query's result.
"""

from __future__ import annotations

import json
import re
import socket
import time

from .conftest import URI, psql
from .fakes import service_account_info
from .test_credentials import (  # noqa: F401 (the credential tests' fixtures)
    home,
    run_proxy,
    tokens_seen,
)
from .test_faults import psql_soon

SHORT = "project-id.us-central1.clust.inst"


def cert_calls(emulator) -> int:
    return sum(1 for r in emulator.admin_requests if r.path.endswith(":generateClientCertificate"))


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_scheduled_refresh_runs_without_any_new_connection(start_proxy, emulator, port):
    # A 245 s certificate is refreshed 4 minutes before it ends: 5 s after it was issued.
    emulator.faults.set(cert_lifetime=245)
    start_proxy(URI, "--port", str(port))
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"
    assert cert_calls(emulator) == 1
    wait_until(lambda: cert_calls(emulator) >= 2, 15, "no background refresh")


def test_a_tls_failure_forces_a_refresh(start_proxy, emulator, port):
    start_proxy(URI, "--port", str(port))
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"
    # A full handshake (a resumed session would not show the certificate again).
    emulator.faults.set(wrong_san=True, no_session_resumption=True)
    assert psql("SELECT 2", host="127.0.0.1", port=port, check=False).returncode != 0
    wait_until(lambda: cert_calls(emulator) >= 2, 10, "no refresh after the TLS failure")
    emulator.faults.clear()
    assert psql("SELECT 3", host="127.0.0.1", port=port).stdout.strip() == "3"


def test_lazy_refresh_under_a_failing_admin_api_then_recovery(start_proxy, emulator, port):
    """The API fails the lazy refresh; once it recovers, the next connection after the
    dialer's short hold refreshes and works, and later ones use the cached certificate."""
    emulator.faults.set(admin_status=403)
    proxy = start_proxy(URI, "--port", str(port), "--lazy-refresh")
    assert psql("SELECT 1", host="127.0.0.1", port=port, check=False).returncode != 0
    proxy.wait_for(r"failed to connect to instance: refresh error", stream="stderr")
    emulator.faults.clear()
    assert psql_soon("SELECT 2", port) == "2"
    calls = len(emulator.admin_requests)
    assert psql("SELECT 3", host="127.0.0.1", port=port).stdout.strip() == "3"
    time.sleep(0.5)
    assert len(emulator.admin_requests) == calls  # lazy: no new call, none in the background


def test_a_failing_token_endpoint_costs_nothing_while_the_token_is_valid(
    run_proxy,  # noqa: F811
    cred_emulator,  # noqa: F811
    fakes,
    tmp_path,
):
    """8 s tokens: once one is due (4 s left) its refresh fails in the background,
    and connections go on with it."""
    fakes.expires_in = 8
    (tmp_path / "key.json").write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    proxy = run_proxy("--credentials-file", str(tmp_path / "key.json"))
    assert psql("SELECT 1", host="127.0.0.1", port=proxy.port).stdout.strip() == "1"
    fakes.token_status = 503
    time.sleep(4.5)  # the login token is now due, and still valid for 3.5 s
    assert psql("SELECT 2", host="127.0.0.1", port=proxy.port).stdout.strip() == "2"
    refused = [p for _, p, _, _ in fakes.log if p == "/token"]
    assert len(refused) >= 3  # two first tokens, then at least one failed refresh
    mdx = tokens_seen(cred_emulator)[1]
    assert len(mdx) == 2 and mdx[0] == mdx[1]  # the same, still valid token


def test_sigterm_with_dials_in_flight(start_proxy, emulator, port):
    """Admin API latency 5 s, connections waiting for it, SIGTERM: the proxy says so,
    leaves at once with 143, and the clients see their connection end."""
    emulator.faults.set(admin_latency=5.0)
    proxy = start_proxy(URI, "--port", str(port))
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        wait_until(lambda: emulator.admin_requests, 10, "no Admin API call")
        began = time.monotonic()
        code = proxy.stop()
        assert code == 143 and time.monotonic() - began < 2.0
        proxy.wait_for(re.escape("SIGTERM signal received. Shutting down..."))
        for client in clients:
            assert client.recv(1) == b""  # closed with the process, not left hanging
    finally:
        for client in clients:
            client.close()
