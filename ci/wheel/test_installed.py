"""End-to-end checks of an installed wheel (or sdist), run by ci/test_wheels.sh.

This file is copied out of the source tree and run by the fresh virtualenv's
own Python, so ``proxy`` and ``alloydb-auth-proxy`` are the installed ones
(asserted first). ``EXPECT`` says what was installed:

    binary   the manylinux wheel: its tag, no libssl/libcrypto, only PyInit_
             exported, the OpenSSL it reports is the one built into it
    pure     the py3-none-any wheel: the portable data plane, and
             ALLOYDB_AUTH_PROXY_DATA_PLANE=native refused at start-up
    sdist    built from source against the system OpenSSL

Then, for each: psql and psycopg through the command against the emulator
with DB_NATIVE and AUTO_IAM, 100 MB each way compared by digest, and the exit
code after SIGTERM.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import zipfile

import psycopg
import pytest

import proxy
from proxy.emulator import Emulator, PostgresCluster, Principal

EXPECT = os.environ["EXPECT"]  # binary | pure | sdist
WHEELHOUSE = os.environ.get("WHEELHOUSE", "")
BIN = os.path.dirname(sys.executable)
COMMAND = os.path.join(BIN, "alloydb-auth-proxy")
URI = "projects/p/locations/r/clusters/c/instances/i"
TOKEN, IAM_TOKEN = "token-app", "token-iam"
SA = "sa-name@p.iam.gserviceaccount.com"
IAM_USER = "sa-name@p.iam"
USER, PASSWORD, DBNAME = "app", "app-password", "app"
READY = "The proxy has started successfully and is ready for new connections!"


def test_the_installed_package_is_under_test():
    # sys.prefix is the fresh virtualenv (its site-packages may be lib or lib64)
    assert proxy.__file__.startswith(sys.prefix + os.sep), proxy.__file__
    assert "site-packages" in proxy.__file__
    assert os.path.isfile(COMMAND)


def extension() -> str:
    (path,) = glob.glob(os.path.join(os.path.dirname(proxy.__file__), "_splice*.so"))
    return path


@pytest.mark.skipif(EXPECT != "binary", reason="binary wheel only")
def test_binary_wheel_tag_links_and_exports():
    (wheel,) = glob.glob(os.path.join(WHEELHOUSE, f"*manylinux*_{platform.machine()}.whl"))
    assert wheel.endswith(f"-cp310-abi3-manylinux_2_28_{platform.machine()}.whl"), wheel
    assert os.path.basename(wheel).startswith(f"alloydb_auth_proxy-{proxy.__version__}-"), wheel
    with zipfile.ZipFile(wheel) as zf:
        tags = [line for line in zf.read(next(n for n in zf.namelist() if n.endswith("WHEEL"))).decode().splitlines() if line.startswith("Tag:")]  # fmt: skip
    assert tags == [f"Tag: cp310-abi3-manylinux_2_28_{platform.machine()}"], tags
    so = extension()
    ldd = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
    assert "libssl" not in ldd and "libcrypto" not in ldd, ldd
    nm = subprocess.run(
        ["nm", "-D", "--defined-only", so], capture_output=True, text=True, check=True
    )
    exported = [line.split()[-1] for line in nm.stdout.splitlines() if line.strip()]
    assert exported == ["PyInit__splice"], exported
    from proxy import _splice

    with open(os.path.join(WHEELHOUSE, "OPENSSL_VERSION")) as fh:
        built = fh.read().split()[1]
    assert _splice.openssl_version().startswith(f"OpenSSL {built} "), _splice.openssl_version()


@pytest.mark.skipif(EXPECT != "binary", reason="binary wheel only")
def test_the_private_openssl_and_the_systems_live_side_by_side():
    """Python's ssl, cryptography and libpq (psycopg) load the system OpenSSL; ours is
    inside the extension and neither takes the other's symbols: each works after the
    other is loaded (the end-to-end tests below run with all of them loaded)."""
    import ssl

    from cryptography.hazmat.primitives import hashes

    from proxy import _splice

    before = _splice.openssl_version()
    ssl.create_default_context().load_default_certs()
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"x")
    assert digest.finalize().hex().startswith("2d711642")
    psycopg.pq.version()  # libpq, and its libssl, are loaded
    assert _splice.openssl_version() == before
    out = run_version()
    assert "data plane: native" in out and _splice.openssl_version() in out


@pytest.mark.skipif(EXPECT != "pure", reason="pure wheel only")
def test_pure_wheel_runs_the_portable_plane_and_refuses_native():
    assert not glob.glob(os.path.join(os.path.dirname(proxy.__file__), "_splice*.so"))
    assert "data plane: portable" in run_version()
    proc = subprocess.run(
        [COMMAND, URI, "--token", TOKEN],
        env={**os.environ, "ALLOYDB_AUTH_PROXY_DATA_PLANE": "native"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert (
        "ALLOYDB_AUTH_PROXY_DATA_PLANE=native, but the native data plane is not installed"
        in proc.stderr
    )


@pytest.mark.skipif(EXPECT != "sdist", reason="sdist only")
def test_sdist_build_uses_the_system_openssl():
    import ssl

    from proxy import _splice

    ldd = subprocess.run(["ldd", extension()], capture_output=True, text=True, check=True).stdout
    assert "libssl" in ldd
    assert _splice.openssl_version().split()[:2] == ssl.OPENSSL_VERSION.split()[:2]


def run_version() -> str:
    return subprocess.run(
        [COMMAND, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def emulator():
    cluster = PostgresCluster()
    cluster.start()
    try:
        cluster.create_user(USER, PASSWORD)
        cluster.create_database(DBNAME, USER)
        cluster.create_iam_user(IAM_USER)
        cluster.psql(f'GRANT ALL ON DATABASE {DBNAME} TO "{IAM_USER}"')
        emu = Emulator(
            postgres_host=cluster.host,
            postgres_port=cluster.port,
            tokens={TOKEN: Principal("app-sa@p.iam.gserviceaccount.com"), IAM_TOKEN: Principal(SA)},
        )
        emu.add_instance(URI)
        emu.start()
        try:
            yield emu
        finally:
            emu.stop()
    finally:
        cluster.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, emu, *args: str, token: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [COMMAND, URI, "--port", str(self.port), "--token", token,
             "--alloydbadmin-api-endpoint", emu.admin_url, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        for line in self.proc.stdout:
            self.lines.append(line)
            if READY in line:
                break
            assert time.monotonic() < deadline, "".join(self.lines)
        else:
            raise AssertionError("no ready line: " + "".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        assert self.proc.stdout is not None
        self.lines += self.proc.stdout.readlines()
        return code


def psql(port: int, user: str, sql: str, password: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password:
        env["PGPASSWORD"] = password
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", DBNAME, "-XAtc", sql],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    ).stdout.strip()  # fmt: skip


def test_db_native_psql_psycopg_100_mb_each_way_and_sigterm(emulator):
    proxy_run = Running(emulator, token=TOKEN)
    try:
        assert psql(proxy_run.port, USER, "SELECT current_user", PASSWORD) == USER
        dsn = (
            f"host=127.0.0.1 port={proxy_run.port} user={USER} password={PASSWORD} dbname={DBNAME}"
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            # client -> instance: 100 MB by COPY, digested on the server
            row = (os.urandom(4096).hex() + "\n").encode()
            rows = 100 * 1024 * 1024 // len(row)
            sent = hashlib.md5()
            conn.execute("CREATE TEMP TABLE copied (n serial, x text)")
            with conn.cursor().copy("COPY copied (x) FROM STDIN") as copy:
                for n in range(rows):
                    line = row[:8] + str(n).encode().rjust(8, b"0") + row[16:]
                    sent.update(line[:-1])
                    copy.write(line)
            count, digest = conn.execute(
                "SELECT count(*), md5(string_agg(x, '' ORDER BY n)) FROM copied"
            ).fetchone()
            assert (count, digest) == (rows, sent.hexdigest())
            # instance -> client: the same 100 MB back
            received = hashlib.md5()
            with conn.cursor().copy("COPY (SELECT x FROM copied ORDER BY n) TO STDOUT") as copy:
                for data in copy:
                    received.update(bytes(data).replace(b"\n", b""))
            assert received.hexdigest() == sent.hexdigest()
    finally:
        code = proxy_run.stop()
    assert code == 143, "".join(proxy_run.lines)


def test_auto_iam_login_with_psql_and_psycopg(emulator):
    proxy_run = Running(emulator, "--auto-iam-authn", token=IAM_TOKEN)
    try:
        assert psql(proxy_run.port, IAM_USER, "SELECT current_user") == IAM_USER
        dsn = f"host=127.0.0.1 port={proxy_run.port} user={IAM_USER} dbname={DBNAME}"
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (IAM_USER,)
        assert emulator.mdx_requests[-1][1].auth_type == 2  # AUTO_IAM
    finally:
        assert proxy_run.stop() == 143
