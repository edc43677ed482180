"""The benchmark's smoke mode: every step of bench/run.py runs, side by side.

Only that it completes and reports every metric is checked: speed is never
asserted in tests (bench/README.md has the measured numbers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METRICS = [
    "upload_mbps",
    "download_mbps",
    "cpu_s_per_gb",
    *(f"{d}_p{n}_{k}" for d in ("up", "down") for n in (1, 2, 4, 8) for k in ("mbps", "cores")),
    "p4_cpu_s_per_gb",
    "ping_us",
    "emu_ping_us",
    "pgbench_tps",
    "connect_ms",
    "emu_connect_ms",
    "rss_kib_per_conn",
    "emu_rss_kib_per_conn",
    "start_to_ready_ms",
    "concurrent_ok",
]


def test_bench_smoke_runs_every_step(tmp_path):
    if shutil.which("go") is None:
        pytest.skip("the Go baseline needs Go: apt-get install golang-go")
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with open(tmp_path / "latest.json") as fh:
        data = json.load(fh)
    for path in ("ours", "go"):
        missing = [m for m in METRICS if m not in data["summary"][path]]
        assert not missing, f"{path} is missing {missing}"
    for path in ("direct", "inprocess", "inprocess-tcp", "ours", "go"):
        assert data["summary"][path]["copy_mbps"] > 0, f"no COPY row for {path}"
    assert "in-process / CLI" in (tmp_path / "latest.md").read_text()
    # Not a speed check: every one of the concurrent tunnels must have worked.
    wanted = data["meta"]["concurrent_connections"]
    assert data["summary"]["ours"]["concurrent_ok"] == wanted
    assert (tmp_path / "latest.md").read_text().startswith("Mode: **smoke**")
    assert data["meta"]["startup_top_imports_ms"], "no -X importtime breakdown of the start-up"
