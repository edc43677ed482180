"""ci/openssl_source.py: where the wheel's OpenSSL comes from, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "ci", "openssl_source.py")


def run(tmp_path, **env):
    return subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path / "src")],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_source_reachable_says_what_was_looked_for_and_the_way_out(tmp_path):
    proc = run(tmp_path, DEBIAN_MIRROR="http://127.0.0.1:9/debian", OPENSSL_TARBALL="")
    assert proc.returncode == 1
    assert "cannot read Debian's source indexes" in proc.stderr
    assert "trixie" in proc.stderr and "127.0.0.1:9" in proc.stderr
    assert "OPENSSL_TARBALL" in proc.stderr


def test_a_local_tarball_is_taken_as_given(tmp_path):
    tarball = tmp_path / "openssl-3.9.9.tar.gz"
    tarball.write_bytes(b"not really")
    proc = run(tmp_path, OPENSSL_TARBALL=str(tarball))
    assert proc.returncode == 0 and proc.stdout.strip() == str(tarball)
    missing = run(tmp_path, OPENSSL_TARBALL=str(tmp_path / "nope.tar.gz"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_versions_compare_numerically():
    sys.path.insert(0, os.path.join(ROOT, "ci"))
    try:
        import openssl_source
    finally:
        sys.path.pop(0)
    assert openssl_source.version_key("3.5.10") > openssl_source.version_key("3.5.9")
