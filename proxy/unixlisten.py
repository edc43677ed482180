"""Unix socket listeners that another local user cannot take over.

The Go proxy creates the socket directory with ``os.Mkdir(dir, 0777)``, which
the umask reduces (typically to 0755), and makes only the socket file 0777.
We do the same, and refuse an existing directory that another user could
write to: there they could unlink our socket, bind their own in its place and
collect the passwords clients send.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat


class UnsafeDirectory(OSError):
    """An existing socket directory that others could write to (message says why and how to fix)."""


def prepare_directory(directory: str) -> None:
    """Create ``directory`` (0777 less the umask) or check that an existing one is safe.

    Safe: a real directory (not a symlink), owned by us or by root, and
    neither it nor any directory above it writable by other users (a
    writable parent lets them rename ours away and put theirs in its place).
    Writable by our own group, or sticky like /tmp, is fine.

    Raises:
        FileNotFoundError: the parent does not exist (``filename`` names it).
        UnsafeDirectory: the directory or one above it is not safe.
    """
    parent = os.path.dirname(directory) or "."
    os.stat(parent)
    try:
        os.mkdir(directory, 0o777)
    except FileExistsError:
        info = os.lstat(directory)
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeDirectory(
                f"{directory} is a symbolic link; remove it or point the proxy at the real "
                f"directory"
            ) from None
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafeDirectory(f"{directory} exists and is not a directory") from None
        if info.st_uid not in (os.geteuid(), 0):
            raise UnsafeDirectory(
                f"{directory} belongs to another user (uid {info.st_uid}); remove it, or use "
                f"a directory of your own"
            ) from None
    for path in [directory, *_ancestors(os.path.realpath(parent))]:
        problem = _others_can_write(os.stat(path))
        if problem:
            raise UnsafeDirectory(
                f"{path} is {problem}, who could replace the socket; "
                f"run chmod o-w,g-w {path}, or use another directory"
            )


def _ancestors(path: str) -> list[str]:
    out = [path]
    while (up := os.path.dirname(path)) != path:
        out.append(up)
        path = up
    return out


def _others_can_write(info: os.stat_result) -> str:
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_ISVTX:
        return ""  # sticky: others cannot remove or rename what is ours
    if mode & 0o002:
        return f"writable by other users (mode {mode:04o})"
    if mode & 0o020 and info.st_gid != os.getegid() and info.st_gid not in os.getgroups():
        return f"writable by group {info.st_gid} (mode {mode:04o})"
    return ""


def bind(path: str) -> socket.socket:
    """A listening unix socket at ``path``; a stale socket file of ours is replaced.

    After a ``kill -9`` the old file stays behind. If nothing answers on it and
    it is a socket we own, it is removed; a live socket, or a file of another
    kind or owner, keeps the bind error (EADDRINUSE) as the Go proxy reports it.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not _stale_socket_of_ours(path):
                raise
            os.unlink(path)
            sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    with contextlib.suppress(OSError):
        os.chmod(path, 0o777)  # best effort, as the Go proxy does
    return sock


def _stale_socket_of_ours(path: str) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True  # nobody listens: left behind by a process that died
    except OSError:
        return False
    finally:
        probe.close()
    return False
