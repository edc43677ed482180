"""Reloading the instance list of a running CLI (SIGHUP, POST /reload) under load:
open PostgreSQL sessions and checksummed streams live through it, and a
configuration that cannot be applied leaves the old one serving."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

import psycopg
import pytest

from proxy.emulator.echo import echo_backend

from .conftest import DB_NAME, DB_PASSWORD, DB_USER, URI, http_get, psql
from .proxyproc import ProxyProcess, free_port_block
from .streaming import StreamingLoad, echo_uri


def refused(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def write_config(path, *instances: str, **options: str) -> None:
    lines = [
        f'instance-uri{"" if i == 0 else f"-{i}"} = "{uri}"' for i, uri in enumerate(instances)
    ]
    lines += [f'{key.replace("_", "-")} = "{value}"' for key, value in options.items()]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def reload_setup(emulator, tmp_path):
    """Echo instances a, b, c; a config file; ports; the proxy is started by the test."""
    port, stop = echo_backend()
    uris = {name: echo_uri(name) for name in "abc"}
    for uri in uris.values():
        emulator.add_instance(uri, backend=("127.0.0.1", port))
    base = free_port_block(7)
    started: list[ProxyProcess] = []

    def start(config) -> ProxyProcess:
        proxy = ProxyProcess(
            ["--config-file", str(config), "--token", "tok-app", "--quitquitquit",
             "--admin-port", str(base + 6), "--alloydbadmin-api-endpoint", emulator.admin_url]
        )  # fmt: skip
        started.append(proxy)
        proxy.wait_ready()
        return proxy

    yield uris, base, start, f"http://127.0.0.1:{base + 6}/reload"
    for proxy in started:
        proxy.stop()
    stop()


def test_add_remove_and_change_instances_under_load(reload_setup, tmp_path):
    """SIGHUP with a new file: a is removed, b moves to another port (a changed
    query parameter), c is added, the PostgreSQL instance stays. Sessions and
    streams opened before go on and lose nothing; the new listeners serve."""
    uris, base, start, _ = reload_setup
    pg_port, a_port, b_port, b_new_port, c_port = base, base + 1, base + 2, base + 3, base + 4
    config = tmp_path / "proxy.toml"
    write_config(
        config, f"{URI}?port={pg_port}", f"{uris['a']}?port={a_port}", f"{uris['b']}?port={b_port}"
    )
    proxy = start(config)
    dsn = f"host=127.0.0.1 port={pg_port} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME}"
    with psycopg.connect(dsn) as session, StreamingLoad([a_port, b_port], streams=20) as load:
        session.execute("CREATE TEMP TABLE t (n int)")
        session.execute("INSERT INTO t VALUES (1)")
        load.wait_progress()
        write_config(
            config, f"{URI}?port={pg_port}", f"{uris['b']}?port={b_new_port}",
            f"{uris['c']}?port={c_port}",
        )  # fmt: skip
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for(r"Reload done: 2 listener\(s\) added, 2 removed, 1 kept")
        for name, port in (("a", a_port), ("b", b_port)):
            proxy.wait_for(
                rf"\[project-id\.us-central1\.clust\.{name}\] Stopped listening on "
                rf"127\.0\.0\.1:{port}; its open connections go on"
            )
        proxy.wait_for(
            rf"\[project-id\.us-central1\.clust\.b\] Listening on 127\.0\.0\.1:{b_new_port}"
        )
        proxy.wait_for(rf"\[project-id\.us-central1\.clust\.c\] Listening on 127\.0\.0\.1:{c_port}")
        assert refused(a_port) and refused(b_port)
        for port in (b_new_port, c_port):
            stream = load.add(port)
            assert stream.opened, stream.error
        # The streams opened before the reload are still moving bytes.
        load.wait_progress()
        # The session opened before the reload goes on, temp table and all.
        session.execute("INSERT INTO t VALUES (2)")
        assert session.execute("SELECT sum(n) FROM t").fetchone() == (3,)
        assert psql("SELECT 7", host="127.0.0.1", port=pg_port).stdout.strip() == "7"
        streams = load.finish()
    assert len(streams) == 22
    for stream in streams:
        assert stream.error is None and stream.lost == 0 and stream.finished, stream
    assert proxy.proc.poll() is None


def test_a_reload_that_cannot_be_applied_keeps_the_old_configuration(reload_setup, tmp_path):
    """POST /reload with a broken file, a bad instance URI, a port in use and a
    new global option: the old listeners keep serving, each refusal says why."""
    uris, base, start, reload_url = reload_setup
    a_port, b_port = base + 1, base + 2
    config = tmp_path / "proxy.toml"
    write_config(config, f"{uris['a']}?port={a_port}")
    proxy = start(config)
    with StreamingLoad(a_port, streams=5) as load:
        load.wait_progress()

        config.write_text('instance-uri = "unterminated\n')
        status, body = http_get(reload_url, method="POST")
        assert status == 500, body
        assert body.startswith("Reload failed, still serving the previous configuration: ")
        assert f"failed to load configuration from {config}" in body

        write_config(config, "projects/p/locations/r/clusters/c/")
        status, body = http_get(reload_url, method="POST")
        assert status == 500
        assert 'could not parse instance uri: "projects/p/locations/r/clusters/c/"' in body

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", b_port))
            taken.listen()
            # a moves to a free port, b wants the taken one: nothing changes at all.
            write_config(config, f"{uris['a']}?port={base + 3}", f"{uris['b']}?port={b_port}")
            status, body = http_get(reload_url, method="POST")
            assert status == 500
            assert (
                f"[project-id.us-central1.clust.b] Unable to mount socket: "
                f"listen tcp 127.0.0.1:{b_port}: bind: address already in use"
            ) in body
        assert refused(base + 3)
        assert load.add(a_port).opened  # a was reopened where it was

        assert http_get(reload_url, method="GET")[0] == 400
        write_config(config, f"{uris['a']}?port={a_port}", max_connections="7")
        status, body = http_get(reload_url, method="POST")
        assert (status, body) == (200, "Reload done: 0 listener(s) added, 0 removed, 1 kept\n")
        proxy.wait_for(r"Ignoring the new value of --max-connections: it takes effect on restart")
        streams = load.finish()
    for stream in streams:
        assert stream.error is None and stream.lost == 0 and stream.finished, stream
    assert proxy.output.count("Reload failed, still serving the previous configuration") == 3


def test_a_connection_dialling_through_a_reload_that_removes_its_instance(
    reload_setup, emulator, tmp_path
):
    """Accepted before the reload, still waiting for the Admin API (3 s) when it
    removes the instance: the connection is served all the same."""
    uris, base, start, reload_url = reload_setup
    a_port, b_port = base + 1, base + 2
    config = tmp_path / "proxy.toml"
    write_config(config, f"{uris['a']}?port={a_port}", f"{uris['b']}?port={b_port}")
    proxy = start(config)
    emulator.instances[uris["a"]].faults.set(admin_latency=3)
    with StreamingLoad(b_port, streams=1) as load:
        waiting = threading.Thread(target=load.add, args=(a_port,))
        waiting.start()
        time.sleep(0.5)  # accepted, its dial waits for connectionInfo
        write_config(config, f"{uris['b']}?port={b_port}")
        assert http_get(reload_url, method="POST")[0] == 200
        waiting.join(30)
        streams = load.finish()
    assert len(streams) == 2
    for stream in streams:
        assert stream.opened and stream.error is None and stream.lost == 0, stream
    assert "cache closed" not in proxy.output


def test_instances_from_the_command_line_cannot_be_reloaded(emulator, tmp_path):
    port = free_port_block(1)
    config = tmp_path / "proxy.toml"
    config.write_text(f'port = "{port}"\n')
    args = [URI, "--config-file", str(config), "--token", "tok-app",
            "--alloydbadmin-api-endpoint", emulator.admin_url]  # fmt: skip
    with ProxyProcess(args) as proxy:
        proxy.wait_ready()
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for(
            r"Reload failed, still serving the previous configuration: the instances are given "
            r"on the command line; a reload reads only the instance-uri, instance-uri-1, \.\.\. "
            r"keys of --config-file"
        )
        assert psql("SELECT 1", host="127.0.0.1", port=port).stdout.strip() == "1"


def test_sigterm_during_a_reload_that_cannot_read_its_file(emulator, tmp_path):
    """The file hangs (a FIFO nobody writes, as a hung network file system would):
    SIGTERM still ends the proxy at once, and no listener opens after it."""
    port, stop_echo = echo_backend()
    uri = echo_uri("a")
    emulator.add_instance(uri, backend=("127.0.0.1", port))
    listen = free_port_block(1)
    config = tmp_path / "proxy.toml"
    os.mkfifo(config)
    feeder = threading.Thread(
        target=lambda: config.write_text(f'instance-uri = "{uri}?port={listen}"\n')
    )
    feeder.start()  # the start-up read
    try:
        with ProxyProcess(["--config-file", str(config), "--token", "tok-app",
                           "--alloydbadmin-api-endpoint", emulator.admin_url]) as proxy:  # fmt: skip
            proxy.wait_ready()
            feeder.join(10)
            proxy.proc.send_signal(signal.SIGHUP)
            proxy.wait_for(r"Reloading the configuration \(SIGHUP\)")
            began = time.monotonic()
            assert proxy.stop(signal.SIGTERM) == 143
            assert time.monotonic() - began < 10
            assert refused(listen)
    finally:
        with contextlib.suppress(OSError):  # let a reader still blocked go
            os.close(os.open(config, os.O_WRONLY | os.O_NONBLOCK))
        stop_echo()
