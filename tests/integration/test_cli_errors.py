"""Bad input and life cycle through the real CLI subprocess: messages and exit codes."""

from __future__ import annotations

import signal
import socket

import pytest

from .conftest import URI
from .proxyproc import ProxyProcess


def run_cli(*args: str, env: dict[str, str] | None = None) -> ProxyProcess:
    proc = ProxyProcess(list(args), env=env)
    proc.wait_exit(30)
    return proc


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["projects/proj/locations/region/clusters/clust/"],
            'Error: could not parse instance uri: "projects/proj/locations/region/clusters/clust/"',
        ),
        (
            [],
            (
                "Error: missing instance uri (e.g., projects/$PROJECT/locations/$LOCATION/"
                "clusters/$CLUSTER/instances/$INSTANCE)"
            ),
        ),
        ([URI, "--foo"], "Error: unknown flag: --foo"),
        ([URI, "--address", "bogus"], 'Error: not a valid IP address: "bogus"'),
        (
            [URI, "--token", "t", "--credentials-file", "f"],
            "Error: cannot specify --token and --credentials-file flags at the same time",
        ),
        (
            [URI, "--unix-socket", "/tmp", "--port", "6000"],
            "Error: cannot specify --unix-socket and --port together",
        ),
        ([URI + "?port=abc"], 'Error: port query param is not a valid integer: "abc"'),
    ],
)
def test_bad_command_prints_error_and_usage_exit_1(args, message):
    proc = run_cli(*args)
    assert proc.proc.returncode == 1
    assert proc.stderr[0] == message
    assert "Usage:" in proc.stderr
    assert proc.stdout == []


def test_version_and_help_exit_0():
    proc = run_cli("--version")
    assert proc.proc.returncode == 0
    assert proc.stdout[0].startswith("alloydb-auth-proxy version ")
    proc = run_cli("--help")
    assert proc.proc.returncode == 0
    assert "--alloydbadmin-api-endpoint" in proc.output


def test_port_in_use_is_a_terminal_error(emulator):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(
            URI,
            "--port",
            str(port),
            "--token",
            "tok-app",
            "--alloydbadmin-api-endpoint",
            emulator.admin_url,
        )
    assert proc.proc.returncode == 1
    assert proc.stderr[-1].endswith(
        "The proxy has encountered a terminal error: unable to start: "
        f"[project-id.us-central1.clust.inst] Unable to mount socket: "
        f"listen tcp 127.0.0.1:{port}: bind: address already in use"
    )


def test_no_credentials_found(tmp_path):
    proc = run_cli(
        URI, "--port", "0", env={"HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path)}
    )
    assert proc.proc.returncode == 1
    assert any(
        line.endswith("Authorizing with Application Default Credentials") for line in proc.stdout
    )
    assert "could not find default credentials" in proc.stderr[-1]
    assert "The proxy has encountered a terminal error: unable to start" in proc.stderr[-1]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_exit_codes(emulator, sig, code):
    proc = ProxyProcess(
        [
            URI,
            "--port",
            "0",
            "--token",
            "tok-app",
            "--alloydbadmin-api-endpoint",
            emulator.admin_url,
        ]
    )
    proc.wait_ready()
    assert proc.stop(sig) == code
    assert f"{sig.name} signal received. Shutting down..." in proc.output
