"""The release path (cibuildwheel, the GitHub workflow) is configured as documented."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cibuildwheel_lists_the_linux_abi3_builds():
    exe = os.path.join(os.path.dirname(sys.executable), "cibuildwheel")
    exe = exe if os.path.exists(exe) else (shutil.which("cibuildwheel") or exe)
    if not os.path.exists(exe):
        pytest.fail("cibuildwheel is a test dependency: pip install -e '.[test]'")
    out = subprocess.run(
        [exe, "--platform", "linux", "--print-build-identifiers"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert sorted(out) == sorted(
        ["cp310-manylinux_x86_64", "cp310-manylinux_aarch64",
         "cp310-musllinux_x86_64", "cp310-musllinux_aarch64"]
    )  # fmt: skip


def test_cibuildwheel_tests_the_installed_native_core_not_the_source_tree():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        cibw = tomllib.load(fh)["tool"]["cibuildwheel"]
    assert cibw["test-command"] == "bash {project}/ci/wheel/test_cibuildwheel.sh {project}"
    with open(os.path.join(ROOT, "ci", "wheel", "test_cibuildwheel.sh")) as fh:
        script = fh.read()
    assert "ALLOYDB_AUTH_PROXY_DATA_PLANE=native" in script and 'cd "$WORK"' in script


def test_the_workflow_builds_every_artifact():
    with open(os.path.join(ROOT, ".github", "workflows", "wheels.yml")) as fh:
        flow = yaml.safe_load(fh)
    jobs = flow["jobs"]
    steps = " ".join(str(step) for job in jobs.values() for step in job["steps"])
    assert "pypa/cibuildwheel" in steps
    assert "PROXY_PURE=1 python -m build --wheel" in steps
    assert "python -m build --sdist" in steps
    (cibw,) = [s for s in jobs["binary"]["steps"] if "cibuildwheel" in s.get("uses", "")]
    assert cibw["env"]["CIBW_ARCHS"] == "native"  # no emulation on either runner
    oses = jobs["pure-elsewhere"]["strategy"]["matrix"]["os"]
    assert any(o.startswith("macos") for o in oses) and any(o.startswith("windows") for o in oses)
