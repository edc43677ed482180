"""Smaller local-security findings of issue 10: forged log lines, proxied loopback requests."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import struct
import subprocess
import threading
import time

from .conftest import IAM_DB_USER, TOKEN_IAM, URI, psql
from .proxyproc import ProxyProcess, fd_count, proxy_command


def test_a_client_cannot_forge_a_log_line_with_its_user_name(start_proxy, port):
    proxy = start_proxy(URI, "--port", str(port), "--auto-iam-authn", token=TOKEN_IAM)
    forged = "2001/01/01 00:00:00 [fake] The proxy has been shut down"
    user = f"x\n{forged}\n.iam.gserviceaccount.com"
    params = f"user\0{user}\0database\0db\0\0".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        with contextlib.suppress(OSError):
            sock.recv(1)  # whatever the instance answers; the log line is written by now
    proxy.wait_for(r"IAM database user .* ends in \.gserviceaccount\.com")
    lines = proxy.output.splitlines()
    assert not any(line.startswith(forged) for line in lines)
    assert any(f'"x\\n{forged}\\n.iam.gserviceaccount.com"' in line for line in lines)


class _AnswerEverything(http.server.BaseHTTPRequestHandler):
    """A configured HTTP proxy that says 200 to anything (it must never be asked)."""

    asked: list[str] = []

    def _answer(self) -> None:
        self.asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    do_GET = do_POST = _answer  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def test_shutdown_and_wait_never_go_through_an_http_proxy_for_loopback():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswerEverything)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.socket() as probe:  # a port where nothing listens
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        env = {
            **os.environ,
            "http_proxy": f"http://127.0.0.1:{server.server_port}",
            "HTTP_PROXY": f"http://127.0.0.1:{server.server_port}",
            "no_proxy": "",
            "NO_PROXY": "",
        }
        down = subprocess.run(
            [*proxy_command(), "shutdown", "--admin-port", str(closed_port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert down.returncode == 1, down.stdout + down.stderr
        assert "failed to send shutdown request" in down.stderr
        waited = subprocess.run(
            [*proxy_command(), "wait", "--max", "2s", "--http-port", str(closed_port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert waited.returncode == 1, waited.stdout + waited.stderr
        assert _AnswerEverything.asked == []
    finally:
        server.shutdown()


def _settle(pid: int, want: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (got := fd_count(pid)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_auto_iam_dials_only_for_clients_that_speak(start_proxy, port):
    """Probes and sslmode=require checks cost no instance connection (issue 10
    finding 10, issue 12 finding 3)."""
    proxy = start_proxy(URI, "--port", str(port), "--auto-iam-authn", token=TOKEN_IAM)
    pid = proxy.proc.pid
    psql("SELECT 1", host="127.0.0.1", port=port, user=IAM_DB_USER, password=None)
    time.sleep(0.5)
    base = fd_count(pid)
    for _ in range(40):  # what sslmode=require clients and TCP probes do
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(struct.pack("!II", 8, 80877103))
            assert sock.recv(1) == b"N"
            time.sleep(0.15)
    assert _settle(pid, base) == base
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    try:
        time.sleep(1.0)
        assert fd_count(pid) == base + 5  # their own sockets, and no dial behind them
    finally:
        for sock in silent:
            sock.close()
    assert _settle(pid, base) == base
    deadline = time.monotonic() + 10  # the log reader may be a line or two behind
    while proxy.output.count("client closed the connection") < 45 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.output.count("client closed the connection") >= 45
    assert "failed to connect to instance" not in proxy.output


def test_a_cleartext_remote_admin_api_endpoint_is_warned_about():
    warned = ProxyProcess([URI, "--alloydbadmin-api-endpoint", "http://10.255.255.1:1", "-t", "x"])
    try:
        warned.wait_for(
            r"Warning: the Admin API endpoint http://10\.255\.255\.1:1 is plain http://"
        )
    finally:
        warned.stop()
    quiet = ProxyProcess([URI, "--alloydbadmin-api-endpoint", "http://127.0.0.1:1", "-t", "x"])
    try:
        quiet.wait_for("Using API Endpoint")
        time.sleep(0.3)
        assert "plain http://" not in quiet.output
    finally:
        quiet.stop()
