"""A throwaway real PostgreSQL for tests, the demo and users' CI.

``initdb`` into a temporary directory, a free TCP port on 127.0.0.1 and a
private unix-socket directory. PostgreSQL refuses to run as root, so when we
are root the server runs as the ``postgres`` user and its
directory is handed to that user. ``stop()`` always stops the server (also
from an ``atexit`` hook if the caller forgot) and removes the directory.

``PostgresCluster.from_env()`` reuses an existing server instead when
``PGHOST`` and ``PGPORT`` are set (superuser from ``PGUSER``/``PGPASSWORD``);
that server's pg_hba.conf must then carry the IAM trust line below itself.

Authentication mirrors what AlloyDB does for the emulator's purposes:
database-native users log in with SCRAM; IAM users are members of the group
role ``alloydb_iam_users`` and have no password. The emulator connects to
PostgreSQL from 127.0.0.1 (TRUSTED_SOURCE) only for a connection whose
metadata exchange said AUTO_IAM and whose token's principal is the startup
user; a pg_hba ``trust`` line for the IAM group from that one address lets
such a login in. Every other connection comes from 127.0.0.2
(PASSWORD_SOURCE) and meets SCRAM, so an IAM user without AUTO_IAM is
refused, as on AlloyDB. A server reused through ``from_env()`` needs the
same lines in its pg_hba.conf.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

IAM_GROUP = "alloydb_iam_users"

TRUSTED_SOURCE = "127.0.0.1"
PASSWORD_SOURCE = "127.0.0.2"

# Order matters: the IAM group's trust line must come before the catch-all.
HBA = f"""\
local all all trust
host all +{IAM_GROUP} {TRUSTED_SOURCE}/32 trust
host all all 127.0.0.0/8 scram-sha-256
"""


def _find_bindir() -> str:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return os.path.dirname(os.path.realpath(found))
    raise RuntimeError("postgresql server binaries (initdb, pg_ctl) not found; install postgresql")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _clean_env() -> dict[str, str]:
    """Our own server is addressed explicitly; stray PG* settings must not leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgresCluster:
    """One PostgreSQL server; ``start()``/``stop()`` or use it as a context manager.

    Attributes once started: ``host`` (127.0.0.1), ``port``, ``socket_dir``
    (empty for a reused server) and ``superuser``.
    """

    def __init__(
        self,
        *,
        bindir: str | None = None,
        max_connections: int = 300,
        reuse_env: bool = False,
    ) -> None:
        self.bindir = bindir or ""
        self.max_connections = max_connections
        self.host = "127.0.0.1"
        self.port = 0
        self.socket_dir = ""
        self.superuser = "postgres"
        self.reused = False
        self._reuse_env = reuse_env
        self._tmp = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._running = False

    @classmethod
    def from_env(cls, **kwargs: object) -> PostgresCluster:
        """A cluster that reuses the server at ``PGHOST``/``PGPORT`` when both are set."""
        return cls(reuse_env=True, **kwargs)  # type: ignore[arg-type]

    @property
    def data_dir(self) -> str:
        return os.path.join(self._tmp, "data") if self._tmp else ""

    # ---- lifecycle ------------------------------------------------------

    def start(self) -> PostgresCluster:
        if self._running:
            return self
        if self._reuse_env and os.environ.get("PGHOST") and os.environ.get("PGPORT"):
            self._attach_existing()
            return self
        self.bindir = self.bindir or _find_bindir()
        self._tmp = tempfile.mkdtemp(prefix="alloydb-emulator-pg-")
        self.socket_dir = os.path.join(self._tmp, "sock")
        os.mkdir(self.socket_dir)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self._tmp, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        atexit.register(self.stop)
        try:
            self._run(
                os.path.join(self.bindir, "initdb"),
                "-D",
                self.data_dir,
                "-U",
                self.superuser,
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            )
            with open(os.path.join(self.data_dir, "pg_hba.conf"), "w", encoding="utf-8") as fh:
                fh.write(HBA)
            if os.geteuid() == 0:
                owner = pwd.getpwnam("postgres")
                os.chown(os.path.join(self.data_dir, "pg_hba.conf"), owner.pw_uid, owner.pw_gid)
            self._start_server()
            self.psql(f"CREATE ROLE {IAM_GROUP} NOLOGIN")
        except BaseException:
            self.stop()
            raise
        return self

    def _attach_existing(self) -> None:
        self.host = os.environ["PGHOST"]
        self.port = int(os.environ["PGPORT"])
        self.superuser = os.environ.get("PGUSER", self.superuser)
        self.reused = True
        self._running = True
        self._wait_ready()
        self.psql(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
            f"{quote_literal(IAM_GROUP)}) THEN CREATE ROLE {IAM_GROUP} NOLOGIN; END IF; END $$"
        )

    def _start_server(self) -> None:
        log_path = os.path.join(self._tmp, "server.log")
        for _ in range(5):
            self.port = _free_port()
            with open(log_path, "wb") as log:
                # The postmaster is our own child (not daemonised by pg_ctl), so we
                # hold its handle, can always kill it and reap it; a session of its
                # own keeps a terminal's Ctrl-C from reaching it before we stop it.
                self._proc = subprocess.Popen(
                    [
                        os.path.join(self.bindir, "postgres"),
                        "-D",
                        self.data_dir,
                        "-p",
                        str(self.port),
                        "-k",
                        self.socket_dir,
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        f"max_connections={self.max_connections}",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._tmp,
                    env=_clean_env(),
                    start_new_session=True,
                    **self._server_user(),
                )
            self._running = True
            if self._wait_ready():
                return
            # It exited: another process may have taken the port between probe and bind.
            if not self._log_says("could not bind"):
                raise RuntimeError(f"postgresql did not start: {self._log_tail()}")
        raise RuntimeError("could not find a free port for postgresql")

    def _log_says(self, text: str) -> bool:
        return text in self._log_tail(100_000)

    def _log_tail(self, size: int = 2000) -> str:
        try:
            with open(
                os.path.join(self._tmp, "server.log"), encoding="utf-8", errors="replace"
            ) as fh:
                return fh.read()[-size:].strip()
        except OSError:
            return ""

    def _wait_ready(self) -> bool:
        """Poll pg_isready; False if our server process exited meanwhile."""
        host = self.socket_dir or self.host
        pg_isready = os.path.join(self.bindir, "pg_isready") if self.bindir else "pg_isready"
        deadline = time.monotonic() + 60
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                return False
            result = subprocess.run(
                [pg_isready, "-q", "-h", host, "-p", str(self.port), "-t", "2"],
                capture_output=True,
                env=_clean_env() if not self.reused else None,
                check=False,
            )
            if result.returncode == 0:
                return True
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgresql at {host}:{self.port} did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (if we started it) and remove its directory; idempotent."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # Fast shutdown (SIGINT) ends the backends too; escalate if it hangs.
            for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._running = False
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- SQL helpers ----------------------------------------------------

    @staticmethod
    def _server_user() -> dict[str, Any]:
        """PostgreSQL refuses to run as root: drop to the ``postgres`` user then."""
        if os.geteuid() != 0:
            return {}
        owner = pwd.getpwnam("postgres")
        return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            check=False,
            cwd=self._tmp or None,  # a cwd the server user can read
            env=_clean_env(),
            **self._server_user(),
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{os.path.basename(args[0])} failed: {(result.stderr or result.stdout).strip()}"
            )

    def psql(self, sql: str, dbname: str = "postgres", *, user: str | None = None) -> str:
        """Run SQL (as the superuser unless ``user``); returns unaligned, tuples-only output."""
        if self.reused:
            env, host = dict(os.environ), self.host
        else:
            env, host = _clean_env(), self.socket_dir
        result = subprocess.run(
            [
                "psql",
                "-X",
                "-A",
                "-t",
                "-q",
                "-w",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                host,
                "-p",
                str(self.port),
                "-U",
                user or self.superuser,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _ensure_role(self, name: str, options: str) -> None:
        # Idempotent, so a reused server (or a second call) does not fail.
        self.psql(
            "DO $$ BEGIN "
            f"IF EXISTS (SELECT FROM pg_roles WHERE rolname = {quote_literal(name)}) THEN "
            f"ALTER ROLE {quote_ident(name)} {options}; "
            f"ELSE CREATE ROLE {quote_ident(name)} {options}; END IF; END $$"
        )

    def create_user(self, name: str, password: str) -> None:
        """A database-native user that logs in with SCRAM-SHA-256."""
        self.psql(
            "SET password_encryption = 'scram-sha-256'; " + "DO $$ BEGIN "
            f"IF EXISTS (SELECT FROM pg_roles WHERE rolname = {quote_literal(name)}) THEN "
            f"ALTER ROLE {quote_ident(name)} LOGIN PASSWORD {quote_literal(password)}; "
            f"ELSE CREATE ROLE {quote_ident(name)} LOGIN PASSWORD {quote_literal(password)}; "
            "END IF; END $$"
        )

    def create_iam_user(self, name: str) -> None:
        """An IAM database user (``sa@project.iam`` or a person's email), trusted via the group."""
        self._ensure_role(name, "LOGIN")
        self.psql(f"GRANT {IAM_GROUP} TO {quote_ident(name)}")

    def create_database(self, name: str, owner: str | None = None) -> None:
        """A database (owned by ``owner``); nothing happens if it exists."""
        if self.psql(f"SELECT 1 FROM pg_database WHERE datname = {quote_literal(name)}"):
            return
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if owner:
            sql += f" OWNER {quote_ident(owner)}"
        self.psql(sql)
