"""Fixtures for the CLI subprocess; PostgreSQL and the emulator come from tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request

import pytest

from proxy.emulator import Emulator

from .. import leakcheck
from ..conftest import (  # noqa: F401  (re-exported for the test modules)
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    IAM_DB_USER,
    PROJECT,
    SA_EMAIL,
    TOKEN_APP,
    TOKEN_DENIED,
    TOKEN_IAM,
    URI,
)
from .fakes import IdentityFakes, TokensByPrefix
from .proxyproc import ProxyProcess, free_port_block


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


def proxy_args(emulator, ports, *extra: str, token: str | None = TOKEN_APP) -> list[str]:
    """The CLI's arguments for URI on ``ports["proxy"]`` against ``emulator``
    (with ``--token``, unless ``token`` is None)."""
    args = [URI, "--port", str(ports["proxy"])]
    if token is not None:
        args += ["--token", token]
    return [*args, "--alloydbadmin-api-endpoint", emulator.admin_url, *extra]


@pytest.fixture
def fakes():
    """Loopback fakes of Google's token endpoints and the metadata servers."""
    fake = IdentityFakes()
    yield fake
    fake.close()


@pytest.fixture
def cred_emulator(pg, fakes):
    """An emulator that knows every token the fakes issue, with its scope and expiry."""
    emu = Emulator(postgres_host=pg.host, postgres_port=pg.port, tokens=TokensByPrefix(fakes))
    emu.add_instance(URI, psc=True)
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def port():
    return free_port_block(4)


def psql(
    sql: str,
    *,
    host: str,
    port: int | None = None,
    user: str = DB_USER,
    password: str | None = DB_PASSWORD,
    dbname: str = DB_NAME,
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the real psql client; returns the completed process (stdout = unaligned rows)."""
    dsn = f"host={host} user={user} dbname={dbname} connect_timeout=20"
    if port is not None:
        dsn += f" port={port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    result = subprocess.run(
        ["psql", "-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-c", sql, dsn],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"psql failed ({result.returncode}): {result.stderr}")
    return result


def http_get(url: str, method: str = "GET") -> tuple[int, str]:
    """(status, body) of one HTTP request; error statuses are returned, not raised."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, body = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read().decode()
    leakcheck.record(f"{method} {url}", body)
    return status, body
