"""The main path, end to end: CLI → Admin API → certificate → TLS 1.3 → MDX → PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re

import asyncpg
import psycopg
import pytest

from .conftest import (
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    IAM_DB_USER,
    TOKEN_IAM,
    URI,
    psql,
)

SHORT = "project-id.us-central1.clust.inst"


def test_psql_through_the_proxy(start_proxy, emulator, port):
    proxy = start_proxy(URI, "--port", str(port))
    assert f"[{SHORT}] Listening on 127.0.0.1:{port}" in proxy.output
    assert "Authorizing with OAuth2 token" in proxy.output
    assert f"Using API Endpoint {emulator.admin_url}" in proxy.output

    result = psql("SELECT current_user, 40 + 2", host="127.0.0.1", port=port)
    assert result.stdout.strip() == f"{DB_USER}|42"
    proxy.wait_for(rf"\[{re.escape(SHORT)}\] accepted connection from 127\.0\.0\.1:\d+")
    proxy.wait_for(rf"\[{re.escape(SHORT)}\] (client|instance) closed the connection")

    # The emulator saw our real Admin API calls and a DB_NATIVE exchange with the token.
    paths = [r.path for r in emulator.admin_requests]
    assert any(p.endswith(f"{URI}/connectionInfo") for p in paths)
    assert any(p.endswith(":generateClientCertificate") for p in paths)
    _, request = emulator.mdx_requests[-1]
    assert request.auth_type == 1 and request.oauth2_token == "tok-app"
    assert request.user_agent.startswith("alloydb-python-proxy/")


def test_python_drivers_through_the_proxy(start_proxy, port):
    start_proxy(URI, "--port", str(port))

    async def with_asyncpg() -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=port,
            user=DB_USER,
            password=DB_PASSWORD,
            database=DB_NAME,
            ssl=False,
        )
        try:
            return await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg()) == DB_NAME
    dsn = f"host=127.0.0.1 port={port} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME}"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)


def test_auto_iam_login_without_password(start_proxy, emulator, port):
    start_proxy(URI, "--port", str(port), "--auto-iam-authn", token=TOKEN_IAM)
    result = psql(
        "SELECT current_user", host="127.0.0.1", port=port, user=IAM_DB_USER, password=None
    )
    assert result.stdout.strip() == IAM_DB_USER
    assert emulator.mdx_requests[-1][1].auth_type == 2


def test_auto_iam_wrong_user_is_refused(start_proxy, port):
    start_proxy(URI, "--port", str(port), "--auto-iam-authn", token=TOKEN_IAM)
    result = psql(
        "SELECT 1",
        host="127.0.0.1",
        port=port,
        user="someone-else@project-id.iam",
        password=None,
        check=False,
    )
    assert result.returncode != 0
    assert "IAM authentication failed" in result.stderr


def test_three_instances_ports_and_overrides(start_proxy, emulator, port):
    second = URI.replace("/instances/inst", "/instances/second")
    third = URI.replace("clusters/clust/instances/inst", "clusters/other/instances/third")
    emulator.add_instance(second)
    emulator.add_instance(third)
    fixed = port + 3
    proxy = start_proxy(
        URI, f"{second}?port={fixed}", f"{third}?address=127.0.0.2", "--port", str(port)
    )
    # ?port= does not consume a number from the counter.
    assert f"Listening on 127.0.0.1:{port}" in proxy.output
    assert f"Listening on 127.0.0.1:{fixed}" in proxy.output
    assert f"Listening on 127.0.0.2:{port + 1}" in proxy.output
    for host, p in (("127.0.0.1", port), ("127.0.0.1", fixed), ("127.0.0.2", port + 1)):
        assert psql("SELECT 7", host=host, port=p).stdout.strip() == "7"


def test_unix_socket(start_proxy, tmp_path):
    proxy = start_proxy(URI, "--unix-socket", str(tmp_path))
    directory = tmp_path / SHORT
    socket_path = directory / ".s.PGSQL.5432"
    assert f"[{SHORT}] Listening on {socket_path}" in proxy.output
    assert oct(socket_path.stat().st_mode & 0o777) == oct(0o777)
    assert psql("SELECT 'unix'", host=str(directory)).stdout.strip() == "unix"
    proxy.wait_for(r"accepted connection from @")
    proxy.stop()
    assert not socket_path.exists()  # the listener removes its socket file on exit


def test_public_ip_and_missing_ip_type(start_proxy, emulator, port):
    no_public = URI.replace("/instances/inst", "/instances/private-only")
    emulator.add_instance(no_public)
    proxy = start_proxy(URI, f"{no_public}?port={port + 3}", "--public-ip", "--port", str(port))
    assert psql("SELECT 'public'", host="127.0.0.1", port=port).stdout.strip() == "public"
    assert emulator.connections[-1] == (URI, emulator.instances[URI].public_ip)
    bad = psql("SELECT 1", host="127.0.0.1", port=port + 3, check=False)
    assert bad.returncode != 0
    proxy.wait_for(
        r'failed to connect to instance: config error: instance does not have IP of type "PUBLIC" '
        r'\(instance URI = "project-id\.us-central1\.clust\.private-only"\)',
        stream="stderr",
    )


@pytest.mark.skipif(
    os.geteuid() != 0, reason="needs a private mount namespace (root) for /etc/hosts"
)
def test_psc_dns_name(start_proxy, emulator, port, tmp_path):
    """The PSC name resolves through a hosts file private to the proxy process."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "\n".join(emulator.hosts_entries()) + "\n")
    prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        f'mount --bind "{hosts}" /etc/hosts && exec "$0" "$@"',
    ]
    start_proxy(f"{URI}?psc=true", "--port", str(port), prefix=prefix)
    assert psql("SELECT 'psc'", host="127.0.0.1", port=port).stdout.strip() == "psc"
    assert emulator.connections[-1] == (URI, emulator.instances[URI].psc_ip)


