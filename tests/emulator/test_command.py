"""The ``alloydb-emulator`` command (``python -m proxy.emulator``)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import types

import pg8000.native
import pytest
import requests
from click.testing import CliRunner

from proxy import mdx
from proxy.emulator.__main__ import main

from ..conftest import DB_NAME, DB_PASSWORD, DB_USER, SA_EMAIL, TOKEN_APP, TOKEN_IAM, URI
from .clients import exchange, tls_client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_command(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.emulator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_state(proc: subprocess.Popen[str], path) -> dict:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no state file; output:\n{proc.communicate()[0]}")
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_runs_its_own_postgres_and_stops_on_sigterm(tmp_path):
    state_file = tmp_path / "state.json"
    admin_port = free_port()
    proc = run_command(
        "--instance", URI, "--psc", "--public-ip",
        "--token", f"{TOKEN_APP}=app-sa@project-id.iam.gserviceaccount.com",
        "--token", f"{TOKEN_IAM}={SA_EMAIL}",
        "--admin-port", str(admin_port),
        "--db-user", "demo", "--db-password", "demo-pw", "--db-name", "demodb",
        "--state-file", str(state_file),
    )  # fmt: skip
    try:
        state = wait_for_state(proc, state_file)
        assert state["admin_url"] == f"http://127.0.0.1:{admin_port}"
        addrs = state["instances"][URI]
        assert addrs["psc_dns_name"].endswith(".alloydb.goog") and addrs["public_ip"]
        assert state["hosts_entries"] == [f"{addrs['psc_ip']} {addrs['psc_dns_name']}"]
        assert state["postgres"]["temporary"] is True
        pg_port = state["postgres"]["port"]
        emu = types.SimpleNamespace(admin_url=state["admin_url"])
        # Its PostgreSQL has the native user, and the IAM user of every token.
        tls = tls_client(emu, addrs["public_ip"])
        assert exchange(tls, TOKEN_APP).ok
        conn = pg8000.native.Connection("demo", database="demodb", password="demo-pw", sock=tls)
        assert conn.run("SELECT current_user") == [["demo"]]
        conn.close()
        tls = tls_client(emu, addrs["private_ip"])
        assert exchange(tls, TOKEN_IAM, mdx.AUTO_IAM).ok
        conn = pg8000.native.Connection("sa-name@project-id.iam", database="demodb", sock=tls)
        assert conn.run("CREATE TABLE t (x int); SELECT current_user") == [
            ["sa-name@project-id.iam"]
        ]
        conn.close()
        faults = requests.post(
            f"{state['admin_url']}/emulator/v1/faults", json={"admin_status": 503}, timeout=10
        )
        assert faults.json()["admin_status"] == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Admin API at" in out and "stopping" in out
    assert not state_file.exists()
    with pytest.raises(OSError):  # its temporary PostgreSQL is gone ...
        socket.create_connection(("127.0.0.1", pg_port), timeout=2).close()
    for ip in (addrs["private_ip"], addrs["public_ip"]):  # ... and so are the instances
        with pytest.raises(OSError):
            socket.create_connection((ip, 5433), timeout=2).close()
    leftovers = subprocess.run(
        ["pgrep", "-f", "--", f"postgres .* -p {pg_port} "], capture_output=True, text=True
    )
    assert leftovers.returncode == 1, leftovers.stdout


def test_fronts_an_existing_postgres_and_stops_on_sigint(pg, tmp_path):
    state_file = tmp_path / "state.json"
    proc = run_command(
        "--instance", URI, "--postgres", f"{pg.host}:{pg.port}", "--admin-port", "0",
        "--state-file", str(state_file),
    )  # fmt: skip
    try:
        state = wait_for_state(proc, state_file)
        assert state["postgres"] == {"host": pg.host, "port": pg.port, "temporary": False}
        emu = types.SimpleNamespace(admin_url=state["admin_url"])
        # No --token: any token is accepted for DB_NATIVE.
        tls = tls_client(emu, state["instances"][URI]["private_ip"])
        assert exchange(tls, "any-token").ok
        conn = pg8000.native.Connection(DB_USER, database=DB_NAME, password=DB_PASSWORD, sock=tls)
        assert conn.run("SELECT 1") == [[1]]
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "any bearer token is accepted" in out
    assert pg.psql("SELECT 1") == "1"  # not ours to stop


@pytest.mark.parametrize(
    "args",
    [
        ["--instance", URI, "--token", "no-email"],
        ["--instance", URI, "--postgres", "nohostport"],
        ["--token", "t=a@b"],  # --instance is required
    ],
)
def test_bad_flags_are_usage_errors(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output


def test_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for flag in ("--instance", "--public-ip", "--psc", "--token", "--admin-port", "--postgres",
                 "--db-user", "--db-password", "--db-name", "--state-file"):  # fmt: skip
        assert flag in result.output
