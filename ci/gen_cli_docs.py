"""Writes docs/cli.md from the click commands (see proxy/clidoc.py)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from proxy.clidoc import render  # noqa: E402

with open(os.path.join(ROOT, "docs", "cli.md"), "w", encoding="utf-8") as fh:
    fh.write(render())
print("wrote docs/cli.md")
