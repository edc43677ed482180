"""Faults injected by the emulator: each breaks one connection, never the proxy."""

from __future__ import annotations

import re
import socket
import time

import psycopg
import pytest

from .conftest import DB_NAME, DB_PASSWORD, DB_USER, URI, psql

SHORT = "project-id.us-central1.clust.inst"
OTHER = URI.replace("/instances/inst", "/instances/other")
OTHER_SHORT = "project-id.us-central1.clust.other"


def dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME}"


def test_admin_api_403_closes_that_connection_only(start_proxy, emulator, port):
    emulator.add_instance(OTHER)
    proxy = start_proxy(URI, OTHER, "--port", str(port))
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"  # warms URI's cache
    emulator.faults.set(admin_status=403)
    bad = psql("SELECT 1", host="127.0.0.1", port=port + 1, check=False)
    assert bad.returncode != 0
    proxy.wait_for(
        rf"\[{re.escape(OTHER_SHORT)}\] failed to connect to instance: refresh error: "
        rf'failed to get instance metadata \(instance URI = "{re.escape(OTHER_SHORT)}"\): '
        r"googleapi: Error 403: .*PERMISSION_DENIED",
        stream="stderr",
    )
    # The proxy keeps serving: the other instance still works on its valid certificate,
    # and the failed one recovers once the API does (after the dialer's short hold
    # on the failure, which keeps a burst of connections from becoming a burst of requests).
    assert psql("SELECT 2", host="127.0.0.1", port=port).stdout.strip() == "2"
    emulator.faults.clear()
    assert psql_soon("SELECT 3", port + 1) == "3"
    assert proxy.proc.poll() is None


