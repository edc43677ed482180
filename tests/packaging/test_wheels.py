"""The wheels and the sdist, installed as a user gets them (ci/test_wheels.sh).

Builds the manylinux wheel (static OpenSSL, zig for glibc 2.28) and the pure
wheel, installs each in a fresh virtualenv with no C compiler on PATH, the
sdist with one, and runs ci/wheel/test_installed.py against the installed
command. Needs the network for PyPI and Debian's OpenSSL source; the OpenSSL
build is cached in .wheel-build/ (about 2 minutes the first time).
"""

from __future__ import annotations

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(1800)
def test_wheels_and_sdist_work_as_installed():
    proc = subprocess.run(
        ["bash", "ci/test_wheels.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1700
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "[test_wheels] all cases passed" in output
    for case in ("binary", "pure", "sdist"):
        assert f"[test_wheels] {case}: fresh virtualenv" in output
