"""What a published package carries: one version everywhere, a licence, a changelog."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import proxy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_changelog_heads_with_the_package_version():
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as fh:
        versions = re.findall(r"^## (\d+\.\d+\.\d+\S*)", fh.read(), flags=re.M)
    assert versions and versions[0] == proxy.__version__


def test_version_flag_and_installed_metadata_agree():
    from importlib.metadata import metadata, version

    out = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith(f"alloydb-auth-proxy version {proxy.__version__} ")
    assert version("alloydb-auth-proxy") == proxy.__version__
    meta = metadata("alloydb-auth-proxy")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Programming Language :: Python :: 3.10" in meta.get_all("Classifier")
    assert meta.get_all("Project-URL")


def test_the_licence_file_is_the_apache_licence():
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as fh:
        text = fh.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
