"""The core's defect and stress tests again, where memory errors cannot pass quietly.

* MALLOC_PERTURB_: glibc fills freed memory with a pattern, so a read after
  free sees garbage at once (the re-queue-list use-after-free of issue 9
  died with SIGBUS this way, and passed without it).
* AddressSanitizer: the core is rebuilt with PROXY_ASAN=1 in a scratch copy
  of the package and the same tests run against it, with libasan preloaded
  into the interpreter. Any heap-use-after-free, overflow or double free
  aborts the run.

Both run in a subprocess with PROXY_SANITIZED=1, which skips this file there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/core/test_splice_defects.py", "tests/core/test_splice_stress.py"]

pytestmark = pytest.mark.skipif(
    os.environ.get("PROXY_SANITIZED") == "1", reason="already inside a sanitized run"
)


def run_core_tests(cwd: Path, extra_env: dict[str, str], *, timeout: float) -> None:
    env = {**os.environ, "PROXY_SANITIZED": "1", "STRESS_RUNS": "80", **extra_env}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    # What failed first: pytest shortens long assertion messages from the end.
    failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    summary = "\n".join(failed)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{summary}\n{output[-6000:]}"
    assert " passed" in proc.stdout, output[-3000:]


@pytest.mark.timeout(400)
def test_core_tests_pass_under_malloc_perturb():
    run_core_tests(ROOT, {"MALLOC_PERTURB_": "165"}, timeout=360)


def libasan() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    found = path.stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


@pytest.mark.timeout(900)
def test_core_tests_pass_under_address_sanitizer(tmp_path):
    asan = libasan()
    if asan is None:
        if os.environ.get("CI"):  # ci/install.sh installs gcc, which brings it
            pytest.fail("gcc's libasan is missing on CI: the use-after-free guards would not run")
        pytest.skip("gcc's libasan is not installed")
    # A scratch tree: the package sources, the build files and the tests.
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(
        ROOT / "proxy",
        tmp_path / "proxy",
        ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"),
    )
    shutil.copytree(
        ROOT / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__")
    )
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tmp_path,
        env={**os.environ, "PROXY_ASAN": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    env = {
        "LD_PRELOAD": asan,
        # Python itself keeps memory to exit; leaks are not what this hunts.
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "PYTHONPATH": str(tmp_path),
    }
    # The tests must meet the instrumented build, not the tree's own.
    probe = subprocess.run(
        [sys.executable, "-c", "import proxy._splice as s; print(s.__file__)"],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    loaded = probe.stdout.strip()
    assert loaded.startswith(str(tmp_path)), probe.stdout + probe.stderr
    assert b"__asan_init" in Path(loaded).read_bytes()
    run_core_tests(tmp_path, env, timeout=600)
