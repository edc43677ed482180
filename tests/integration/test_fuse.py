"""``--fuse``: a real FUSE mount served by the CLI, with psql through it.

Needs /dev/fuse, fusermount and libfuse (ci/install.sh installs fuse3 and
libfuse2) and the ``fuse`` extra; skipped, with the reason, where any is missing.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from proxy.fusemount import unsupported_reason

from .conftest import URI, psql
from .proxyproc import ProxyProcess, without_module

REASON = unsupported_reason()
needs_fuse = pytest.mark.skipif(REASON is not None, reason=f"FUSE unavailable: {REASON}")

SECOND = URI.replace("/instances/inst", "/instances/second")
NAME, SECOND_NAME = "project-id.us-central1.clust.inst", "project-id.us-central1.clust.second"


def mounted(directory) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(directory) for line in fh)


@pytest.fixture
def fuse_dirs():
    # Short: a unix socket path has at most 107 bytes, and psql's goes through the mount.
    top = Path(tempfile.mkdtemp(prefix="fz", dir="/tmp"))
    mnt, sockets = top / "m", top / "s"
    mnt.mkdir()
    yield mnt, sockets
    if mounted(mnt):  # a failed test must not leave a mount behind
        subprocess.run(["fusermount", "-uz", str(mnt)], check=False)
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def fuse_proxy(start_proxy, emulator, fuse_dirs):
    emulator.add_instance(SECOND)
    mnt, sockets = fuse_dirs
    proxy = start_proxy("--fuse", str(mnt), "--fuse-tmp-dir", str(sockets))
    return proxy, mnt, sockets


@needs_fuse
def test_psql_through_two_instances_by_name(fuse_proxy):
    proxy, mnt, sockets = fuse_proxy
    assert mounted(mnt)
    assert os.listdir(mnt) == ["README"]
    assert "project.region.cluster.instance" in (mnt / "README").read_text()
    for name, n in ((NAME, 1), (SECOND_NAME, 2)):
        result = psql(f"SELECT {n}, current_user", host=str(mnt / name))
        assert result.stdout.strip() == f"{n}|app"
        assert os.readlink(mnt / name) == str(sockets / name)
        assert (sockets / name / ".s.PGSQL.5432").is_socket()
    assert sorted(os.listdir(mnt)) == sorted(["README", NAME, SECOND_NAME])
    # A second session on the same name uses the same socket.
    assert psql("SELECT 3", host=str(mnt / NAME)).stdout.strip() == "3"
    assert proxy.output.count(f"[{NAME}] Listening on ") == 1
    with pytest.raises(OSError) as write:
        (mnt / "README").write_text("x")
    assert write.value.errno in (errno.EROFS, errno.EACCES)


@needs_fuse
def test_a_bad_or_unknown_name_is_enoent_and_logged(fuse_proxy):
    proxy, mnt, _ = fuse_proxy
    for name in ("not-an-instance", "project-id.us-central1.clust.nope"):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / name)
    proxy.wait_for(
        r'could not create socket for "not-an-instance": invalid instance name "not-an-instance", '
        r"expected project\.region\.cluster\.instance",
        stream="stderr",
    )
    proxy.wait_for(
        r'could not create socket for "project-id\.us-central1\.clust\.nope": refresh error: ',
        stream="stderr",
    )
    assert os.listdir(mnt) == ["README"]
    # The proxy goes on serving the good names.
    assert psql("SELECT 1", host=str(mnt / NAME)).stdout.strip() == "1"


@needs_fuse
def test_sigterm_unmounts_and_exits_143(fuse_proxy):
    proxy, mnt, sockets = fuse_proxy
    psql("SELECT 1", host=str(mnt / NAME))
    assert proxy.stop(signal.SIGTERM) == 143
    assert not mounted(mnt)
    assert os.listdir(mnt) == []
    assert not (sockets / NAME / ".s.PGSQL.5432").exists()


@needs_fuse
def test_a_mount_left_by_a_killed_proxy_is_reported(start_proxy, fuse_dirs):
    mnt, sockets = fuse_dirs
    killed = start_proxy("--fuse", str(mnt), "--fuse-tmp-dir", str(sockets))
    killed.stop(signal.SIGKILL)
    assert mounted(mnt)
    again = start_proxy("--fuse", str(mnt), "--fuse-tmp-dir", str(sockets), ready=False)
    assert again.wait_exit() == 1
    again.wait_for(
        rf"The proxy has encountered a terminal error: unable to start: stat {mnt}: transport "
        rf"endpoint is not connected: a FUSE mount left behind by a proxy that did not exit "
        rf"cleanly; remove it with: fusermount -u {mnt}",
        stream="stderr",
    )


@needs_fuse
def test_a_missing_mount_directory(start_proxy, tmp_path):
    proxy = start_proxy("--fuse", str(tmp_path / "absent"), ready=False)
    assert proxy.wait_exit() == 1
    proxy.wait_for(
        rf"terminal error: unable to start: stat {tmp_path / 'absent'}: no such file or directory",
        stream="stderr",
    )


@needs_fuse
def test_without_the_extra_the_error_names_it(tmp_path):
    proxy = ProxyProcess(["--fuse", str(tmp_path)], command=without_module("mfusepy"))
    assert proxy.wait_exit() == 1
    err = "\n".join(proxy.stderr)
    assert err.startswith(
        "Error: --fuse is not supported: the FUSE binding (mfusepy) is not installed: "
        "install the extra: pip install 'alloydb-auth-proxy[fuse]'"
    ), err
    assert "Usage:" in err


@needs_fuse
def test_a_slow_lookup_holds_no_other_name(fuse_proxy, emulator):
    """The Admin API takes 5 s for one instance: a name already served answers at once."""
    proxy, mnt, _ = fuse_proxy
    os.stat(mnt / NAME)
    emulator.instances[SECOND].faults.set(admin_latency=5)
    slow = threading.Thread(target=os.path.exists, args=(mnt / SECOND_NAME,))
    time.sleep(1.5)  # past the kernel's one-second cache of the first lookup
    slow.start()
    time.sleep(0.3)
    began = time.monotonic()
    os.stat(mnt / NAME)
    assert time.monotonic() - began < 2
    slow.join(30)


@needs_fuse
def test_a_busy_or_non_empty_mount_point(start_proxy, fuse_dirs):
    """A file in the directory does not stop the mount (go-fuse mounts over it), and a
    process inside the mount at exit neither holds the exit nor leaves the mount."""
    mnt, sockets = fuse_dirs
    (mnt / "left-over").write_text("x")
    proxy = start_proxy("--fuse", str(mnt), "--fuse-tmp-dir", str(sockets))
    assert os.listdir(mnt) == ["README"]
    inside = subprocess.Popen(["sleep", "60"], cwd=mnt)
    try:
        began = time.monotonic()
        assert proxy.stop(signal.SIGTERM) == 143
        assert time.monotonic() - began < 5
    finally:
        inside.kill()
        inside.wait()
    time.sleep(0.5)
    assert not mounted(mnt)
    assert os.listdir(mnt) == ["left-over"]


@needs_fuse
def test_a_tmp_dir_inside_the_mount_is_refused(start_proxy, fuse_dirs):
    mnt, _ = fuse_dirs
    proxy = start_proxy("--fuse", str(mnt), "--fuse-tmp-dir", str(mnt / "tmp"), ready=False)
    assert proxy.wait_exit() == 1
    proxy.wait_for(
        rf'FUSE mount failed: "{mnt}": --fuse-tmp-dir {mnt / "tmp"} must not be inside the mount',
        stream="stderr",
    )
    assert not mounted(mnt)


@needs_fuse
def test_instance_arguments_are_ignored_and_the_backend_check_sees_the_mounted_ones(
    start_proxy, emulator, fuse_dirs
):
    """As in Go, instance arguments do nothing under --fuse (a line says so); the
    --with-backend-check /startup dials the instances the mount opened."""
    from .conftest import http_get
    from .proxyproc import free_port_block

    mnt, sockets = fuse_dirs
    http = free_port_block(1)
    ghost = URI.replace("/instances/inst", "/instances/ghost")  # unknown to the emulator
    proxy = start_proxy(
        ghost, "--fuse", str(mnt), "--fuse-tmp-dir", str(sockets), "--health-check",
        "--with-backend-check", "--http-port", str(http), "--http-address", "127.0.0.1",
    )  # fmt: skip
    proxy.wait_for("Ignoring the instance arguments: with --fuse, instances are opened by name")
    os.stat(mnt / NAME)
    assert http_get(f"http://127.0.0.1:{http}/startup") == (200, "ok")
    assert "ghost" not in "\n".join(
        line for line in proxy.output.splitlines() if "Listening" in line
    )
