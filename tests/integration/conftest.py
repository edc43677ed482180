"""Fixtures: a real PostgreSQL, the AlloyDB emulator in front of it, and the proxy CLI."""

from __future__ import annotations

import os
import subprocess

import pytest

from proxy.emulator import Emulator, PostgresCluster, Principal

from .proxyproc import ProxyProcess, free_port_block

PROJECT = "project-id"
URI = f"projects/{PROJECT}/locations/us-central1/clusters/clust/instances/inst"

TOKEN_APP = "tok-app"
TOKEN_IAM = "tok-iam"
TOKEN_DENIED = "tok-denied"
SA_EMAIL = f"sa-name@{PROJECT}.iam.gserviceaccount.com"
IAM_DB_USER = f"sa-name@{PROJECT}.iam"
DB_USER, DB_PASSWORD, DB_NAME = "app", "app-secret", "appdb"


@pytest.fixture(scope="session")
def pg():
    cluster = PostgresCluster()
    cluster.start()
    try:
        cluster.create_user(DB_USER, DB_PASSWORD)
        cluster.create_database(DB_NAME, DB_USER)
        cluster.create_iam_user(IAM_DB_USER)
        cluster.psql(f'GRANT ALL ON DATABASE {DB_NAME} TO "{IAM_DB_USER}"')
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def emulator(pg):
    emu = Emulator(
        postgres_host=pg.host,
        postgres_port=pg.port,
        tokens={
            TOKEN_APP: Principal(f"app-sa@{PROJECT}.iam.gserviceaccount.com"),
            TOKEN_IAM: Principal(SA_EMAIL),
            TOKEN_DENIED: Principal(f"denied@{PROJECT}.iam.gserviceaccount.com", can_connect=False),
        },
        admin_port=0,
    )
    emu.add_instance(URI, public_ip=True, psc=True)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def start_proxy(emulator):
    """Start the CLI with the emulator's endpoint; every process is stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(*args: str, token: str = TOKEN_APP, ready: bool = True, **kwargs) -> ProxyProcess:
        argv = [*args, "--alloydbadmin-api-endpoint", emulator.admin_url]
        if token:
            argv += ["--token", token]
        proc = ProxyProcess(argv, **kwargs)
        started.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def port():
    return free_port_block(4)


def psql(sql: str, *, host: str, port: int | None = None, user: str = DB_USER,
         password: str | None = DB_PASSWORD, dbname: str = DB_NAME, check: bool = True,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real psql client; returns the completed process (stdout = unaligned rows)."""
    dsn = f"host={host} user={user} dbname={dbname} connect_timeout=20"
    if port is not None:
        dsn += f" port={port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    result = subprocess.run(
        ["psql", "-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-c", sql, dsn],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"psql failed ({result.returncode}): {result.stderr}")
    return result
