"""The coverage-guided fuzz runner (python -m tests.fuzz), one second per target:
every target starts under atheris, executes, and finds no crash."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.fuzz.targets import TARGETS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_every_fuzz_target_runs_under_atheris(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--seconds", "1", "--corpus", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [
        line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert len(rows) == len(TARGETS) + 1  # the header and one row per target
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[2].replace(",", "")) > 0, row  # it executed inputs
        assert cells[4] == "no crash", row
