"""The PostgreSQL test-cluster helper."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from proxy.emulator import PostgresCluster

from ..conftest import DB_NAME, DB_PASSWORD, DB_USER, IAM_DB_USER


def tcp_psql(pg, user: str, password: str | None, dbname: str = DB_NAME):
    """The real psql over TCP 127.0.0.1, so pg_hba's host lines decide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-w", "-c", "SELECT current_user",
         f"host={pg.host} port={pg.port} user={user} dbname={dbname}"],
        capture_output=True, text=True, env=env, check=False, timeout=30,
    )  # fmt: skip


def test_native_users_need_their_password_iam_users_none(pg):
    assert tcp_psql(pg, DB_USER, DB_PASSWORD).stdout.strip() == DB_USER
    assert tcp_psql(pg, DB_USER, None).returncode != 0
    assert tcp_psql(pg, DB_USER, "wrong").returncode != 0
    # Trusted only because of the group's pg_hba line (the emulator vouches for them).
    assert tcp_psql(pg, IAM_DB_USER, None).stdout.strip() == IAM_DB_USER
    assert (
        pg.psql("SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app'")
        == "t"
    )


def test_helpers_are_idempotent(pg):
    pg.create_user(DB_USER, DB_PASSWORD)
    pg.create_iam_user(IAM_DB_USER)
    pg.create_database(DB_NAME, DB_USER)
    assert pg.psql("SELECT 1", DB_NAME) == "1"


def test_stop_leaves_nothing_behind():
    cluster = PostgresCluster().start()
    data_dir, port, pid = cluster.data_dir, cluster.port, cluster._proc.pid
    assert cluster.psql("SELECT 1") == "1"
    assert os.path.isdir(cluster.socket_dir)
    cluster.stop()
    cluster.stop()  # idempotent
    assert not os.path.exists(data_dir)
    assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped
    assert subprocess.run(["pgrep", "-f", data_dir], capture_output=True).returncode == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_context_manager_stops_on_error():
    with pytest.raises(RuntimeError, match="psql failed"), PostgresCluster() as cluster:
        data_dir = cluster.data_dir
        cluster.psql("SELECT * FROM no_such_table")
    assert not os.path.exists(data_dir)


def test_reuse_an_existing_server(pg, monkeypatch):
    monkeypatch.setenv("PGHOST", pg.socket_dir)
    monkeypatch.setenv("PGPORT", str(pg.port))
    monkeypatch.setenv("PGUSER", "postgres")
    reused = PostgresCluster.from_env().start()
    assert reused.reused and reused.port == pg.port
    reused.create_iam_user("reuse@p.iam")
    reused.stop()
    assert pg.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'reuse@p.iam'") == "1"
    # Not ours to stop: the session server still answers.
    assert pg.psql("SELECT 1") == "1"
