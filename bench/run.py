"""Side-by-side data-path benchmark: our proxy vs a Go baseline vs naive Python relays.

    .venv/bin/python bench/run.py [--quick] [--skip pgbench,rss,...]

Starts a throwaway PostgreSQL, the AlloyDB emulator and, as the instance side
of most paths, the Go TLS server ``baselines/tlsserver`` on four emulated
instances (one per mode: sink, source, echo, pg). Two more instances are
served by the emulator's own (Python ``ssl``) server: ``emu-echo`` in front of
an echo backend and ``emu-pg`` in front of PostgreSQL, for the rows marked
"emulator's server". Then it runs five relays at once, each with one listener
per instance:

    ours            .venv/bin/alloydb-auth-proxy (the Cython splice core)
    portable        the same command on the portable data plane (proxy/portable.py,
                    what the pure-Python wheel runs)
    go              baselines/goproxy: the Go proxy's data path (crypto/tls, 8 KiB copy loop)
    naive-asyncio   baselines/naive_relay.py under asyncio + ssl
    naive-uvloop    the same under uvloop

and measures them in alternating rounds (the path order rotates every round).
"direct" (no relay, straight to PostgreSQL) is measured for pgbench and
connect latency only. Results: ``bench/results/latest.{json,md,png}``.
Every process this script starts is stopped by PID at the end, also on errors
and Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from proxy.emulator import Emulator, PostgresCluster  # noqa: E402
from proxy.emulator.echo import echo_backend  # noqa: E402

T = TypeVar("T")
# What the command imports on its main thread before the ready line.
STARTUP_IMPORTS = "import proxy.cli, proxy.keys, proxy.eventloop, proxy.rlimits, proxy.supervisor"
READY_LINE = "The proxy has started successfully and is ready for new connections!"
VENV_BIN = os.path.dirname(sys.executable)
OUR_PROXY = os.path.join(VENV_BIN, "alloydb-auth-proxy")
PYTHON = sys.executable
BUILD_DIR = os.path.join(BENCH, ".build")
RESULTS = os.path.join(BENCH, "results")
CLUSTER = "projects/bench/locations/r/clusters/c"
GO_MODES = ("sink", "source", "echo", "pg")  # served by baselines/tlsserver
EMU_MODES = ("emu-echo", "emu-pg")  # served by the emulator's own server
MODES = GO_MODES + EMU_MODES
PARALLEL = (1, 2, 4, 8)  # streams at once in the parallel-throughput rows
# What a client of emu-echo sends first: the emulator's server reads one
# StartupMessage before it opens the backend, and the echo backend returns it.
_PARAMS = b"user\0bench\0database\0bench\0\0"
HELLO = struct.pack(">II", 8 + len(_PARAMS), 196608) + _PARAMS
DB_USER, DB_PASSWORD, DB_NAME = "bench", "bench-password", "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

RELAYS = ("ours", "portable", "go", "naive-asyncio", "naive-uvloop")
PATHS = ("direct",) + RELAYS
PORT_BASE = {"ours": 0, "go": 10, "naive-asyncio": 20, "naive-uvloop": 30, "portable": 40}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- processes


class Procs:
    """Every child we start, so all of them can be stopped by PID."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        ready: str | None = None,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen[bytes], float]:
        """Start ``argv``; if ``ready`` is given, wait for that stdout line.

        Returns the process and the seconds from spawn to the ready line.
        stdout/stderr go to ``logdir/name.log`` (a thread drains stdout).
        """
        logf = open(os.path.join(self.logdir, f"{name}.log"), "ab")  # noqa: SIM115
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=logf,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop them
        )
        self.procs.append((name, proc))
        seen = threading.Event()
        when = [0.0]

        def drain() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if not seen.is_set() and ready and ready in line.decode(errors="replace"):
                    when[0] = time.perf_counter()
                    seen.set()
                logf.write(line)
                logf.flush()
            logf.close()

        threading.Thread(target=drain, daemon=True).start()
        if ready is None:
            return proc, 0.0
        deadline = time.monotonic() + timeout
        while not seen.wait(0.005):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} did not become ready (exit {proc.poll()}); see {logf.name}"
                )
        return proc, when[0] - t0

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants (the relays are single processes, but be general)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads) and its descendants."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_kib(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


# ---------------------------------------------------------------- set-up


def go_build() -> dict[str, str]:
    if shutil.which("go") is None:
        raise SystemExit(
            "go not found: apt-get update && apt-get install -y golang-go (Debian's Go 1.19)"
        )
    os.makedirs(BUILD_DIR, exist_ok=True)
    out = {}
    for name in ("goproxy", "tlsserver"):
        binary = os.path.join(BUILD_DIR, name)
        subprocess.run(
            ["go", "build", "-o", binary, "."],
            cwd=os.path.join(BENCH, "baselines", name),
            check=True,
            env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-trimpath"},
        )
        out[name] = binary
    return out


