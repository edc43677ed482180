"""Unix socket listeners: no other local user can take them over; restarts after kill -9 work.

(Issue 10, findings 1 and 9.) The proxy used to chmod its socket directory to
0777 without the sticky bit, so any local user could unlink the socket, bind
their own and read the passwords psql sent to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from .conftest import URI, psql

SHORT = "project-id.us-central1.clust.inst"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@pytest.fixture
def base():
    """A socket base directory that everyone may enter (0755), with a short path."""
    path = Path(tempfile.mkdtemp(prefix="pxy", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# The system interpreter: ours may live under a home directory nobody cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3"


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"needs {SYSTEM_PYTHON} to run code as nobody")
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", code],
        user="nobody",
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd="/",
    )


@needs_root
def test_another_user_cannot_replace_the_socket(start_proxy, base):
    start_proxy(URI, "--unix-socket", str(base))
    directory = base / SHORT
    socket_path = directory / ".s.PGSQL.5432"
    assert not directory.stat().st_mode & 0o002  # the umask applies, as in Go
    assert (socket_path.stat().st_mode & 0o777) == 0o777  # the socket itself: anyone connects

    unlink = as_nobody(f"import os; os.unlink({str(socket_path)!r})")
    assert unlink.returncode != 0 and "PermissionError" in unlink.stderr
    squat = as_nobody(
        f"import socket; s = socket.socket(socket.AF_UNIX); s.bind({str(directory / 'other')!r})"
    )
    assert squat.returncode != 0 and "PermissionError" in squat.stderr
    # nobody can still connect, as with the Go proxy
    connect = as_nobody(
        f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(socket_path)!r})"
    )
    assert connect.returncode == 0, connect.stderr
    assert psql("SELECT 'ours'", host=str(directory)).stdout.strip() == "ours"


@pytest.mark.parametrize("problem", ["world-writable", "symlink", "other-owner", "parent"])
def test_an_unsafe_socket_directory_is_refused(start_proxy, base, problem):
    directory = base / SHORT
    if problem == "world-writable":
        directory.mkdir()
        directory.chmod(0o777)
        expected = "is writable by other users (mode 0777), who could replace the socket"
    elif problem == "symlink":
        target = base / "elsewhere"
        target.mkdir()
        directory.symlink_to(target)
        expected = "is a symbolic link"
    elif problem == "parent":
        base.chmod(0o777)  # others could rename our directory away
        directory = base
        expected = "is writable by other users (mode 0777), who could replace the socket"
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory to another user")
        directory.mkdir()
        os.chown(directory, 65534, 65534)
        expected = "belongs to another user (uid 65534)"
    proxy = start_proxy(URI, "--unix-socket", str(base), ready=False)
    assert proxy.wait_exit() == 1
    assert f"Unable to mount socket: unsafe socket directory: {directory} " in proxy.output
    assert expected in proxy.output


def test_a_sticky_shared_directory_is_accepted(start_proxy, base):
    directory = base / SHORT
    directory.mkdir()
    directory.chmod(0o1777)  # like /tmp: others cannot remove what is ours
    start_proxy(URI, "--unix-socket", str(base))
    assert psql("SELECT 1", host=str(directory)).stdout.strip() == "1"


def test_a_restart_after_kill_9_replaces_the_stale_socket(start_proxy, base):
    first = start_proxy(URI, "--unix-socket", str(base))
    first.stop(signal.SIGKILL)
    socket_path = base / SHORT / ".s.PGSQL.5432"
    assert socket_path.exists()  # left behind
    start_proxy(URI, "--unix-socket", str(base))
    assert psql("SELECT 2", host=str(base / SHORT)).stdout.strip() == "2"


def test_a_live_socket_is_not_taken_over(start_proxy, base):
    start_proxy(URI, "--unix-socket", str(base))
    second = start_proxy(URI, "--unix-socket", str(base), ready=False)
    assert second.wait_exit() == 1
    assert "bind: address already in use" in second.output
    assert psql("SELECT 3", host=str(base / SHORT)).stdout.strip() == "3"


def test_a_group_writable_umask_still_restarts(start_proxy, base):
    """umask 002 makes our own directory 0775 (our group): not a reason to refuse it later."""
    old = os.umask(0o002)
    try:
        first = start_proxy(URI, "--unix-socket", str(base))
        assert (base / SHORT).stat().st_mode & 0o070 == 0o070
        first.stop()
        start_proxy(URI, "--unix-socket", str(base))
    finally:
        os.umask(old)
    assert psql("SELECT 4", host=str(base / SHORT)).stdout.strip() == "4"


@pytest.mark.parametrize("failure", ["connection-test", "http-server"])
def test_error_exits_remove_the_socket_file(start_proxy, emulator, base, failure):
    """Issue 12, finding 2: the next start must not meet 'address already in use'."""
    socket_path = base / SHORT / ".s.PGSQL.5432"
    if failure == "connection-test":
        emulator.faults.set(admin_status=403)
        extra = ["--run-connection-test"]
    else:
        taken = socket.create_server(("127.0.0.1", 0))  # the health port is in use
        extra = ["--health-check", "--http-port", str(taken.getsockname()[1])]
    try:
        failed = start_proxy(URI, "--unix-socket", str(base), *extra, ready=False)
        assert failed.wait_exit() == 1
    finally:
        emulator.faults.clear()
        if failure == "http-server":
            taken.close()
    assert not socket_path.exists()
    start_proxy(URI, "--unix-socket", str(base))
    assert psql("SELECT 6", host=str(base / SHORT)).stdout.strip() == "6"
