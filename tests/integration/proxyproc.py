"""Run the real ``alloydb-auth-proxy`` command as a subprocess and watch its logs."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

from .. import leakcheck

READY = "The proxy has started successfully and is ready for new connections!"


def proxy_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m proxy``."""
    script = Path(sys.executable).parent / "alloydb-auth-proxy"
    if script.exists():
        return [str(script)]
    found = shutil.which("alloydb-auth-proxy")
    return [found] if found else [sys.executable, "-m", "proxy"]


def without_module(name: str) -> list[str]:
    """The CLI as it runs where the module ``name`` is not installed."""
    return [
        sys.executable,
        "-c",
        f"import sys; sys.modules[{name!r}] = None; from proxy.cli import main; main()",
    ]


#: The CLI on plain asyncio, as where uvloop is not installed.
WITHOUT_UVLOOP = without_module("uvloop")


def fd_count(pid: int) -> int:
    """How many descriptors the process ``pid`` holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


#: Ports handed out by free_port_block: below Linux's ephemeral range (32768
#: and up), which the OS gives to bind(0) and outgoing connections, and split
#: between pytest-xdist workers, so that a port probed free here cannot be
#: taken by another worker or an ephemeral bind before the test binds it.
_PORTS = range(20000, 32000)


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    size = len(_PORTS) // max(count, 1)
    start = _PORTS.start + (index % max(count, 1)) * size
    return range(start, start + size)


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """First port of ``count`` consecutive ports that are free right now (in this
    worker's share of _PORTS)."""
    ports = _port_slice()
    for _ in range(200):
        base = random.randrange(ports.start, ports.stop - count)
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


class ProxyProcess:
    """One proxy subprocess; stdout and stderr lines are collected as they come."""

    def __init__(
        self,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        cwd: str | None = None,
        command: list[str] | None = None,
    ) -> None:
        full_env = dict(os.environ)
        # Never reach Google from tests, whatever the machine has configured.
        full_env.update({"NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9"})
        full_env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        if env:
            full_env.update(env)
        self.argv = [*(prefix or []), *(command or proxy_command()), *args]
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=full_env,
            cwd=cwd,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        leakcheck.secrets_of_command(args, env)
        # The lists, not self: a recorded process must not keep its pipes open.
        out, err = self.stdout, self.stderr
        leakcheck.record(f"proxy {' '.join(args)[:200]}", lambda: "\n".join(out + err))
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.stdout + self.stderr)

    def wait_for(self, pattern: str, timeout: float = 20.0, stream: str = "any") -> str:
        """Wait for a log line matching the regex; fail with the whole log if it never comes."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                lines = {"stdout": self.stdout, "stderr": self.stderr}.get(
                    stream, self.stdout + self.stderr
                )
                for line in lines:
                    if regex.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (
                    self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)
                ):
                    raise AssertionError(
                        f"no log line matching {pattern!r} (exit={self.proc.poll()}):\n"
                        + "\n".join(self.stdout + self.stderr)
                    )
                self._cond.wait(min(left, 0.2))

    def wait_ready(self, timeout: float = 20.0) -> None:
        self.wait_for(re.escape(READY), timeout, stream="stdout")

    def wait_exit(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None and not any(r.is_alive() for r in self._readers):
                pipe.close()
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait_exit(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