def test_100_mb_each_way_with_checksums(start_proxy, port):
    start_proxy(URI, "--port", str(port))
    dsn = f"host=127.0.0.1 port={port} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME}"
    row = os.urandom(512 * 1024).hex()  # 1 MiB of hex text per row
    rows = 100
    sent = hashlib.md5()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS blob; CREATE TABLE blob (n int, data text)")
        with conn.cursor().copy("COPY blob (n, data) FROM STDIN") as copy:
            for n in range(rows):
                line = f"{n}\t{row[n:] + row[:n]}\n".encode()
                sent.update(line)
                copy.write(line)
        # The server's checksum of what it stored equals what the client sent.
        server_sum = conn.execute(
            "SELECT md5(string_agg(n::text || E'\\t' || data || E'\\n', '' ORDER BY n)) FROM blob"
        ).fetchone()[0]
        assert server_sum == sent.hexdigest()
        # And back: what the client receives equals the server's checksum.
        received = hashlib.md5()
        with conn.cursor().copy("COPY (SELECT n, data FROM blob ORDER BY n) TO STDOUT") as copy:
            for chunk in copy:
                received.update(chunk)
        assert received.hexdigest() == server_sum
        conn.execute("DROP TABLE blob")


def test_50_concurrent_clients_100_queries_each(start_proxy, port):
    start_proxy(URI, "--port", str(port))

    async def client(n: int) -> int:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=port,
            user=DB_USER,
            password=DB_PASSWORD,
            database=DB_NAME,
            ssl=False,
        )
        try:
            total = 0
            for i in range(100):
                total += await conn.fetchval("SELECT $1::int + $2::int", n, i)
            return total
        finally:
            await conn.close()

    async def main() -> list[object]:
        return await asyncio.gather(*(client(n) for n in range(50)), return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert results == [100 * n + sum(range(100)) for n in range(50)]


def test_lazy_refresh_fetches_once_and_sends_the_token_every_time(start_proxy, emulator, port):
    proxy = start_proxy(URI, "--port", str(port), "--lazy-refresh", "--debug-logs")
    for n in range(3):
        assert psql(f"SELECT {n}", host="127.0.0.1", port=port).stdout.strip() == str(n)
    cert_calls = [
        r for r in emulator.admin_requests if r.path.endswith(":generateClientCertificate")
    ]
    assert len(cert_calls) == 1  # the cached certificate serves later connections
    assert [r.oauth2_token for _, r in emulator.mdx_requests] == ["tok-app"] * 3
    assert "Connection info cache = lazy" in proxy.output
    assert "using cached info (type = lazy)" in proxy.output
    assert "tok-app" not in proxy.output  # debug logs show token size and expiry, never the token