def psql_soon(sql: str, port: int, within: float = 10.0) -> str:
    """psql's output once it succeeds, retrying for up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = psql(sql, host="127.0.0.1", port=port, check=time.monotonic() > deadline)
        if result.returncode == 0:
            return result.stdout.strip()
        time.sleep(0.5)


def test_admin_api_404_for_unknown_instance(start_proxy, port):
    proxy = start_proxy(OTHER, URI, "--port", str(port))  # OTHER does not exist
    assert psql("SELECT 1", host="127.0.0.1", port=port, check=False).returncode != 0
    proxy.wait_for(
        rf"\[{re.escape(OTHER_SHORT)}\] failed to connect to instance: .*Error 404", stream="stderr"
    )
    assert psql("SELECT 1", host="127.0.0.1", port=port + 1).stdout.strip() == "1"


def test_admin_api_503_is_retried(start_proxy, emulator, port):
    emulator.faults.set(
        admin_status=503, admin_status_count=2, admin_status_method="connectionInfo"
    )
    start_proxy(URI, "--port", str(port))
    assert (
        psql("SELECT 'after retries'", host="127.0.0.1", port=port).stdout.strip()
        == "after retries"
    )
    info_calls = [r for r in emulator.admin_requests if r.path.endswith("/connectionInfo")]
    assert len(info_calls) == 3


def test_metadata_exchange_error(start_proxy, emulator, port):
    inst = emulator.instances[URI]
    inst.faults.set(mdx_error="instance is in maintenance")
    proxy = start_proxy(URI, "--port", str(port))
    assert psql("SELECT 1", host="127.0.0.1", port=port, check=False).returncode != 0
    proxy.wait_for(
        rf"\[{re.escape(SHORT)}\] failed to connect to instance: instance is in maintenance",
        stream="stderr",
    )
    inst.faults.clear()
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"


def test_token_without_permission_is_refused(start_proxy, port):
    proxy = start_proxy(URI, "--port", str(port), token="tok-denied")
    assert psql("SELECT 1", host="127.0.0.1", port=port, check=False).returncode != 0
    proxy.wait_for(r"failed to connect to instance: .*(403|permission denied)", stream="stderr")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("wrong_san", "IP address mismatch"), ("unknown_ca", "certificate verify failed")],
)
def test_bad_server_certificate_refused_before_any_byte(start_proxy, emulator, port, fault, reason):
    emulator.instances[URI].faults.set(**{fault: True})
    proxy = start_proxy(URI, "--port", str(port))
    assert psql("SELECT 1", host="127.0.0.1", port=port, check=False).returncode != 0
    proxy.wait_for(
        rf"\[{re.escape(SHORT)}\] failed to connect to instance: dial error: handshake failed "
        rf'\(instance URI = "{re.escape(SHORT)}"\): .*{reason}',
        stream="stderr",
    )
    # Not one byte of the client's reached the instance: no exchange, no session.
    assert emulator.mdx_requests == []
    assert emulator.connections == []


def test_reset_mid_stream_aborts_one_connection(start_proxy, emulator, port):
    proxy = start_proxy(URI, "--port", str(port))
    emulator.instances[URI].faults.set(reset_after_bytes=200_000)
    with pytest.raises(psycopg.OperationalError), psycopg.connect(dsn(port)) as conn:
        conn.execute("SELECT repeat('x', 1000000)").fetchone()
    proxy.wait_for(
        rf"\[{re.escape(SHORT)}\] connection aborted - error reading from instance: .*reset",
        stream="stderr",
    )
    emulator.instances[URI].faults.clear()
    assert (
        psql("SELECT 'still serving'", host="127.0.0.1", port=port).stdout.strip()
        == "still serving"
    )


def test_close_during_metadata_exchange(start_proxy, emulator, port):
    emulator.faults.set(close_during_mdx=True)
    proxy = start_proxy(URI, "--port", str(port))
    assert psql("SELECT 1", host="127.0.0.1", port=port, check=False).returncode != 0
    # Under TLS 1.3 this is also how a refused client certificate looks: a
    # handshake failure, which forces a certificate refresh.
    proxy.wait_for(
        r"failed to connect to instance: dial error: handshake failed .*: "
        r"connection closed by the instance after 0 of 4 bytes",
        stream="stderr",
    )


def test_max_connections_refuses_by_close(start_proxy, port):
    proxy = start_proxy(URI, "--port", str(port), "--max-connections", "1")
    with psycopg.connect(dsn(port)) as held:
        held.execute("SELECT 1")
        assert psql("SELECT 1", host="127.0.0.1", port=port, check=False).returncode != 0
        proxy.wait_for(r"max connections \(1\) exceeded, refusing new connection")
    proxy.wait_for(r"client closed the connection")
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"


def test_two_minute_certificates_keep_working_across_refreshes(start_proxy, emulator, port):
    """Certificates live 120 s: the proxy refreshes them ahead of expiry, rate limited,
    and both a long-lived session and new connections keep working past the first expiry."""
    emulator.faults.set(cert_lifetime=120)
    proxy = start_proxy(URI, "--port", str(port), "--debug-logs")
    deadline = time.monotonic() + 135
    with psycopg.connect(dsn(port), autocommit=True) as long_lived:
        n = 0
        while time.monotonic() < deadline:
            assert long_lived.execute("SELECT %s::int", (n,)).fetchone() == (n,)
            assert psql(f"SELECT {n}", host="127.0.0.1", port=port).stdout.strip() == str(n)
            n += 1
            time.sleep(5)
    cert_calls = [
        r for r in emulator.admin_requests if r.path.endswith(":generateClientCertificate")
    ]
    assert len(cert_calls) >= 4, len(cert_calls)
    assert "failed to connect" not in proxy.output


def test_running_out_of_file_descriptors_pauses_accepting_only(emulator, port):
    """EMFILE on accept: the Go proxy exits; this one logs it, pauses accepting
    briefly, keeps its open connections, and accepts again once fds are free."""
    from .proxyproc import ProxyProcess

    proxy = ProxyProcess(
        [URI, "--port", str(port), "--token", "tok-app",
         "--alloydbadmin-api-endpoint", emulator.admin_url],
        prefix=["prlimit", "--nofile=64:64", "--"],
    )  # fmt: skip
    clients = []
    try:
        proxy.wait_ready()
        with psycopg.connect(dsn(port), autocommit=True) as held:
            for _ in range(80):  # each spliced client costs the proxy two fds
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                time.sleep(0.02)
                if "Too many open files" in proxy.output:
                    break
            proxy.wait_for(r"Error accepting connection: .*Too many open files", stream="stderr")
            assert proxy.proc.poll() is None
            assert held.execute("SELECT 7").fetchone() == (7,)  # open connections go on
            for client in clients:
                client.close()
            clients.clear()
            time.sleep(0.5)
            assert psql("SELECT 8", host="127.0.0.1", port=port).stdout.strip() == "8"
    finally:
        for client in clients:
            client.close()
        proxy.stop()
