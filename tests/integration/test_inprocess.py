"""proxy.Proxy inside this test process, against the emulator, with real drivers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import sys
import threading
import time

import asyncpg
import pg8000.native
import psycopg
import psycopg2
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

import proxy

from .conftest import DB_NAME, DB_PASSWORD, DB_USER, IAM_DB_USER, TOKEN_APP, TOKEN_IAM, URI
from .proxyproc import free_port_block

NATIVE = {"user": DB_USER, "password": DB_PASSWORD, "dbname": DB_NAME}


def test_psycopg_through_a_private_unix_socket(emulator):
    with proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url) as p:
        (listener,) = p.listeners
        assert listener.instance == URI and listener.socket_path
        directory = os.path.dirname(listener.host)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        with psycopg.connect(p.dsn(**NATIVE)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (DB_USER,)
        with psycopg2.connect(p.dsn(**NATIVE)) as conn, conn.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
    assert not os.path.exists(directory)  # removed at close


def test_auto_iam_login_with_an_at_sign_in_the_user(emulator):
    with proxy.Proxy(
        URI, token=TOKEN_IAM, auto_iam_authn=True, alloydbadmin_api_endpoint=emulator.admin_url
    ) as p:
        dsn = p.dsn(user=IAM_DB_USER, dbname=DB_NAME)
        assert "sa-name%40project-id.iam@" in dsn
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (IAM_DB_USER,)
    assert emulator.mdx_requests[-1][1].auth_type == 2  # AUTO_IAM


async def test_asyncpg_on_the_callers_loop(emulator):
    async with proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url) as p:
        conn = await asyncpg.connect(p.dsn(**NATIVE))
        try:
            assert await conn.fetchval("SELECT 40 + 2") == 42
        finally:
            await conn.close()
        engine = create_async_engine(p.sqlalchemy_url(driver="asyncpg", **NATIVE))
        async with engine.connect() as sa:
            assert (await sa.execute(sqlalchemy.text("SELECT 5"))).scalar() == 5
        await engine.dispose()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_async_drivers_under_asyncio_and_uvloop(emulator, loop_kind):
    """psycopg 3's AsyncConnection and asyncpg, awaited from a caller's loop of either kind."""
    import uvloop

    async def main() -> tuple[str, int]:
        async with proxy.Proxy(
            URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url
        ) as p:
            async with await psycopg.AsyncConnection.connect(p.dsn(**NATIVE)) as conn:
                cur = await conn.execute("SELECT current_user")
                (user,) = await cur.fetchone()
            conn2 = await asyncpg.connect(p.dsn(**NATIVE))
            try:
                value = await conn2.fetchval("SELECT 6 * 7")
            finally:
                await conn2.close()
            kind = type(asyncio.get_running_loop()).__module__.split(".")[0]
            return f"{user} {kind}", value

    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    loop = factory()
    try:
        assert loop.run_until_complete(main()) == (f"{DB_USER} {loop_kind}", 42)
    finally:
        loop.close()


def test_sqlalchemy_drivers_and_tcp(emulator):
    port = free_port_block(1)
    with proxy.Proxy(
        URI, token=TOKEN_APP, port=port, alloydbadmin_api_endpoint=emulator.admin_url
    ) as p:
        (listener,) = p.listeners
        assert (listener.host, listener.port, listener.socket_path) == ("127.0.0.1", port, None)
        for driver in ("psycopg", "psycopg2", "pg8000"):
            engine = sqlalchemy.create_engine(p.sqlalchemy_url(driver=driver, **NATIVE))
            with engine.connect() as sa:
                assert sa.execute(sqlalchemy.text("SELECT current_user")).scalar() == DB_USER
            engine.dispose()
        conn = pg8000.native.Connection(DB_USER, port=port, password=DB_PASSWORD, database=DB_NAME)
        assert conn.run("SELECT 3") == [[3]]
        conn.close()
        assert p.stats()["project-id.us-central1.clust.inst"]["bytes_received"] > 0


def test_two_proxies_at_once(make_emulator):
    first = make_emulator()
    other = URI.replace("/instances/inst", "/instances/two")
    second = make_emulator(instances={other: {}})
    with (
        proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=first.admin_url) as a,
        proxy.Proxy(other, token=TOKEN_APP, alloydbadmin_api_endpoint=second.admin_url) as b,
        psycopg.connect(a.dsn(**NATIVE)) as ca,
        psycopg.connect(b.dsn(**NATIVE)) as cb,
    ):
        assert ca.execute("SELECT 1").fetchone() == cb.execute("SELECT 1").fetchone()
    assert first.connections and second.connections


def test_bad_options_are_refused_before_anything_starts():
    with pytest.raises(TypeError, match="unexpected keyword argument 'tokn'"):
        proxy.Proxy(URI, tokn="x")
    with pytest.raises(proxy.ConfigError, match="cannot specify --token and --credentials-file"):
        proxy.Proxy(URI, token="x", credentials_file="f.json")
    with pytest.raises(ValueError, match="missing instance uri"):
        proxy.Proxy()
    refused = {
        "max_sigterm_delay": "bogus",
        "port": 6000.5,
        "max_connections": -3,
        "token": None,
        "auto_iam_authn": "maybe",
        "psc": 1,
        "health_check": True,  # the command's HTTP servers are not the library's
        "quiet": True,
    }
    for name, value in refused.items():
        with pytest.raises(proxy.ConfigError, match=name):
            proxy.Proxy(URI, **{name: value})


def test_option_values_are_read_as_the_command_reads_them():
    from proxy.inprocess import build_config

    cfg = build_config(
        (URI,),
        {"auto_iam_authn": "false", "psc": "true", "max_sigterm_delay": "1m", "port": "7000"},
    )
    assert (cfg.auto_iam_authn, cfg.psc, cfg.max_sigterm_delay, cfg.port) == (
        False,
        True,
        60.0,
        7000,
    )
    assert build_config((URI,), {"max_sigterm_delay": 2}).max_sigterm_delay == 2.0


def test_start_up_errors_are_raised_not_printed(emulator, tmp_path, capfd):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    from proxy.errors import StartupError

    with (
        pytest.raises(StartupError, match="invalid JSON"),
        proxy.Proxy(URI, credentials_file=str(bad)),
    ):
        pass
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_another_user_cannot_reach_the_socket(emulator):
    with proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url) as p:
        path = p.listeners[0].socket_path
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(e.errno)\n"
            "else:\n    print('connected')\n"
        )
        result = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             "/usr/bin/python3", "-c", probe, path],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.stdout.strip() == "13", result  # EACCES


def test_start_and_stop_leave_nothing_behind(emulator):
    def counts() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), threading.active_count()

    def cycle() -> None:
        with (
            proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url) as p,
            psycopg.connect(p.dsn(**NATIVE)) as conn,
        ):
            conn.execute("SELECT 1")

    cycle()  # the first start-up creates what lives for the process (the data plane)
    before = counts()
    for _ in range(100):
        cycle()
    # The emulator (in this process) closes its side of the last connections
    # a moment later: a leak stays, a lag does not.
    deadline = time.monotonic() + 5
    while (now := counts())[0] > before[0] + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    fds, threads = now
    assert fds <= before[0] + 2 and threads <= before[1], (before, (fds, threads))


def test_an_open_connection_is_ended_at_close(emulator):
    p = proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url)
    p.start()
    conn = psycopg.connect(p.dsn(**NATIVE), autocommit=True)
    assert p.stats()["project-id.us-central1.clust.inst"]["open_connections"] == 1
    p.close()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()


def test_connection_test_raises_the_commands_message(emulator):
    with proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url) as p:
        p.connection_test()
        emulator.faults.set(mdx_error="not today")
        with pytest.raises(proxy.DialError) as caught:
            p.connection_test()
        assert str(caught.value) == "not today"
    with (
        pytest.raises(proxy.DialError, match="not today"),
        proxy.Proxy(
            URI,
            token=TOKEN_APP,
            run_connection_test=True,
            alloydbadmin_api_endpoint=emulator.admin_url,
        ),
    ):
        pass


def test_the_environment_is_read_only_when_asked(emulator, monkeypatch):
    monkeypatch.setenv("ALLOYDB_PROXY_INSTANCE_URI", URI)
    monkeypatch.setenv("ALLOYDB_PROXY_TOKEN", TOKEN_APP)
    monkeypatch.setenv("ALLOYDB_PROXY_ALLOYDBADMIN_API_ENDPOINT", emulator.admin_url)
    with pytest.raises(proxy.ConfigError, match="missing instance uri"):
        proxy.Proxy()  # the environment is not read
    with proxy.Proxy.from_environment() as p, psycopg.connect(p.dsn(**NATIVE)) as conn:
        assert conn.execute("SELECT 9").fetchone() == (9,)
        assert p.listeners[0].socket_path  # still the private directory


def test_a_forked_child_is_told_to_make_its_own(emulator):
    with proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url) as p:
        pid = os.fork()
        if pid == 0:  # the child: only os._exit leaves it
            try:
                p.connection_test()
            except RuntimeError as exc:
                os._exit(0 if "another process" in str(exc) else 2)
            except BaseException:
                os._exit(3)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        p.connection_test()  # the parent's proxy is untouched
    # A new Proxy in a child works (the worker pools and the loop are the child's own).
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with (
                proxy.Proxy(
                    URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url
                ) as q,
                psycopg.connect(q.dsn(**NATIVE)) as conn,
            ):
                code = 0 if conn.execute("SELECT 1").fetchone() == (1,) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


async def test_sync_and_async_proxies_together_share_one_loop(emulator):
    """The data plane reports finished connections to one loop: every Proxy runs on
    the same one, whether started with 'with' or 'async with'."""
    sync_proxy = proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url)
    sync_proxy.start()
    try:
        async with proxy.Proxy(
            URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url
        ) as async_proxy:
            assert async_proxy._loop is sync_proxy._loop
            for p in (sync_proxy, async_proxy):
                conn = await asyncpg.connect(p.dsn(**NATIVE))
                assert await conn.fetchval("SELECT 1") == 1
                await conn.close()
            await asyncio.sleep(0.2)
            assert async_proxy.stats()["project-id.us-central1.clust.inst"]["open_connections"] == 0
    finally:
        sync_proxy.close()
    assert sync_proxy.stats() == {}  # closed


def test_nothing_is_printed_without_a_logging_configuration(emulator, tmp_path):
    """A failed connection is logged to the 'proxy' logger; with no handler configured,
    nothing reaches stderr (a library prints nothing by itself)."""
    script = tmp_path / "app.py"
    script.write_text(
        "import psycopg, sys, proxy\n"
        "with proxy.Proxy(sys.argv[1], token='tok-denied', alloydbadmin_api_endpoint=sys.argv[2]) as p:\n"
        "    try:\n"
        "        psycopg.connect(p.dsn(user='app', password='x', dbname='appdb'))\n"
        "    except psycopg.OperationalError:\n"
        "        print('refused')\n"
    )
    result = subprocess.run(
        [sys.executable, str(script), URI, emulator.admin_url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.stdout.strip() == "refused" and result.stderr == "", result


def test_a_wildcard_listener_is_reached_on_loopback(emulator):
    port = free_port_block(1)
    with proxy.Proxy(
        URI,
        token=TOKEN_APP,
        address="0.0.0.0",
        port=port,
        alloydbadmin_api_endpoint=emulator.admin_url,
    ) as p:
        assert f"@127.0.0.1:{port}/" in p.dsn(**NATIVE)
        with psycopg.connect(p.dsn(**NATIVE)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_stats_count_the_bytes_exactly(emulator):
    """A raw client sends an SSLRequest (8 bytes) and gets "N" (1 byte) back."""
    import socket as socketlib

    with proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url) as p:
        with socketlib.socket(socketlib.AF_UNIX) as raw:
            raw.settimeout(10)
            raw.connect(p.listeners[0].socket_path)
            raw.sendall(bytes.fromhex("0000000804d2162f"))
            assert raw.recv(1) == b"N"
        stats = p.stats()["project-id.us-central1.clust.inst"]
        deadline = time.monotonic() + 5
        while stats["open_connections"] and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = p.stats()["project-id.us-central1.clust.inst"]
        assert (stats["bytes_sent"], stats["bytes_received"]) == (8, 1)
        assert stats["open_connections"] == 0 and stats["refreshes"] >= 1


def test_copy_of_200_mb_through_psycopg_arrives_whole(emulator):
    row = (os.urandom(4096).hex() + "\n").encode()  # 8 KiB of text per row
    rows = 200 * 1024 * 1024 // len(row)
    digest = hashlib.md5()
    with (
        proxy.Proxy(URI, token=TOKEN_APP, alloydbadmin_api_endpoint=emulator.admin_url) as p,
        psycopg.connect(p.dsn(**NATIVE), autocommit=True) as conn,
    ):
        conn.execute("CREATE TEMP TABLE copied (n serial, x text)")
        with conn.cursor().copy("COPY copied (x) FROM STDIN") as copy:
            for n in range(rows):
                line = row[:8] + str(n).encode().rjust(8, b"0") + row[16:]
                digest.update(line[:-1])
                copy.write(line)
        count, server_digest = conn.execute(
            "SELECT count(*), md5(string_agg(x, '' ORDER BY n)) FROM copied"
        ).fetchone()
    assert count == rows
    assert server_digest == digest.hexdigest()


def test_a_data_plane_that_cannot_run_is_a_start_up_error():
    """ALLOYDB_AUTH_PROXY_DATA_PLANE is read once per process: a child with a bad value."""
    code = (
        "import proxy\n"
        "p = proxy.Proxy('projects/p/locations/r/clusters/c/instances/i', token='t',\n"
        "                alloydbadmin_api_endpoint='http://127.0.0.1:9')\n"
        "try:\n"
        "    p.start()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ALLOYDB_AUTH_PROXY_DATA_PLANE": "bogus"},
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert out.startswith("DataPlaneError ALLOYDB_AUTH_PROXY_DATA_PLANE='bogus'"), out
