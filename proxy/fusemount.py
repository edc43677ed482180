"""``--fuse DIR``: a directory in which an instance's name opens its socket.

Theory of operation, as in the Go proxy (go-fuse there, libfuse through the
``mfusepy`` binding here, an optional extra imported only with ``--fuse``):
DIR is a FUSE mount holding a read-only ``README``. Looking up
``DIR/project.region.cluster.instance`` (``_`` in the project stands for the
``:`` of a domain-scoped one) asks the Admin API for the instance once; if it
answers, a unix socket listener opens at ``TMP/<name>/.s.PGSQL.5432`` under
``--fuse-tmp-dir`` and the lookup answers with the symlink ``DIR/<name>`` ->
``TMP/<name>``, so ``psql "host=DIR/<name>"`` reaches it. Any later lookup
of the name answers the same symlink. A name that does not parse, or whose
instance the Admin API does not give, answers ENOENT and logs
``could not create socket for "<name>": <why>``.

libfuse runs its own loop on a thread of ours; a lookup that needs a
listener hands the work to the event loop and waits for it (one lookup at a
time, as the Go proxy holds one lock). libfuse installs signal handlers only
where none is installed, and the proxy has its own for SIGINT, SIGTERM and
SIGHUP before the mount, so shutdown stays the proxy's. Unmounting is done
with ``fusermount -u`` (lazily if the mount is busy) on every way out; a
mount left by a killed proxy is reported at the next start with the command
that removes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from proxy import unixlisten
from proxy.config import UNIX_SOCKET_NAME, InstanceConfig, InstanceURI, UnixMount
from proxy.errors import StartupError
from proxy.log import Logger

README = """\
When applications attempt to open files in this directory, a remote connection
to the AlloyDB instance of the same name is opened. For example:

    psql "host=<this directory>/my-project.us-central1.my-cluster.my-instance user=... dbname=..."

The name is project.region.cluster.instance; write a domain-scoped project
(example.com:my-project) as example.com_my-project. Only instances that were
looked up appear in a listing of this directory.
"""

EXTRA_HINT = "install the extra: pip install 'alloydb-auth-proxy[fuse]'"
#: How long a lookup may wait for the Admin API and the listener.
LOOKUP_TIMEOUT = 30.0
#: Names remembered (per-name locks, names reported as malformed) before forgetting.
MAX_NAMES = 1000
#: How long the mount may take to answer its first request.
MOUNT_TIMEOUT = 10.0


def unsupported_reason() -> str | None:
    """Why ``--fuse`` cannot work here (the text after "--fuse is not supported: "), or None."""
    if sys.platform not in ("linux", "darwin"):
        return f"FUSE is not supported on {sys.platform}"
    if fusermount() is None:
        return "fusermount binary not found in PATH or /bin"
    if sys.platform == "linux" and not os.path.exists("/dev/fuse"):
        return (
            "/dev/fuse does not exist (a container needs the device and the SYS_ADMIN capability)"
        )
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        return f"the FUSE binding (mfusepy) is not installed: {EXTRA_HINT}"
    except OSError as exc:  # the binding found no libfuse
        return f"{exc}: install libfuse (Debian: apt-get install fuse3 libfuse2)"
    return None


def fusermount() -> str | None:
    for name in ("fusermount3", "fusermount"):
        found = shutil.which(name) or shutil.which(name, path="/bin")
        if found:
            return found
    return None


def parse_name(name: str) -> InstanceURI:
    """``project.region.cluster.instance`` as an InstanceURI, or ValueError."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or not all(parts) or name.startswith("."):
        raise ValueError(
            f'invalid instance name "{name}", expected project.region.cluster.instance'
        )
    project, region, cluster, instance = parts
    return InstanceURI(project.replace("_", ":"), region, cluster, instance)


def default_tmp_dir() -> str:
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", "alloydb-tmp")


