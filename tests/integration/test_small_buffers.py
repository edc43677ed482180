"""End to end through the CLI with small TCP buffers and slow readers, byte-exact.

Loopback's default buffers never take the partial-send paths, so the outer
test re-runs this module inside a private network namespace (`unshare -n`),
where loopback gets an Ethernet-sized MTU and small TCP buffers (the
settings that showed 12-25 % duplicated bytes and stalled COPYs in issue 9).
In there, PostgreSQL, the emulator, the proxy and the clients all start
afresh; each slow read through the proxy must equal a direct read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import DB_NAME, DB_PASSWORD, DB_USER, IAM_DB_USER, TOKEN_IAM, URI

INNER = os.environ.get("PROXY_NETNS_INNER") == "1"
ROOT = Path(__file__).resolve().parents[2]
SHORT = URI.replace("projects/", "").replace("/locations/", ".").replace("/clusters/", ".")
SHORT = SHORT.replace("/instances/", ".")
# About 8.5 MB of COPY output.
COPY_SQL = "COPY (SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 80000) g) TO STDOUT"
SYSCTLS = {
    "net/ipv4/tcp_wmem": "4096 8192 16384",
    "net/ipv4/tcp_rmem": "4096 16384 65536",
}


@pytest.fixture
def short_dir():
    """A socket directory short enough for the 108-byte unix socket path limit."""
    path = Path(tempfile.mkdtemp(prefix="pxy", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def namespace_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root for unshare -n and the namespace's sysctls"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n is not allowed here: {probe.stderr.strip()}"
    return None


@pytest.mark.skipif(INNER, reason="this is the outer half")
@pytest.mark.timeout(600)
def test_small_tcp_buffers_in_a_private_network_namespace():
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    proc = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__).relative_to(ROOT)),
            "-k",
            "inner",
        ],
        cwd=ROOT,
        env={**os.environ, "PROXY_NETNS_INNER": "1"},
        capture_output=True,
        text=True,
        timeout=540,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    assert "5 passed" in proc.stdout, output[-3000:]


inner = pytest.mark.skipif(not INNER, reason="runs inside the namespace (outer test above)")


@pytest.fixture(scope="module", autouse=True)
def small_loopback():
    """Inside the namespace: loopback up, Ethernet MTU, small TCP buffers."""
    if not INNER:
        yield
        return
    subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1500"], check=True)
    for key, value in SYSCTLS.items():
        Path("/proc/sys", key).write_text(value)
    yield


def slow_sha256(stream, *, chunk: int = 1000, pause: float = 0.0002) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while data := stream.read(chunk):
        digest.update(data)
        total += len(data)
        time.sleep(pause)
    return digest.hexdigest(), total


def psql_copy(dsn: str, password: str | None, *, slow: bool) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password:
        env["PGPASSWORD"] = password
    proc = subprocess.Popen(
        ["psql", "-X", "-w", "-v", "ON_ERROR_STOP=1", "-c", COPY_SQL, dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    # A slow pipe makes psql a slow reader of its socket.
    result = slow_sha256(proc.stdout, pause=0.0002 if slow else 0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    return result


def listener(kind: str, start_proxy, port: int, tmp_path: Path, *extra: str) -> tuple[str, str]:
    """Start the proxy; its listener as libpq's host/port words and as a raw address."""
    if kind == "tcp":
        start_proxy(URI, "--port", str(port), *extra, token=TOKEN_IAM)
        return f"host=127.0.0.1 port={port}", f"127.0.0.1:{port}"
    start_proxy(URI, "--unix-socket", str(tmp_path), *extra, token=TOKEN_IAM)
    return f"host={tmp_path / SHORT}", str(tmp_path / SHORT / ".s.PGSQL.5432")


