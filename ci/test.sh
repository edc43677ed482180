#!/usr/bin/env bash
# The README's test command: set up (ci/install.sh), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
# pytest exits 5 when it collected no test; like any non-zero code that fails.
# Three workers, a test file each at a time (pytest-xdist): the suite mostly
# waits (timers, certificate lifetimes, subprocesses), so this is 2.4 times as
# fast on two cores. Here rather than in pyproject's addopts: the tests that
# run pytest inside a test must not start workers of their own.
exec .venv/bin/python -m pytest -ra -n 3 --dist loadfile "$@"
