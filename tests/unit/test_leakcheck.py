"""The suite-wide secret scan finds what it should (tests/leakcheck.py)."""

from __future__ import annotations

import subprocess
import sys

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
