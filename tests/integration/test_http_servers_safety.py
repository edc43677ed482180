"""The health and admin servers against web pages and misbehaving local clients.

(Issue 10, findings 2-5.) Through the real CLI: secrets never shown by
/debug/pprof/cmdline; DNS-rebinding Hosts and cross-site requests refused
(so a web page can neither read /debug nor trigger /quitquitquit); slow
and oversized requests cost no probe its answer and print no traceback; one
profile at a time, on its own thread, so dials do not wait for it.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time

from .conftest import TOKEN_APP, URI, psql
from .proxyproc import free_port_block


def request(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """(status, body) of one raw HTTP/1.1 request with exactly these headers."""
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in (headers or {"Host": f"localhost:{port}"}).items()
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2].decode()


def start_with_debug(start_proxy, port: int, *extra: str):
    """The proxy with --debug on a fresh admin port, once that server listens."""
    admin = free_port_block(1)
    proxy = start_proxy(URI, "--port", str(port), "--debug", "--admin-port", str(admin), *extra)
    proxy.wait_for("Enabling pprof endpoints")
    return proxy, admin


def test_cmdline_hides_secret_flag_values(start_proxy, port):
    _, admin = start_with_debug(start_proxy, port, "--login-token", "login-secret-value")
    status, body = request(admin, "/debug/pprof/cmdline")
    assert status == 200
    assert TOKEN_APP not in body and "login-secret-value" not in body
    assert "--token\x00REDACTED" in body and "--login-token\x00REDACTED" in body


def test_foreign_hosts_and_cross_site_requests_are_refused(start_proxy, port):
    proxy, admin = start_with_debug(start_proxy, port, "--quitquitquit")
    rebinding = {"Host": f"attacker.example:{admin}"}
    assert request(admin, "/debug/pprof/cmdline", rebinding)[0] == 403
    cross = {"Host": f"localhost:{admin}", "Origin": "https://attacker.example"}
    assert request(admin, "/quitquitquit", cross)[0] == 403
    fetch = {"Host": f"127.0.0.1:{admin}", "Sec-Fetch-Site": "cross-site"}
    assert request(admin, "/quitquitquit", fetch)[0] == 403
    assert proxy.proc.poll() is None  # still running
    assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"
    # The proxy's own tools and curl still work (GET, as Go accepts it).
    assert request(admin, "/quitquitquit", {"Host": f"[::1]:{admin}"})[0] == 200
    assert proxy.wait_exit() == 0


def test_health_server_on_all_interfaces_takes_any_host_but_not_cross_site(start_proxy, port):
    http = free_port_block(1)
    proxy = start_proxy(
        URI,
        "--port",
        str(port),
        "--health-check",
        "--http-address",
        "0.0.0.0",
        "--http-port",
        str(http),
    )
    proxy.wait_for("Starting health check server")
    assert request(http, "/liveness", {"Host": f"10.1.2.3:{http}"})[0] == 200  # kubelet
    assert request(http, "/liveness", {"Host": f"proxy.internal:{http}"})[0] == 200
    cross = {"Host": f"proxy.internal:{http}", "Sec-Fetch-Site": "cross-site"}
    assert request(http, "/liveness", cross)[0] == 403


def test_slow_and_oversized_requests_do_not_starve_probes(start_proxy, port):
    http = free_port_block(1)
    proxy = start_proxy(URI, "--port", str(port), "--health-check", "--http-port", str(http))
    proxy.wait_for("Starting health check server")
    slow = []
    for _ in range(120):  # more than the server holds at once
        sock = socket.create_connection(("127.0.0.1", http), timeout=10)
        sock.sendall(b"GET /liveness HTTP/1.1\r\nX-Slow: ")
        slow.append(sock)
    try:
        for _ in range(10):
            began = time.monotonic()
            assert request(http, "/liveness")[0] == 200
            assert time.monotonic() - began < 3  # not behind the slow ones' deadline
        huge = {"Host": f"localhost:{http}", "X-Big": "a" * 100_000}
        assert request(http, "/liveness", huge)[0] == 431
        assert request(http, "/liveness", {f"X-{i}": "1" for i in range(150)})[0] == 431
    finally:
        for sock in slow:
            sock.close()
    assert request(http, "/readiness")[0] == 200
    assert "Traceback" not in proxy.output


def test_one_profile_at_a_time_and_dials_do_not_wait_for_it(start_proxy, port):
    _, admin = start_with_debug(start_proxy, port)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        profiles = [pool.submit(request, admin, "/debug/pprof/profile?seconds=6") for _ in range(8)]
        time.sleep(0.5)
        # A new connection needs the Admin API and a token meanwhile.
        assert psql("SELECT 5", host="127.0.0.1", port=port, timeout=5).stdout.strip() == "5"
        statuses = sorted(f.result()[0] for f in profiles)
    assert statuses == [200] + [429] * 7
