"""The data-plane tests again, on the portable plane (the pure wheel's).

The same files as the native run (tests/core and the small-buffer tests in a
private network namespace), with ALLOYDB_AUTH_PROXY_DATA_PLANE=portable: the
two planes are held to one behaviour.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(1200)
def test_core_and_small_buffer_tests_pass_on_the_portable_plane():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/core", "tests/integration/test_small_buffers.py",
         "--deselect", "tests/core/test_sanitizers.py"],
        cwd=ROOT,
        env={**os.environ, "ALLOYDB_AUTH_PROXY_DATA_PLANE": "portable"},
        capture_output=True,
        text=True,
        timeout=1100,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
