"""docs/cli.md is what the code generates (the CI drift check)."""

from __future__ import annotations

import os

from proxy.clidoc import render

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_reference_is_current():
    with open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8") as fh:
        committed = fh.read()
    assert committed == render(), "docs/cli.md is stale; run: .venv/bin/python ci/gen_cli_docs.py"


def test_cli_reference_lists_every_root_flag():
    text = render()
    for flag in ("--address", "--fuse-tmp-dir", "--with-backend-check", "--telemetry-project"):
        assert f"`{flag}`" in text


def test_the_reference_does_not_depend_on_what_ran_before():
    """click caches a command's help option from the first context that asks: the
    usage text of a bad command (built first in some test worker) once made the
    generated reference lose -h (a failure seen only under pytest-xdist)."""
    import subprocess
    import sys

    script = (
        "from proxy import cli; from proxy.clidoc import render; cli._usage(); "
        "print('| `--help` | `-h` |' in render())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "True"
