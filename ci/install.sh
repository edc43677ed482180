#!/usr/bin/env bash
# Installs everything the proxy, its demo and its tests need on a fresh Debian
# machine: system packages (PostgreSQL, the OpenSSL headers, a C compiler, Go) and
# a virtualenv in .venv with the package built in place plus its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# golang-go builds the Go baseline of the benchmark, whose smoke run is a test.
# iproute2 and util-linux (unshare) give the small-buffer tests their own network
# namespace; gcc brings libasan for the AddressSanitizer run of the core.
# faketime moves the wall clock of one proxy for the clock-jump row of the fault matrix.
# fuse3 (fusermount) and libfuse2 serve the real --fuse mounts of the tests.
APT_PACKAGES=(postgresql postgresql-client postgresql-contrib libssl-dev gcc util-linux iproute2 procps golang-go faketime fuse3 libfuse2)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Editable install: builds proxy/_splice in place so tests import this tree.
.venv/bin/python -m pip install -q -e '.[test,fuse,telemetry]'
# The coverage-guided fuzzer (tests/fuzz): a binary wheel exists for this
# machine's CPython; elsewhere the same targets still run under hypothesis.
.venv/bin/python -m pip install -q 'atheris>=2.3,<4' || echo "atheris not installed: the fuzz smoke test will skip" >&2
.venv/bin/python -c 'import proxy._splice' || { echo "the Cython core did not build" >&2; exit 1; }
