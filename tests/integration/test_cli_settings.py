"""ALLOYDB_PROXY_* environment variables and --config-file, through the real CLI."""

from __future__ import annotations

import json
import re
import socket

import pytest

from .conftest import URI
from .proxyproc import ProxyProcess, free_port_block

SHORT = "project-id.us-central1.clust.inst"
SECOND = URI.replace("/instances/inst", "/instances/second")
SECOND_SHORT = "project-id.us-central1.clust.second"


@pytest.fixture
def launch(emulator):
    started = []

    def start(*args, env=None, ready=True, cwd=None):
        full_env = {
            "ALLOYDB_PROXY_ALLOYDBADMIN_API_ENDPOINT": emulator.admin_url,
            "ALLOYDB_PROXY_TOKEN": "tok-app",
        }
        full_env.update(env or {})
        proc = ProxyProcess(list(args), env=full_env, cwd=cwd)
        started.append(proc)
        if ready:
            proc.wait_ready()
        else:
            proc.wait_exit()
        return proc

    yield start
    for proc in started:
        proc.stop()


def listening_ports(proc):
    return [int(line.rsplit(":", 1)[1]) for line in proc.stdout if "Listening on" in line]


def listeners(proc) -> list[tuple[str, int]]:
    """(instance short name, port) of each "[<short>] Listening on" line, in order."""
    found = []
    for line in proc.stdout:
        match = re.search(r"\[([^\]]+)\] Listening on [\d.]+:(\d+)$", line)
        if match:
            found.append((match.group(1), int(match.group(2))))
    return found


def test_precedence_flag_over_env_over_file(launch, tmp_path):
    a, b, c = (free_port_block(1) for _ in range(3))
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(f'port = "{c}"\n')
    assert listening_ports(launch(URI, "--config-file", str(cfg))) == [c]
    assert listening_ports(
        launch(URI, "--config-file", str(cfg), env={"ALLOYDB_PROXY_PORT": str(b)})
    ) == [b]
    proc = launch(
        URI, "--port", str(a), "--config-file", str(cfg), env={"ALLOYDB_PROXY_PORT": str(b)}
    )
    assert listening_ports(proc) == [a]


def test_instance_uris_from_env_stop_at_the_first_gap(launch):
    port = free_port_block(3)
    proc = launch(
        "--port",
        str(port),
        env={
            "ALLOYDB_PROXY_INSTANCE_URI": URI,
            "ALLOYDB_PROXY_INSTANCE_URI_1": SECOND,
            "ALLOYDB_PROXY_INSTANCE_URI_3": URI.replace("inst", "never"),
        },
    )
    assert listeners(proc) == [(SHORT, port), (SECOND_SHORT, port + 1)]


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
def test_config_file_formats(launch, tmp_path, fmt):
    port = free_port_block(2)
    values = {"instance-uri-0": URI, "instance-uri-1": SECOND, "port": port, "debug-logs": True}
    path = tmp_path / f"proxy.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(values))
    elif fmt == "yaml":
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    else:
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    proc = launch("--config-file", str(path))
    assert listeners(proc) == [(SHORT, port), (SECOND_SHORT, port + 1)]


def test_env_bools_use_go_spellings_and_count_as_set(launch, tmp_path):
    proc = launch(
        URI,
        env={"ALLOYDB_PROXY_UNIX_SOCKET": str(tmp_path), "ALLOYDB_PROXY_PORT": "6000"},
        ready=False,
    )
    assert proc.proc.returncode == 1
    assert proc.stderr[0] == "Error: cannot specify --unix-socket and --port together"
    # "T" is true for Go's ParseBool: quiet hides the info lines, the terminal error remains.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = launch(URI, "--port", str(port), env={"ALLOYDB_PROXY_QUIET": "T"}, ready=False)
    assert proc.proc.returncode == 1
    assert proc.stdout == []
    assert "The proxy has encountered a terminal error" in proc.stderr[-1]


def test_invalid_env_value_is_ignored_with_a_warning(launch):
    proc = launch(
        URI,
        "--port",
        str(free_port_block(1)),
        env={"ALLOYDB_PROXY_MAX_CONNECTIONS": "lots", "ALLOYDB_PROXY_DEBUG_LOGS": "maybe"},
    )
    assert any(
        'Ignoring invalid value "lots" of environment variable ALLOYDB_PROXY_MAX_CONNECTIONS'
        in line
        for line in proc.stderr
    )
    assert any("ALLOYDB_PROXY_DEBUG_LOGS" in line for line in proc.stderr)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("proxy.ini", "Error: config file {path} should have extension of toml, yaml, or json"),
        (
            "missing.toml",
            "Error: failed to load configuration from {path}: open {path}: no such file or directory",
        ),
    ],
)
def test_config_file_errors(launch, tmp_path, name, message):
    path = tmp_path / name
    if name.endswith(".ini"):
        path.write_text("port=1\n")
    proc = launch(URI, "--config-file", str(path), ready=False)
    assert proc.proc.returncode == 1
    assert proc.stderr[0] == message.format(path=path)