def check_mount_point(directory: str) -> None:
    """StartupError unless ``directory`` is a directory that can be mounted on."""
    try:
        info = os.stat(directory)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.ENOTCONN:
            raise StartupError(
                f"unable to start: stat {directory}: {reason}: a FUSE mount left behind by a "
                f"proxy that did not exit cleanly; remove it with: fusermount -u {directory}"
            ) from None
        raise StartupError(f"unable to start: stat {directory}: {reason}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f'FUSE mount failed: "{directory}": not a directory')


def prepare_tmp_dir(directory: str) -> None:
    """Create ``--fuse-tmp-dir`` (and its parents) or check that it is safe to use."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(directory)), 0o777, exist_ok=True)
        unixlisten.prepare_directory(directory)
    except unixlisten.UnsafeDirectory as exc:
        raise StartupError(f"unable to start: unsafe --fuse-tmp-dir: {exc}") from None
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise StartupError(f"unable to start: mkdir {directory}: {reason}") from None


class FuseMount:
    """The mount: ``start`` (blocking until it serves, or StartupError), ``stop``."""

    def __init__(
        self,
        directory: str,
        tmp_dir: str,
        open_socket: Callable[[InstanceConfig, UnixMount], Coroutine[Any, Any, None]],
        loop: asyncio.AbstractEventLoop,
        log: Logger,
    ) -> None:
        self.directory = directory
        self.tmp_dir = tmp_dir
        self._open_socket = open_socket  # a coroutine function, run on ``loop``
        self._loop = loop
        self._log = log
        self._lock = threading.Lock()
        self._active: dict[str, str] = {}  # name -> symlink target
        self._creating: dict[str, threading.Lock] = {}  # name -> held while it is opened
        self._malformed: set[str] = set()  # names already reported as not an instance
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._error: BaseException | None = None

    # ---- life cycle (called from the event loop's thread) -------------------

    def start(self) -> None:
        check_mount_point(self.directory)
        mount_point = os.path.realpath(self.directory)
        tmp = os.path.realpath(self.tmp_dir)
        if tmp == mount_point or tmp.startswith(mount_point + os.sep):
            # Its sockets would be looked up through the mount that creates them.
            raise StartupError(
                f'FUSE mount failed: "{self.directory}": --fuse-tmp-dir {self.tmp_dir} '
                "must not be inside the mount"
            )
        prepare_tmp_dir(self.tmp_dir)
        self._thread = threading.Thread(target=self._run, name="fuse", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not self._serving.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                why: object = self._error
                if why is None or isinstance(why, RuntimeError):  # fuse_main's bare status
                    why = "libfuse did not mount it (its own message is above)"
                raise StartupError(f'FUSE mount failed: "{self.directory}": {why}')

    def stop(self) -> str | None:
        """Unmount (every way out comes here); an error text if it could not."""
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        problem = None
        wait = 10.0
        if thread.is_alive():
            command = fusermount() or "fusermount"
            for flags in ("-u", "-uz"):  # -z: detach now even if something is inside
                try:
                    done = subprocess.run(
                        [command, flags, self.directory],
                        capture_output=True,
                        text=True,
                        check=False,
                        timeout=10,
                    )
                except (subprocess.TimeoutExpired, OSError) as exc:
                    problem = f"{command} {flags}: {exc}"
                    wait = 0.5
                    continue
                if done.returncode == 0:
                    problem = None
                    break
                problem = done.stderr.strip() or f"{command} {flags} exited {done.returncode}"
                # Detached lazily, libfuse serves on until the last user lets go:
                # its daemon thread is not waited for.
                wait = 0.5
            thread.join(wait)
        return problem

    def _run(self) -> None:
        try:
            import mfusepy

            operations = _operations(mfusepy, self)
            options: dict[str, Any] = {"foreground": True, "fsname": "alloydb-auth-proxy"}
            if mfusepy.fuse_version_major == 2:
                # As go-fuse: files already in the directory are hidden, not refused.
                options["nonempty"] = True
            if os.geteuid() == 0 or _user_allow_other():
                options["allow_other"] = True  # as the Go proxy: other users may look up
            mfusepy.FUSE(operations, self.directory, **options)
        except BaseException as exc:  # reported by start(), or by nobody after stop()
            self._error = exc

    # ---- what the file system answers (called on libfuse's threads) ----------

    def ready(self) -> None:
        self._serving.set()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._active)

    def target(self, name: str) -> str:
        """The symlink target for ``name``, opening its socket on first use; OSError(ENOENT).

        Only lookups of the same name wait for each other (a lock per name
        that could be an instance, kept): a slow Admin API answer for one
        instance does not hold the names that already work.
        """
        with self._lock:
            found = self._active.get(name)
            if found is not None:
                return found
        try:
            uri = parse_name(name)
        except ValueError as exc:
            self._report(name, exc)
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT)) from None
        with self._lock:
            if len(self._creating) > MAX_NAMES:  # looked-up names nobody serves: forget
                self._creating = {
                    n: lock
                    for n, lock in self._creating.items()
                    if n in self._active or lock.locked()
                }
            creating = self._creating.setdefault(name, threading.Lock())
        with creating:
            with self._lock:
                found = self._active.get(name)
            if found is not None:
                return found
            try:
                directory = self._open(name, uri)
            except Exception as exc:
                self._report(name, exc)
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT)) from None
            with self._lock:
                self._active[name] = directory
            return directory

    def _open(self, name: str, uri: InstanceURI) -> str:
        directory = os.path.join(self.tmp_dir, name)
        mount = UnixMount(directory, os.path.join(directory, UNIX_SOCKET_NAME))
        future = asyncio.run_coroutine_threadsafe(
            self._open_socket(InstanceConfig(uri=uri), mount), self._loop
        )
        try:
            future.result(LOOKUP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {LOOKUP_TIMEOUT:g}s") from None
        return directory

    def _report(self, name: str, exc: Exception) -> None:
        reason = str(exc).removeprefix("unable to start: ") or type(exc).__name__
        if isinstance(exc, ValueError):
            # Shells, editors and git probe names such as .git or HEAD again
            # and again: a name that cannot be an instance is logged once.
            with self._lock:
                if name in self._malformed:
                    return
                if len(self._malformed) < MAX_NAMES:
                    self._malformed.add(name)
        self._log.error('could not create socket for "%s": %s', name, reason)


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as fh:
            return any(line.strip() == "user_allow_other" for line in fh)
    except OSError:
        return False


def _operations(mfusepy: Any, mount: FuseMount) -> Any:
    """The file system, as mfusepy's Operations (built here: mfusepy is imported late)."""
    started = time.time_ns()
    readme = README.encode()
    uid, gid = os.getuid(), os.getgid()

    def attrs(mode: int, size: int = 0, links: int = 1) -> dict[str, int]:
        return {
            "st_mode": mode, "st_nlink": links, "st_size": size, "st_uid": uid, "st_gid": gid,
            "st_atime": started, "st_mtime": started, "st_ctime": started,
        }  # fmt: skip

    class Instances(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def init(self, _path: str) -> None:
            mount.ready()

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            if path == "/":
                return attrs(stat.S_IFDIR | 0o555, links=2)
            if path == "/README":
                return attrs(stat.S_IFREG | 0o444, size=len(readme))
            name = path[1:]
            if "/" in name:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            target = mount.target(name)
            return attrs(stat.S_IFLNK | 0o777, size=len(target))

        def readlink(self, path: str) -> str:
            return mount.target(path[1:])

        def readdir(self, path: str, fh: int) -> list[str]:
            if path != "/":
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            return [".", "..", "README", *mount.names()]

        def open(self, path: str, flags: int) -> int:
            if path != "/README":
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return readme[offset : offset + size]

    return Instances()
