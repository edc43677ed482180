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

    Safe: a real directory (not a symlink), owned by us or by root, and not
    writable by group or others unless it is sticky (like /tmp), where
    others cannot remove or rename what is ours.

    Raises:
        FileNotFoundError: the parent does not exist (``filename`` names it).
        UnsafeDirectory: the directory exists and is not safe.
    """
    parent = os.path.dirname(directory) or "."
    os.stat(parent)
    try:
        os.mkdir(directory, 0o777)
        return
    except FileExistsError:
        pass
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeDirectory(
            f"{directory} is a symbolic link; remove it or point the proxy at the real directory"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{directory} exists and is not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise UnsafeDirectory(
            f"{directory} belongs to another user (uid {info.st_uid}); remove it, or use a "
            f"directory of your own"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise UnsafeDirectory(
            f"{directory} is writable by other users (mode {mode:04o}), who could replace the "
            f"socket; run chmod go-w {directory}"
        )


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
