"""Run every fuzz target (or the named ones) under atheris for a set time each.

    python -m tests.fuzz [--seconds 600] [--corpus DIR] [TARGET ...]

Each target runs in its own process (tests/fuzz/one.py) with a corpus kept
under --corpus (default .fuzz-corpus/, git-ignored), so later runs start
where earlier ones stopped. Prints executions, coverage and the outcome per
target; exits 1 if any target found a crash (the input is saved as
crash-* in the working directory, and becomes a regression test).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from tests.fuzz.targets import SEEDS, TARGETS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_one(name: str, seconds: int, corpus: str) -> dict[str, object]:
    where = os.path.join(corpus, name)
    os.makedirs(where, exist_ok=True)
    for i, seed in enumerate(SEEDS.get(name, [])):
        with open(os.path.join(where, f"seed-{i}"), "wb") as fh:
            fh.write(seed)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.one", name, f"-max_total_time={seconds}",
         "-print_final_stats=1", "-rss_limit_mb=2048", "-timeout=10",
         os.path.join(corpus, name)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    log = proc.stderr
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", log)
    cov = re.findall(r"\bcov: (\d+)", log)
    return {
        "target": name,
        "seconds": round(time.monotonic() - started),
        "executions": int(runs[-1]) if runs else 0,
        "coverage": int(cov[-1]) if cov else 0,
        "ok": proc.returncode == 0,
        "tail": "" if proc.returncode == 0 else log[-3000:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    ap.add_argument("--seconds", type=int, default=600, help="per target (default 600)")
    ap.add_argument("--corpus", default=os.path.join(ROOT, ".fuzz-corpus"))
    args = ap.parse_args()
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    results = [run_one(t, args.seconds, args.corpus) for t in args.targets or TARGETS]
    print("| target | seconds | executions | coverage (edges) | outcome |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in results:
        print(f"| {r['target']} | {r['seconds']} | {r['executions']:,} | {r['coverage']} | "
              f"{'no crash' if r['ok'] else '**crash**'} |")  # fmt: skip
    for r in results:
        if not r["ok"]:
            print(f"\n{r['target']}:\n{r['tail']}", file=sys.stderr)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
