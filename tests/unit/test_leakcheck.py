"""The suite-wide secret scan finds what it should (tests/leakcheck.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import leakcheck


def test_a_planted_secret_is_found_in_a_transcript():
    token = leakcheck.secret("ya29.planted-for-the-scan-test", "a planted token")
    leakcheck.record("planted transcript", f"2026/01/01 dial failed with {token}")
    try:
        assert "planted transcript: contains a planted token" in leakcheck.findings()
    finally:
        leakcheck._transcripts.pop()  # keep the real run's scan clean


def test_any_pem_private_key_is_a_finding():
    leakcheck.record("key transcript", "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n")
    try:
        assert "key transcript: contains a PEM private key" in leakcheck.findings()
    finally:
        leakcheck._transcripts.pop()


def test_the_output_of_a_cli_subprocess_is_recorded():
    before = len(leakcheck._transcripts)
    subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True, check=True)
    added = leakcheck._transcripts[before:]
    assert added and "version" in added[-1][1]()


def test_secrets_given_to_the_cli_are_registered():
    leakcheck.secrets_of_command(
        ["alloydb-auth-proxy", "URI", "--token", "flag-token-1", "--login-token=flag-token-2"],
        {"ALLOYDB_PROXY_TOKEN": "env-token-3", "GCE_METADATA_TOKEN_URL": "http://127.0.0.1:9/x"},
    )
    leakcheck.record("cli transcript", "flag-token-1 flag-token-2 env-token-3 http://127.0.0.1:9/x")
    try:
        found = [f for f in leakcheck.findings() if f.startswith("cli transcript")]
        assert len(found) == 3, found  # the URL is not a secret
    finally:
        leakcheck._transcripts.pop()


def test_debug_messages_are_scanned_whatever_the_logging_level():
    from proxy.log import StdlibLogger

    token = leakcheck.secret("debug-level-token", "a token in a debug message")
    StdlibLogger().debug("refreshing with %s", token)  # the proxy logger is at WARNING
    assert "in-process proxy logger: contains a token in a debug message" in leakcheck.findings()
    leakcheck._secrets.pop(token)  # keep the real run's scan clean


def test_a_secret_found_by_an_xdist_worker_fails_the_run(tmp_path):
    """Under pytest-xdist each worker scans its own transcripts; the controller
    must gather the findings (a worker's own report is never shown)."""
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "from tests import leakcheck\n\n\n"
        "def test_leaks():\n    leakcheck.record('planted', 'the password is app-secret')\n\n\n"
        "def test_clean():\n    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "tests.conftest",
         "-p", "no:cacheprovider", str(planted)],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "secrets found in the proxy's output" in done.stdout
    assert "2 passed" in done.stdout
