"""One ``COPY ... FROM STDIN`` through psycopg, measured from inside its own process.

    python bench/copy_client.py --mb 1000 --port P ...              (to a relay or PostgreSQL)
    python bench/copy_client.py --mb 1000 --inprocess URI --admin-url URL --token T ...

With ``--inprocess`` the proxy is a ``proxy.Proxy`` in this process (its
default private unix socket, or TCP with ``--inprocess-port``), so the process CPU below is client and proxy
together. It prints "ready" and waits for a line on stdin before the timed
COPY, and "done" right after it, so that a caller can read a relay's CPU
time over the same span. Then one JSON line: seconds, rows, the process's CPU seconds
(getrusage) and, per thread, CPU seconds from /proc/self/task: the main
thread (the host program calling psycopg) against every other thread (the
proxy's event loop and data plane, psycopg's none).

The rows are built once (1 MiB of COPY text) and written again and again, so
the client's own work is the same for every path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from typing import Any

import psycopg

CLK_TCK = os.sysconf("SC_CLK_TCK")
BLOCK_ROWS = 16384  # 64-byte rows: 1 MiB per block


def thread_cpu() -> dict[int, tuple[str, float]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        fields = stat.rsplit(b")", 1)[1].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def block() -> bytes:
    row = b"%08d\t" + b"x" * 54 + b"\n"  # 64 bytes with the tab and newline
    return b"".join(row % i for i in range(BLOCK_ROWS))


def copy(dsn: str, mb: int) -> dict[str, Any]:
    data = block()
    blocks = mb * 1_000_000 // len(data) + 1
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE UNLOGGED TABLE IF NOT EXISTS copy_bench (n int, pad text)")
        conn.execute("TRUNCATE copy_bench")
        with conn.cursor() as cur:  # warm: the tunnel and the server's table are ready
            with cur.copy("COPY copy_bench FROM STDIN") as cp:
                cp.write(data)
            conn.execute("TRUNCATE copy_bench")
            # The caller samples the relay's CPU between these two lines.
            print("ready", flush=True)
            sys.stdin.readline()
            threads0, cpu0, t0 = thread_cpu(), process_cpu(), time.perf_counter()
            with cur.copy("COPY copy_bench FROM STDIN") as cp:
                for _ in range(blocks):
                    cp.write(data)
            seconds = time.perf_counter() - t0
            cpu, threads1 = process_cpu() - cpu0, thread_cpu()
            print("done", flush=True)
            rows = cur.rowcount
        conn.execute("TRUNCATE copy_bench")
    if rows != blocks * BLOCK_ROWS:
        raise SystemExit(f"COPY stored {rows} rows, expected {blocks * BLOCK_ROWS}")
    main = threading.main_thread().native_id
    per_thread = {
        f"{name}:{tid}": cpu1 - threads0.get(tid, (name, 0.0))[1]
        for tid, (name, cpu1) in threads1.items()
    }
    main_cpu = sum(v for k, v in per_thread.items() if k.endswith(f":{main}"))
    return {
        "bytes": blocks * len(data),
        "seconds": seconds,
        "process_cpu_s": cpu,
        "main_thread_cpu_s": main_cpu,
        "other_threads_cpu_s": cpu - main_cpu,
        "threads": per_thread,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--dbname", required=True)
    ap.add_argument("--port", type=int, help="a relay's or PostgreSQL's TCP port on 127.0.0.1")
    ap.add_argument("--inprocess", metavar="URI", help="start proxy.Proxy for this instance")
    ap.add_argument("--inprocess-port", type=int, help="a TCP listener instead of a unix socket")
    ap.add_argument("--admin-url")
    ap.add_argument("--token")
    args = ap.parse_args()
    auth = {"user": args.user, "password": args.password, "dbname": args.dbname}
    if args.inprocess:
        import proxy

        tcp = {"port": args.inprocess_port} if args.inprocess_port else {}
        with proxy.Proxy(
            args.inprocess, token=args.token, alloydbadmin_api_endpoint=args.admin_url, **tcp
        ) as p:
            result = copy(p.dsn(**auth), args.mb)
            result["proxy_stats"] = p.stats()
    else:
        dsn = psycopg.conninfo.make_conninfo(
            host="127.0.0.1", port=args.port, sslmode="disable", **auth
        )
        result = copy(dsn, args.mb)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