@inner
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_inner_psql_copy_read_slowly_equals_a_direct_read(kind, start_proxy, pg, port, short_dir):
    direct = psql_copy(
        f"host={pg.host} port={pg.port} user={DB_USER} dbname={DB_NAME}", DB_PASSWORD, slow=False
    )
    assert direct[1] > 8_000_000
    where, _ = listener(kind, start_proxy, port, short_dir)
    through = psql_copy(f"{where} user={DB_USER} dbname={DB_NAME}", DB_PASSWORD, slow=True)
    assert through == direct


# -- a raw tunnel: the bytes after the query, read 1,000 at a time ------------


def startup(sock: socket.socket, user: str) -> None:
    params = f"user\0{user}\0database\0{DB_NAME}\0\0".encode()
    sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
    buf = b""
    while True:  # to ReadyForQuery; trust auth (AuthenticationOk) only
        while len(buf) < 5 or len(buf) < 1 + struct.unpack("!I", buf[1:5])[0]:
            data = sock.recv(65536)
            assert data, "closed during startup"
            buf += data
        size = struct.unpack("!I", buf[1:5])[0]
        kind, body, buf = buf[:1], buf[5 : 1 + size], buf[1 + size :]
        assert kind != b"E", body
        if kind == b"R":
            assert body[:4] == b"\0\0\0\0", "expected trust authentication"
        if kind == b"Z":
            assert not buf
            return


def raw_copy(sock: socket.socket, *, slow: bool) -> bytes:
    """Everything the server sends after the query, to its ReadyForQuery."""
    query = COPY_SQL.encode() + b"\0"
    sock.sendall(b"Q" + struct.pack("!I", 4 + len(query)) + query)
    got = bytearray()
    pos = 0  # start of the next message not yet seen whole
    while True:
        data = sock.recv(1000 if slow else 262144)
        assert data, f"closed after {len(got)} bytes"
        got += data
        if slow:
            time.sleep(0.0002)
        while len(got) - pos >= 5:
            size = struct.unpack("!I", got[pos + 1 : pos + 5])[0]
            if len(got) - pos < 1 + size:
                break
            if got[pos : pos + 1] == b"Z":
                assert pos + 1 + size == len(got)
                return bytes(got)
            pos += 1 + size


def raw_connect(where: str) -> socket.socket:
    if where.startswith("/"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(where)
    else:
        host, port = where.split(":")
        sock = socket.create_connection((host, int(port)))
    sock.settimeout(60)
    return sock


@inner
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_inner_raw_tunnel_read_slowly_equals_a_direct_read(kind, start_proxy, pg, port, short_dir):
    with raw_connect(f"{pg.host}:{pg.port}") as direct_sock:
        startup(direct_sock, IAM_DB_USER)
        direct = raw_copy(direct_sock, slow=False)
    assert len(direct) > 8_000_000
    _, target = listener(kind, start_proxy, port, short_dir, "--auto-iam-authn")
    with raw_connect(target) as sock:
        startup(sock, IAM_DB_USER)
        through = raw_copy(sock, slow=True)
    assert len(through) == len(direct)
    assert through == direct


@inner
def test_inner_echo_of_a_large_query_text_comes_back_exact(start_proxy, port):
    """Client to instance under small buffers: an 8 MB literal in, the same out."""
    start_proxy(URI, "--port", str(port), "--auto-iam-authn", token=TOKEN_IAM)
    text = hashlib.sha256(b"seed").hexdigest() * (8_000_000 // 64)
    with raw_connect(f"127.0.0.1:{port}") as sock:
        startup(sock, IAM_DB_USER)
        query = f"SELECT md5('{text}'), length('{text}')".encode() + b"\0"
        sock.sendall(b"Q" + struct.pack("!I", 4 + len(query)) + query)
        got = b""
        while b"Z\0\0\0\x05I" not in got:
            data = sock.recv(65536)
            assert data
            got += data
    assert hashlib.md5(text.encode()).hexdigest().encode() in got
    assert str(len(text)).encode() in got