def in_child(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a forked child process, for clients of the emulator's server:
    that server runs on threads of this process, and a client here would share
    their GIL, which would blur the very latency being measured."""
    import multiprocessing

    # The worker gets SIGTERM's default back: this process's handler raises
    # KeyboardInterrupt, and the pool ends its worker with SIGTERM.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
        return pool.apply(fn, args)


def write(path: str, data: str | bytes) -> str:
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return path


def client_certificate(admin_url: str, tmp: str) -> tuple[str, str, str]:
    """Ask the emulator's Admin API for a client cert, like the proxy does."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = json.dumps(
        {"publicKey": pub.decode(), "certDuration": "3600s", "useMetadataExchange": True}
    ).encode()
    req = urllib.request.Request(
        f"{admin_url}/v1beta/{CLUSTER}:generateClientCertificate",
        data=body,
        headers={"Authorization": "Bearer x", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.load(resp)
    chain = answer["pemCertificateChain"]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return (
        write(
            os.path.join(tmp, "client-chain.pem"), "".join(c.rstrip("\n") + "\n" for c in chain[:2])
        ),
        write(os.path.join(tmp, "client-key.pem"), key_pem),
        write(os.path.join(tmp, "client-ca.pem"), answer["caCert"]),
    )


def free_port_block(n: int = 40) -> int:
    """A base port with ``n`` free ports after it (best effort)."""
    for base in range(16000, 60000, 100):
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


# ---------------------------------------------------------------- clients


def connect(port: int, timeout: float = 60.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int, buf: bytearray | None = None) -> None:
    view = memoryview(buf if buf is not None and len(buf) >= n else bytearray(n))
    got = 0
    while got < n:
        k = s.recv_into(view[: n - got] if n - got < len(view) else view)
        if k == 0:
            raise ConnectionError(f"EOF after {got} of {n} bytes")
        got += k


def _open_tunnel(port: int, mode: str) -> socket.socket:
    """A connection through the relay with its tunnel proven (TLS, metadata exchange)."""
    s = connect(port)
    if mode == "sink":
        s.sendall(struct.pack(">Q", 1) + b"x")
        recv_exact(s, 8)
    else:
        s.sendall(struct.pack(">Q", 1))
        recv_exact(s, 1)
    return s


def _push(s: socket.socket, nbytes: int) -> None:
    block = memoryview(bytes(range(256)) * 4096)  # 1 MiB
    s.sendall(struct.pack(">Q", nbytes))
    left = nbytes
    while left:
        chunk = block if left >= len(block) else block[:left]
        s.sendall(chunk)
        left -= len(chunk)
    recv_exact(s, 8)  # the sink's count: every byte arrived


def _pull(s: socket.socket, nbytes: int) -> None:
    view = memoryview(bytearray(1 << 20))
    s.sendall(struct.pack(">Q", nbytes))
    got = 0
    while got < nbytes:
        k = s.recv_into(view)
        if k == 0:
            raise ConnectionError(f"EOF after {got} of {nbytes} bytes")
        got += k


def transfer(port: int, mode: str, nbytes: int, pid: int, streams: int = 1) -> tuple[float, float]:
    """nbytes in all through `streams` connections at once, client -> server
    (mode "sink") or server -> client ("source"); (seconds, relay CPU-s).

    One client thread per stream: sendall and recv_into run without the GIL.
    """
    socks = [_open_tunnel(port, mode) for _ in range(streams)]
    errors: list[BaseException] = []

    def work(s: socket.socket) -> None:
        try:
            (_push if mode == "sink" else _pull)(s, nbytes // streams)
        except BaseException as exc:  # reported below, on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in socks]
    try:
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        secs, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    finally:
        for s in socks:
            s.close()
    if errors:
        raise errors[0]
    return secs, cpu


def upload(port: int, nbytes: int, pid: int) -> tuple[float, float]:
    return transfer(port, "sink", nbytes, pid)


def download(port: int, nbytes: int, pid: int) -> tuple[float, float]:
    return transfer(port, "source", nbytes, pid)


def ping(port: int, count: int, hello: bytes = b"") -> float:
    """Median round trip (µs) of a 100-byte message through an echo instance
    (``hello`` first, echoed back: see HELLO)."""
    msg = b"p" * 100
    buf = bytearray(100)
    samples = []
    with connect(port) as s:
        if hello:
            s.sendall(hello)
            recv_exact(s, len(hello))
        for _ in range(200):  # warm-up
            s.sendall(msg)
            recv_exact(s, 100, buf)
        for _ in range(count):
            t0 = time.perf_counter_ns()
            s.sendall(msg)
            recv_exact(s, 100, buf)
            samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000.0


def pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=DB_PASSWORD, PGSSLMODE="disable", PGCONNECT_TIMEOUT="30")
    return env


def pgbench(port: int, seconds: int, pid: int | None) -> dict[str, float]:
    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    res = subprocess.run(
        ["pgbench", "-n", "-S", "-c", "8", "-j", "2", "-T", str(seconds),
         "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME],
        capture_output=True, text=True, env=pg_env(), check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"pgbench failed: {res.stderr.strip()[-500:]}")
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", res.stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", res.stdout)
    out = {"tps": float(tps.group(1)) if tps else float("nan")}
    if lat:
        out["latency_ms"] = float(lat.group(1))
    if pid:
        out["relay_cores_busy"] = (cpu_seconds(pid) - cpu0) / wall
    return out


def connect_to_first_query(port: int, count: int) -> float:
    """Median ms from connect() to the first query's result (psycopg, password auth)."""
    import psycopg

    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        with psycopg.connect(
            host="127.0.0.1", port=port, user=DB_USER, password=DB_PASSWORD,
            dbname=DB_NAME, sslmode="disable", connect_timeout=30,
        ) as conn:  # fmt: skip
            conn.execute("SELECT 1").fetchone()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000.0


def idle_rss(
    port: int, pid: int, n: int, hello: bytes = b"", held: list[socket.socket] | None = None
) -> dict[str, float]:
    """Open n idle tunnels (each proven by a 1-byte echo); delta RSS per connection.

    With ``held``, the tunnels stay open and are appended there: the caller
    closes them after the next measurement, which then cannot reuse the
    memory these freed (the relay's allocator keeps it, and RSS would not
    grow for the next n at all)."""
    time.sleep(1.0)
    before = rss_kib(pid)
    socks: list[socket.socket] = []
    try:
        batch = 100
        for start in range(0, n, batch):
            group = [connect(port) for _ in range(min(batch, n - start))]
            socks.extend(group)
            for s in group:
                s.sendall(hello + b"i")
            for s in group:
                recv_exact(s, len(hello) + 1)
        time.sleep(1.0)
        after = rss_kib(pid)
    finally:
        if held is None:
            for s in socks:
                s.close()
            time.sleep(2.0)  # let the relay tear them down before the next path
        else:
            held.extend(socks)
    return {
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_conn": (after - before) / n,
    }


def concurrent_connections(port: int, pid: int, n: int) -> dict[str, float]:
    """Hold n tunnels open at once, each proven by a 1-byte echo; how many worked."""
    socks: list[socket.socket] = []
    ok = 0
    rss_peak = 0
    errors: collections.Counter[str] = collections.Counter()
    try:
        batch = 200
        for start in range(0, n, batch):
            group = []
            for _ in range(min(batch, n - start)):
                try:
                    group.append(connect(port, timeout=30))
                except OSError as exc:
                    errors[f"connect: {exc}"] += 1
            socks.extend(group)
            for s in group:
                try:
                    s.sendall(b"c")
                    recv_exact(s, 1)
                    ok += 1
                except OSError as exc:
                    errors[f"echo: {exc}"] += 1
        rss_peak = rss_kib(pid)
        # All still open: one more echo on every connection.
        alive = 0
        for s in socks:
            try:
                s.sendall(b"d")
                recv_exact(s, 1)
                alive += 1
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    time.sleep(3.0)  # let the relay tear them down before the next path
    for text, count in errors.most_common(5):
        log(f"  {count} × {text}")
    return {"ok": float(min(ok, alive)), "rss_mib": rss_peak / 1024}


def copy_through(
    path: str, port: int | None, relay: int | None, mb: int, inprocess: dict[str, str] | None = None
) -> dict[str, float]:
    """``COPY FROM STDIN`` of ``mb`` MB by bench/copy_client.py; CPU of client and relay."""
    argv = [PYTHON, os.path.join(BENCH, "copy_client.py"), "--mb", str(mb), "--user", DB_USER,
            "--password", DB_PASSWORD, "--dbname", DB_NAME]  # fmt: skip
    if inprocess:
        argv += ["--inprocess", inprocess["uri"], "--admin-url", inprocess["admin_url"],
                 "--token", "bench-token"]  # fmt: skip
        if port:
            argv += ["--inprocess-port", str(port)]
    else:
        argv += ["--port", str(port)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"copy client for {path} did not start (exit {proc.wait()})")
        relay0 = cpu_seconds(relay) if relay else 0.0
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != "done":
            raise RuntimeError(f"copy client for {path} failed (exit {proc.wait()})")
        relay_cpu = cpu_seconds(relay) - relay0 if relay else 0.0
        result = json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()
        if proc.wait(60) != 0:
            raise RuntimeError(f"copy client for {path} exited {proc.returncode}")
    gb = result["bytes"] / 1e9
    proxy_cpu = result["other_threads_cpu_s"] if inprocess else relay_cpu
    return {
        "copy_mbps": result["bytes"] / result["seconds"] / 1e6,
        "copy_total_cpu_s_per_gb": (result["process_cpu_s"] + relay_cpu) / gb,
        "copy_proxy_cpu_s_per_gb": proxy_cpu / gb,
        "copy_host_thread_cpu_s_per_gb": result["main_thread_cpu_s"] / gb,
        "copy_host_thread_busy": result["main_thread_cpu_s"] / result["seconds"],
    }


# ---------------------------------------------------------------- report

# metric key -> (label, unit, better: "higher"/"lower", target text, check(ours, go) -> bool|None)
Check = Callable[[float, float], "bool | None"]
METRICS: list[tuple[str, str, str, str, str, Check | None]] = [
    (
        "upload_mbps",
        "throughput client→server",
        "MB/s",
        "higher",
        "≥ 1.5× Go",
        lambda o, g: o >= 1.5 * g,
    ),
    (
        "download_mbps",
        "throughput server→client",
        "MB/s",
        "higher",
        "≥ 1.5× Go",
        lambda o, g: o >= 1.5 * g,
    ),
    (
        "cpu_s_per_gb",
        "relay CPU-s per GB (both directions)",
        "s/GB",
        "lower",
        "≤ 0.75 and ≤ 0.65× Go",
        lambda o, g: o <= 0.75 and o <= 0.65 * g,
    ),
    ("upload_cpu_s_per_gb", "  … client→server only", "s/GB", "lower", "", None),
    ("download_cpu_s_per_gb", "  … server→client only", "s/GB", "lower", "", None),
]
for _p in PARALLEL:
    for _key, _way in (("up", "client→server"), ("down", "server→client")):
        METRICS += [
            (f"{_key}_p{_p}_mbps", f"{_p} parallel streams {_way}, in all", "MB/s", "higher",
             "≥ 1.5× Go", lambda o, g: o >= 1.5 * g),
            (f"{_key}_p{_p}_cores", "  … relay cores busy", "cores", "",
             "> 1.0" if _p > 1 else "", (lambda o, g: o > 1.0) if _p > 1 else None),
        ]  # fmt: skip
METRICS += [
    ("p4_cpu_s_per_gb", "relay CPU-s per GB at 4 streams (both directions)", "s/GB", "lower",
     "≤ 0.65× Go", lambda o, g: o <= 0.65 * g),
    ("ping_us", "100-byte ping RTT (median)", "µs", "lower", "≤ 0.85× Go",
     lambda o, g: o <= 0.85 * g),
    ("emu_ping_us", "  … against the emulator's server", "µs", "lower", "≤ 0.85× Go",
     lambda o, g: o <= 0.85 * g),
    ("pgbench_tps", "pgbench -S, 8 clients", "TPS", "higher", "≥ 1.2× Go",
     lambda o, g: o >= 1.2 * g),
    ("pgbench_latency_ms", "  … mean latency", "ms", "lower", "", None),
    ("pgbench_relay_cores", "  … relay cores busy", "cores", "lower", "", None),
    ("connect_ms", "new connection → first query (warm cert)", "ms", "lower", "≤ 0.8× Go",
     lambda o, g: o <= 0.8 * g),
    ("emu_connect_ms", "  … against the emulator's server", "ms", "lower", "≤ 0.8× Go",
     lambda o, g: o <= 0.8 * g),
    ("rss_kib_per_conn", "RSS per idle connection (N idle)", "KiB", "lower", "≤ 24 KiB",
     lambda o, g: o <= 24),
    ("emu_rss_kib_per_conn", "  … against the emulator's server", "KiB", "lower", "≤ 24 KiB",
     lambda o, g: o <= 24),
    ("start_to_ready_ms", "process start → ready (median)", "ms", "lower", "≤ 150 ms",
     lambda o, g: o <= 150),
    ("concurrent_ok", "N concurrent connections: working", "conns", "higher", "all N work",
     None),
    ("concurrent_rss_mib", "  … relay RSS with N open", "MiB", "lower", "", None),
]  # fmt: skip


# Start-up is not comparable (the Go baseline reads files, ours resolves credentials and
# opens listeners in Python), so no ratio is shown for it.
RATIO_KEYS = {m[0] for m in METRICS} - {"start_to_ready_ms", "concurrent_ok"}
RATIO_KEYS -= {k for k in RATIO_KEYS if k.endswith("_cores")}
# Targets that do not depend on the Go number.
ABSOLUTE_KEYS = {"rss_kib_per_conn", "emu_rss_kib_per_conn", "start_to_ready_ms"}
ABSOLUTE_KEYS |= {m[0] for m in METRICS if m[0].endswith("_cores") and m[5] is not None}


COPY_PATHS = ("direct", "inprocess", "inprocess-tcp", "ours", "go")
COPY_METRICS: list[tuple[str, str, str]] = [
    ("copy_mbps", "COPY FROM STDIN through psycopg", "MB/s"),
    ("copy_total_cpu_s_per_gb", "CPU-s per GB, client + proxy (all threads)", "s/GB"),
    ("copy_proxy_cpu_s_per_gb", "  … the proxy's share (relay process / proxy threads)", "s/GB"),
    ("copy_host_thread_cpu_s_per_gb", "  … the host program's Python thread", "s/GB"),
    ("copy_host_thread_busy", "host Python thread busy during the COPY", "cores"),
]


def copy_markdown(summary: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    head = ["metric", "unit", *COPY_PATHS, "in-process / CLI", "in-process / Go"]
    lines = [
        f"COPY of {meta['copy_mb']} MB into an unlogged table, {meta['rounds']} alternating "
        "rounds (medians):",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(COPY_PATHS) + 2)) + " |",
    ]
    for key, label, unit in COPY_METRICS:
        values = {p: summary.get(p, {}).get(key) for p in COPY_PATHS}
        if all(v is None for v in values.values()):
            continue
        ratios = []
        for other in ("ours", "go"):
            mine, theirs = values["inprocess"], values[other]
            ratios.append(f"{mine / theirs:.2f}×" if mine is not None and theirs else "–")
        lines.append("| " + " | ".join([label, unit, *(fmt(values[p]) for p in COPY_PATHS),
                                         *ratios]) + " |")  # fmt: skip
    lines += [
        "",
        "Paths: *direct* = psycopg to PostgreSQL; *inprocess* = `proxy.Proxy` inside the "
        "copying process (its default private unix socket); *inprocess-tcp* = the same with "
        "`port=` (a loopback TCP listener, as the relays use); *ours* = the "
        "`alloydb-auth-proxy` command; *go* = the Go baseline (TCP). The CPU of the whole "
        "is the copying process (getrusage) plus, for the two relays, the relay process "
        "over the same span; PostgreSQL's own CPU is not counted.",
    ]
    return "\n".join(lines) + "\n"


def top_imports(stderr: str, count: int = 12) -> list[tuple[str, float]]:
    """The slowest top-level imports of a ``-X importtime`` log: (module, cumulative ms)."""
    found = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):
            found.append((m.group(2), int(m.group(1)) / 1000))
    return sorted(found, key=lambda x: -x[1])[:count]


