#!/usr/bin/env bash
# The README's test command: set up (ci/install.sh), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
# pytest exits 5 when it collected no test; like any non-zero code that fails.
exec .venv/bin/python -m pytest -ra "$@"
