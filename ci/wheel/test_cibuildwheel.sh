#!/usr/bin/env bash
# cibuildwheel's test-command: the core tests against the installed wheel.
# They run from a copy outside the project, so `import proxy` is the wheel's
# (in the project, pytest would put the source tree first), and on the native
# data plane only: a missing core must fail, not fall back to the portable one.
set -euo pipefail
PROJECT=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$PROJECT/tests" "$WORK/"
cd "$WORK"
export ALLOYDB_AUTH_PROXY_DATA_PLANE=native
python -c 'import proxy, proxy._splice as s; assert "site-packages" in s.__file__, s.__file__; print(s.__file__, s.openssl_version())'
python -m pytest -q -p no:cacheprovider tests/core --deselect tests/core/test_sanitizers.py