def summarize(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for path, metrics in samples.items():
        for key, values in metrics.items():
            if values:
                out.setdefault(path, {})[key] = statistics.median(values)
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(summary: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    head = ["metric", "unit"] + list(PATHS) + ["ours / Go", "target", "met?"]
    lines = [
        f"Mode: **{meta['mode']}** · {meta['date']} · {meta['rounds']} alternating rounds "
        f"(medians) · {meta['throughput_mb']} MB per throughput run · "
        f"{meta['idle_connections']} idle connections · command: `{meta['command']}`",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(PATHS) + 1) + ["---", "---"]) + " |",
    ]
    for key, label, unit, _better, target, check in METRICS:
        values = [summary.get(p, {}).get(key) for p in PATHS]
        if all(v is None for v in values):
            continue
        ours, go = summary.get("ours", {}).get(key), summary.get("go", {}).get(key)
        ratio = f"{ours / go:.2f}×" if ours is not None and go and key in RATIO_KEYS else "–"
        met = "–"
        if check is not None and ours is not None:
            if go is not None:
                ok = check(ours, go)
            elif key in ABSOLUTE_KEYS:
                ok = check(ours, float("nan"))
            else:
                ok = None
            met = "–" if ok is None else ("yes" if ok else "**no**")
        label = label.replace("N idle", f"{meta['idle_connections']:,} idle")
        if key.startswith("concurrent_"):
            label = label.replace("N ", f"{meta.get('concurrent_connections', 0):,} ")
        if key == "concurrent_ok" and ours is not None:
            met = "yes" if ours == meta.get("concurrent_connections") else "**no**"
            target = f"all {meta.get('concurrent_connections', 0):,} work"
        lines.append(
            "| "
            + " | ".join([label, unit] + [fmt(v) for v in values] + [ratio, target, met])
            + " |"
        )
    lines += [
        "",
        "Paths: *direct* = pgbench/psycopg straight to PostgreSQL (no relay); *ours* = "
        "`alloydb-auth-proxy`; *portable* = the same on its portable data plane "
        "(`ALLOYDB_AUTH_PROXY_DATA_PLANE=portable`, the pure wheel's); "
        "*go* = `baselines/goproxy` (Go proxy data path); "
        "*naive-asyncio* / *naive-uvloop* = `baselines/naive_relay.py`. Every relay dials the same "
        "Go TLS 1.3 instance server (`baselines/tlsserver`), except in the rows marked "
        "\"against the emulator's server\", where the instance side is the emulator's own "
        "Python `ssl` server (in front of an echo backend, or of PostgreSQL for the new "
        "connection row). Parallel rows: N client threads, one connection each, the same bytes "
        'in all; "relay cores busy" is the relay\'s CPU-s over the wall time. CPU and RSS are '
        "the relay process only (/proc/<pid>/stat utime+stime, VmRSS). Start → ready is "
        "measured for ours (the Go column shows the baseline binary, which reads its "
        "certificate from files and contacts no API, for reference only).",
    ]
    if meta.get("startup_top_imports_ms"):
        lines += [
            "",
            "Start-up imports of ours on the main thread, under `python -X importtime -c "
            f'"{STARTUP_IMPORTS}"` (one run; top-level imports, cumulative ms, inflated by '
            "the measuring itself): "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in meta["startup_top_imports_ms"]),
        ]
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, dict[str, float]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [m for m in METRICS if not m[1].startswith("  ")]
    cols = 3
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows))
    colors = {"direct": "#999999", "ours": "#1f77b4", "go": "#2ca02c",
              "naive-asyncio": "#ff7f0e", "naive-uvloop": "#d62728",
              "portable": "#9467bd"}  # fmt: skip
    for ax, (key, label, unit, better, _t, _c) in zip(axes.flat, keys, strict=False):
        names = [p for p in PATHS if key in summary.get(p, {})]
        vals = [summary[p][key] for p in names]
        ax.bar(names, vals, color=[colors.get(p, "#8c564b") for p in names])
        title = label.strip().replace(" (N idle)", "")
        ax.set_title(f"{title} ({unit}, {better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        for i, v in enumerate(vals):
            ax.text(i, v, fmt(v), ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description="Data-path benchmark: ours vs Go vs naive Python.")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds (~4 min)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one round: proves every step runs (CI); numbers mean nothing",
    )
    ap.add_argument("--out", default=RESULTS, help="directory for latest.{json,md,png}")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 2)")
    ap.add_argument("--mb", type=int, help="MB per throughput run (default 1000, quick 200)")
    ap.add_argument("--pgbench-seconds", type=int, help="default 15, quick 5")
    ap.add_argument("--copy-mb", type=int, help="MB per COPY run (default 1000, quick 200)")
    ap.add_argument("--idle", type=int, help="idle connections for RSS (default 2000)")
    ap.add_argument(
        "--concurrent", type=int, help="connections held at once (default 10000, quick 2000)"
    )
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of: throughput,parallel,ping,pgbench,connect,copy,rss,startup,concurrent",
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary log directory")
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another build of our command as one more relay, e.g. "
        "abi3=/tmp/venv-abi3/bin/alloydb-auth-proxy (repeatable)",
    )
    args = ap.parse_args()
    global RELAYS, PATHS
    also: dict[str, str] = {}
    for item in args.also:
        name, sep, command = item.partition("=")
        if not sep or not name or not os.path.isfile(command) or name in RELAYS:
            ap.error(f"--also {item!r}: expected NAME=COMMAND with a new name and a file")
        also[name] = command
        PORT_BASE[name] = 50 + 10 * (len(also) - 1)
    RELAYS = RELAYS + tuple(also)
    PATHS = ("direct",) + RELAYS
    smoke = args.smoke
    quick = args.quick or smoke
    rounds = args.rounds or (1 if smoke else 2 if quick else 3)
    nbytes = (args.mb or (20 if smoke else 200 if quick else 1000)) * 1_000_000
    pgb_seconds = args.pgbench_seconds or (2 if smoke else 5 if quick else 15)
    copy_mb = args.copy_mb or (20 if smoke else 200 if quick else 1000)
    idle_n = args.idle or (100 if smoke else 2000)
    concurrent_n = args.concurrent or (200 if smoke else 2000 if quick else 10000)
    ping_count = 200 if smoke else 2000
    connect_count = 5 if smoke else 20 if quick else 50
    startup_runs = 2 if smoke else 5 if quick else 10
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    # Inherited by the relays: 10,000 tunnels need over 20,000 fds in a relay.
    # Root may raise the hard limit; others get what their hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, max(hard, 65536)))
    except (OSError, ValueError):
        want = max(soft, min(hard, 65536)) if hard != resource.RLIM_INFINITY else 65536
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    # A relay holds two fds per tunnel (client and instance) plus a few of its own.
    fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if fd_hard != resource.RLIM_INFINITY and concurrent_n > (fd_hard - 100) // 2:
        capped = (fd_hard - 100) // 2
        log(f"open-file hard limit is {fd_hard} and cannot be raised here: "
            f"{capped} concurrent connections instead of {concurrent_n}")  # fmt: skip
        concurrent_n = capped

    tmp = tempfile.mkdtemp(prefix="alloydb-bench-")
    procs = Procs(tmp)
    pg: PostgresCluster | None = None
    emu: Emulator | None = None
    interrupted = False

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in (*PATHS, *COPY_PATHS)}
    cleanup: list[Callable[[], None]] = []
    importtime: list[tuple[str, float]] = []

    def add(path: str, key: str, value: float) -> None:
        samples[path].setdefault(key, []).append(value)

    try:
        log("building Go programs")
        bins = go_build()
        log("starting PostgreSQL")
        pg = PostgresCluster().start()
        pg.create_user(DB_USER, DB_PASSWORD)
        pg.create_database(DB_NAME, owner=DB_USER)
        log("pgbench -i -s 10")
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(pg.port),
             "-U", DB_USER, DB_NAME],
            check=True, env=pg_env(), capture_output=True,
        )  # fmt: skip

        echo_port, stop_echo = echo_backend()
        cleanup.append(stop_echo)
        emu = Emulator(postgres_host=pg.host, postgres_port=pg.port, tokens=None)
        insts = {m: emu.add_instance(f"{CLUSTER}/instances/{m}", serve=False) for m in GO_MODES}
        insts["emu-echo"] = emu.add_instance(
            f"{CLUSTER}/instances/emu-echo", backend=("127.0.0.1", echo_port)
        )
        insts["emu-pg"] = emu.add_instance(f"{CLUSTER}/instances/emu-pg")
        emu.start()
        log(
            f"emulator at {emu.admin_url}; instances "
            + ", ".join(f"{m}={i.private_ip}" for m, i in insts.items())
        )

        root_ca = write(os.path.join(tmp, "root.pem"), next(iter(insts.values())).ca.root_pem)
        for m in GO_MODES:
            inst = insts[m]
            chain, server_key = emu.server_identity(inst)
            cert_f = write(os.path.join(tmp, f"server-{m}.pem"), chain)
            skey_f = write(os.path.join(tmp, f"server-{m}.key"), server_key)
            argv = [bins["tlsserver"], "-listen", f"{inst.private_ip}:5433", "-cert", cert_f,
                    "-key", skey_f, "-ca", root_ca, "-mode", m, "-pg", f"{pg.host}:{pg.port}"]  # fmt: skip
            procs.start(f"tlsserver-{m}", argv, ready="READY")

        chain_f, key_f, ca_f = client_certificate(emu.admin_url, tmp)
        base = free_port_block(50 + 10 * len(also))
        ports = {r: {m: base + PORT_BASE[r] + i for i, m in enumerate(MODES)} for r in RELAYS}
        routes = {
            r: [f"127.0.0.1:{ports[r][m]}={insts[m].private_ip}" for m in MODES] for r in RELAYS
        }

        relay_pid: dict[str, int] = {}
        uris = [insts[m].uri for m in MODES]
        p, _ = procs.start("ours", [OUR_PROXY, *uris, "--port", str(ports["ours"]["sink"]),
                                    "--token", "bench-token", "--alloydbadmin-api-endpoint",
                                    emu.admin_url], ready=READY_LINE)  # fmt: skip
        relay_pid["ours"] = p.pid
        # The same command on the portable data plane (the pure-Python wheel's).
        p, _ = procs.start("portable", [OUR_PROXY, *uris, "--port", str(ports["portable"]["sink"]),
                                        "--token", "bench-token", "--alloydbadmin-api-endpoint",
                                        emu.admin_url], ready=READY_LINE,
                           env={**os.environ, "ALLOYDB_AUTH_PROXY_DATA_PLANE": "portable"})  # fmt: skip
        relay_pid["portable"] = p.pid
        for name, command in also.items():
            p, _ = procs.start(name, [command, *uris, "--port", str(ports[name]["sink"]), "--token",
                                      "bench-token", "--alloydbadmin-api-endpoint", emu.admin_url],
                               ready=READY_LINE)  # fmt: skip
            relay_pid[name] = p.pid
        goargs = [bins["goproxy"], "-cert", chain_f, "-key", key_f, "-ca", ca_f]
        for r in routes["go"]:
            goargs += ["-route", r]
        p, _ = procs.start("go", goargs, ready=READY_LINE)
        relay_pid["go"] = p.pid
        for loop in ("asyncio", "uvloop"):
            argv = [PYTHON, os.path.join(BENCH, "baselines", "naive_relay.py"), "--cert", chain_f,
                    "--key", key_f, "--ca", ca_f, "--loop", loop]  # fmt: skip
            for r in routes[f"naive-{loop}"]:
                argv += ["--route", r]
            p, _ = procs.start(f"naive-{loop}", argv, ready=READY_LINE)
            relay_pid[f"naive-{loop}"] = p.pid

        log("warming up every listener (certificates, connection info)")
        for r in RELAYS:
            for m in MODES:
                if m == "echo":
                    ping(ports[r][m], 10)
                elif m == "emu-echo":
                    ping(ports[r][m], 10, HELLO)
                elif m == "sink":
                    upload(ports[r][m], 1 << 20, relay_pid[r])
                elif m == "source":
                    download(ports[r][m], 1 << 20, relay_pid[r])
                else:
                    connect_to_first_query(ports[r][m], 1)

        def order(k: int, paths: tuple[str, ...]) -> list[str]:
            return list(paths[k % len(paths) :] + paths[: k % len(paths)])

        cpu_total: dict[str, list[float]] = {r: [0.0, 0.0] for r in RELAYS}  # cpu, bytes
        if "throughput" not in skip or "ping" not in skip:
            for k in range(rounds):
                for r in order(k, RELAYS):
                    if "throughput" not in skip:
                        secs, cpu = upload(ports[r]["sink"], nbytes, relay_pid[r])
                        add(r, "upload_mbps", nbytes / secs / 1e6)
                        add(r, "upload_cpu_s_per_gb", cpu / (nbytes / 1e9))
                        secs2, cpu2 = download(ports[r]["source"], nbytes, relay_pid[r])
                        add(r, "download_mbps", nbytes / secs2 / 1e6)
                        add(r, "download_cpu_s_per_gb", cpu2 / (nbytes / 1e9))
                        cpu_total[r][0] += cpu + cpu2
                        cpu_total[r][1] += 2 * nbytes
                        log(f"round {k + 1} {r:14s} up {nbytes / secs / 1e6:7.0f} MB/s "
                            f"({cpu / (nbytes / 1e9):.2f} CPU-s/GB)  down {nbytes / secs2 / 1e6:7.0f} MB/s "
                            f"({cpu2 / (nbytes / 1e9):.2f} CPU-s/GB)")  # fmt: skip
                    if "ping" not in skip:
                        us = ping(ports[r]["echo"], ping_count)
                        add(r, "ping_us", us)
                        emu_us = in_child(ping, ports[r]["emu-echo"], ping_count, HELLO)
                        add(r, "emu_ping_us", emu_us)
                        log(f"round {k + 1} {r:14s} ping {us:.0f} µs, against the emulator's "
                            f"server {emu_us:.0f} µs")  # fmt: skip
        for r in RELAYS:
            if cpu_total[r][1]:
                samples[r]["cpu_s_per_gb"] = [cpu_total[r][0] / (cpu_total[r][1] / 1e9)]

        if "parallel" not in skip:
            stream_relays = ("ours", "go", "naive-uvloop", *also)
            p4: dict[str, list[float]] = {r: [0.0, 0.0] for r in stream_relays}  # cpu, bytes
            for k in range(rounds):
                for r in order(k, stream_relays):
                    line = []
                    for n in PARALLEL:
                        for mode, key in (("sink", "up"), ("source", "down")):
                            secs, cpu = transfer(ports[r][mode], mode, nbytes, relay_pid[r], n)
                            add(r, f"{key}_p{n}_mbps", nbytes / secs / 1e6)
                            add(r, f"{key}_p{n}_cores", cpu / secs)
                            if n == 4:
                                p4[r][0] += cpu
                                p4[r][1] += nbytes
                            line.append(f"{key}×{n} {nbytes / secs / 1e6:.0f} ({cpu / secs:.2f})")
                    log(f"round {k + 1} {r:14s} MB/s (relay cores): " + ", ".join(line))
            for r in stream_relays:
                if p4[r][1]:
                    samples[r]["p4_cpu_s_per_gb"] = [p4[r][0] / (p4[r][1] / 1e9)]

        pg_ports = {"direct": pg.port, **{r: ports[r]["pg"] for r in RELAYS}}
        if "pgbench" not in skip:
            for k in range(rounds if not quick else 1):
                for path in order(k, PATHS):
                    res = pgbench(pg_ports[path], pgb_seconds, relay_pid.get(path))
                    add(path, "pgbench_tps", res["tps"])
                    if "latency_ms" in res:
                        add(path, "pgbench_latency_ms", res["latency_ms"])
                    if "relay_cores_busy" in res:
                        add(path, "pgbench_relay_cores", res["relay_cores_busy"])
                    log(f"round {k + 1} {path:14s} pgbench {res['tps']:8.0f} TPS")

        if "connect" not in skip:
            for k in range(rounds):
                for path in order(k, PATHS):
                    ms = connect_to_first_query(pg_ports[path], connect_count)
                    add(path, "connect_ms", ms)
                    line = f"round {k + 1} {path:14s} connect→first query {ms:.2f} ms"
                    if path != "direct":
                        emu_ms = in_child(
                            connect_to_first_query, ports[path]["emu-pg"], connect_count
                        )
                        add(path, "emu_connect_ms", emu_ms)
                        line += f", against the emulator's server {emu_ms:.2f} ms"
                    log(line)

        if "copy" not in skip:
            copy_ports = {"direct": pg.port, "ours": ports["ours"]["pg"], "go": ports["go"]["pg"],
                          "inprocess-tcp": free_port_block(1)}  # fmt: skip
            inproc = {"uri": insts["pg"].uri, "admin_url": emu.admin_url}
            for k in range(rounds):
                for path in order(k, COPY_PATHS):
                    res = copy_through(path, copy_ports.get(path), relay_pid.get(path), copy_mb,
                                       inproc if path.startswith("inprocess") else None)  # fmt: skip
                    for key, value in res.items():
                        add(path, key, value)
                    log(f"round {k + 1} {path:14s} COPY {res['copy_mbps']:6.0f} MB/s, "
                        f"{res['copy_total_cpu_s_per_gb']:.2f} CPU-s/GB in all, host thread "
                        f"{res['copy_host_thread_busy']:.2f} cores")  # fmt: skip

        if "rss" not in skip:
            for r in RELAYS:
                held: list[socket.socket] = []
                res = idle_rss(ports[r]["echo"], relay_pid[r], idle_n, held=held)
                add(r, "rss_kib_per_conn", res["kib_per_conn"])
                log(f"{r:14s} idle RSS {res['rss_before_kib']} → {res['rss_after_kib']} KiB: "
                    f"{res['kib_per_conn']:.1f} KiB/conn")  # fmt: skip
                res = in_child(idle_rss, ports[r]["emu-echo"], relay_pid[r], idle_n, HELLO)
                add(r, "emu_rss_kib_per_conn", res["kib_per_conn"])
                log(f"{r:14s} idle RSS against the emulator's server {res['rss_before_kib']} → "
                    f"{res['rss_after_kib']} KiB: {res['kib_per_conn']:.1f} KiB/conn")  # fmt: skip
                for s in held:
                    s.close()
                time.sleep(2.0)  # let the relay tear them down before the next path

        if "concurrent" not in skip:
            for r in ("ours", "go"):
                res = concurrent_connections(ports[r]["echo"], relay_pid[r], concurrent_n)
                add(r, "concurrent_ok", res["ok"])
                add(r, "concurrent_rss_mib", res["rss_mib"])
                log(f"{r:14s} {res['ok']:.0f} of {concurrent_n} concurrent connections worked "
                    f"(relay RSS {res['rss_mib']:.0f} MiB)")  # fmt: skip

        if "startup" not in skip:
            sport = free_port_block(2)
            commands = {"ours": OUR_PROXY, **also}
            for _ in range(startup_runs):
                for name in (*commands, "go"):
                    if name in commands:
                        argv = [commands[name], insts["echo"].uri, "--port", str(sport), "--token",
                                "bench-token", "--alloydbadmin-api-endpoint", emu.admin_url]  # fmt: skip
                    else:
                        argv = goargs[:7] + [
                            "-route",
                            f"127.0.0.1:{sport}={insts['echo'].private_ip}",
                        ]
                    p, secs = procs.start(f"startup-{name}", argv, ready=READY_LINE)
                    procs.stop(p)
                    add(name, "start_to_ready_ms", secs * 1000)
            log(
                "start → ready: ours "
                + ", ".join(f"{v:.0f}" for v in samples["ours"]["start_to_ready_ms"])
                + " ms"
            )
            # Where ours spends its start-up: the main thread's imports up to the
            # supervisor, alone (-X importtime keeps one running total for all
            # threads, and the key's thread imports cryptography meanwhile).
            res = subprocess.run(
                [PYTHON, "-X", "importtime", "-c", STARTUP_IMPORTS],
                capture_output=True, text=True, cwd=ROOT, check=True,
            )  # fmt: skip
            importtime = top_imports(res.stderr)

    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping everything")
    finally:
        procs.stop_all()
        if emu is not None:
            emu.stop()
        for stop in cleanup:
            stop()
        if pg is not None:
            pg.stop()
        if args.keep_logs:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if interrupted:
        return 130

    summary = summarize(samples)
    meta = {
        "mode": "smoke" if smoke else "quick" if quick else "full",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]]),
        "rounds": rounds,
        "throughput_mb": nbytes // 1_000_000,
        "copy_mb": copy_mb,
        "pgbench": f"pgbench -n -S -c 8 -j 2 -T {pgb_seconds} (scale 10)",
        "ping_count": ping_count,
        "connect_count": connect_count,
        "idle_connections": idle_n,
        "concurrent_connections": concurrent_n,
        "open_file_hard_limit": None if fd_hard == resource.RLIM_INFINITY else fd_hard,
        "startup_runs": startup_runs,
        "startup_top_imports_ms": importtime,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "go": subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip(),
        },
    }
    ratios = {}
    for key, _l, _u, _b, target, check in METRICS:
        ours, go = summary.get("ours", {}).get(key), summary.get("go", {}).get(key)
        entry: dict[str, Any] = {"target": target}
        if ours is not None and go and key in RATIO_KEYS:
            entry["ours_over_go"] = ours / go
        if check is not None and ours is not None and go is not None:
            entry["met"] = bool(check(ours, go))
        ratios[key] = entry
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.json"), "w") as fh:
        json.dump(
            {"meta": meta, "summary": summary, "targets": ratios, "samples": samples}, fh, indent=2
        )
    md = markdown(summary, meta)
    if any(key in summary.get("inprocess", {}) for key, _l, _u in COPY_METRICS):
        md += "\n" + copy_markdown(summary, meta)
    with open(os.path.join(args.out, "latest.md"), "w") as fh:
        fh.write(md)
    png = os.path.join(args.out, "latest.png")
    if chart(summary, png):
        log(f"chart: {png}")
    else:
        log("matplotlib not importable; no chart")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
