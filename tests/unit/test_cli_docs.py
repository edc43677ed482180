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
