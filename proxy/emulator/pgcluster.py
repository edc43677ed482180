"""A throwaway real PostgreSQL for tests, the demo and users' CI.

``initdb`` into a temporary directory, a free TCP port on 127.0.0.1 and a
private unix-socket directory. PostgreSQL refuses to run as root, so when we
are root the server runs as the ``postgres`` user (``runuser``) and its
directory is handed to that user.

Authentication mirrors what AlloyDB does for the emulator's purposes:
database-native users log in with SCRAM; IAM users are members of the group
role ``alloydb_iam_users``, which a pg_hba ``trust`` line lets in without a
password, because the emulator has already checked their OAuth2 token.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

IAM_GROUP = "alloydb_iam_users"

_HBA = f"""\
local all all trust
host all +{IAM_GROUP} 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


def _find_bindir() -> str:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class PostgresCluster:
    """One PostgreSQL server; ``start()``/``stop()`` or use it as a context manager."""

    superuser = "postgres"

    def __init__(self, *, bindir: str | None = None, max_connections: int = 300) -> None:
        self.bindir = bindir or _find_bindir()
        self.max_connections = max_connections
        self.host = "127.0.0.1"
        self.port = 0
        self.socket_dir = ""
        self._tmp = ""
        self._running = False

    def _as_server_user(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self._as_server_user(), *args], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{os.path.basename(args[0])} failed: {result.stderr or result.stdout}"
            )

    def start(self) -> PostgresCluster:
        self._tmp = tempfile.mkdtemp(prefix="alloydb-emulator-pg-")
        data = os.path.join(self._tmp, "data")
        self.socket_dir = os.path.join(self._tmp, "sock")
        os.mkdir(self.socket_dir)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self._tmp, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        try:
            self._run(
                os.path.join(self.bindir, "initdb"),
                "-D",
                data,
                "-U",
                self.superuser,
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            )
            with open(os.path.join(data, "pg_hba.conf"), "w", encoding="utf-8") as fh:
                fh.write(_HBA)
            for _ in range(5):
                self.port = _free_port()
                options = (
                    f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
                    f"-c max_connections={self.max_connections} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off"
                )
                try:
                    self._run(
                        os.path.join(self.bindir, "pg_ctl"),
                        "-D",
                        data,
                        "-o",
                        options,
                        "-l",
                        os.path.join(self._tmp, "server.log"),
                        "-w",
                        "-t",
                        "60",
                        "start",
                    )
                    break
                except RuntimeError:
                    if not self._port_race(data):
                        raise
            else:
                raise RuntimeError("could not find a free port for PostgreSQL")
            self._running = True
            self._wait_ready()
            self.psql(f"CREATE ROLE {IAM_GROUP} NOLOGIN")
        except BaseException:
            self.stop()
            raise
        return self

    def _port_race(self, data: str) -> bool:
        log = os.path.join(self._tmp, "server.log")
        try:
            with open(log, encoding="utf-8", errors="replace") as fh:
                return "could not bind" in fh.read()
        except OSError:
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            result = subprocess.run(
                [
                    os.path.join(self.bindir, "pg_isready"),
                    "-h",
                    self.socket_dir,
                    "-p",
                    str(self.port),
                ],
                capture_output=True,
                check=False,
            )
            if result.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("PostgreSQL did not become ready")

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; returns unaligned output."""
        result = subprocess.run(
            [
                "psql",
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.socket_dir,
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def create_user(self, name: str, password: str) -> None:
        """A database-native user that logs in with SCRAM-SHA-256."""
        self.psql(
            "SET password_encryption = 'scram-sha-256'; "
            f"CREATE ROLE {_quote_ident(name)} LOGIN PASSWORD {_quote_literal(password)}"
        )

    def create_iam_user(self, name: str) -> None:
        """An IAM database user (e.g. ``sa@project.iam``), trusted once the emulator vouches."""
        self.psql(f"CREATE ROLE {_quote_ident(name)} LOGIN IN ROLE {IAM_GROUP}")

    def create_database(self, name: str, owner: str) -> None:
        self.psql(f"CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(owner)}")

    def stop(self) -> None:
        if self._running:
            self._running = False
            subprocess.run(
                [
                    *self._as_server_user(),
                    os.path.join(self.bindir, "pg_ctl"),
                    "-D",
                    os.path.join(self._tmp, "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                capture_output=True,
                check=False,
            )
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
