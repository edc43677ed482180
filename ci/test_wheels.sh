#!/usr/bin/env bash
# Proves the wheels and the sdist as a user gets them: builds them
# (ci/build_wheel.sh, python -m build --sdist), installs each into a fresh
# virtualenv and runs ci/wheel/test_installed.py with that virtualenv's own
# Python, outside the source tree:
#
#   binary  pip install --no-index --find-links wheelhouse, no C compiler on PATH
#           (and again under CPython 3.10 and 3.13 where found: one abi3 wheel)
#   pure    the py3-none-any wheel, no C compiler on PATH
#   sdist   pip install --no-binary alloydb-auth-proxy: built here against the
#           system OpenSSL
#
# Run by tests/packaging/test_wheels.py (part of the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
log() { echo "[test_wheels] $*" >&2; }

bash ci/build_wheel.sh
TMP=$(mktemp -d "${TMPDIR:-/tmp}/alloydb-wheels.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
chmod 755 "$TMP"  # PostgreSQL runs as its own user under here

# Where a user has no compiler: every C compiler name fails loudly.
mkdir -p "$TMP/nocc"
for cc in cc gcc c++ g++ clang clang++ x86_64-linux-gnu-gcc aarch64-linux-gnu-gcc zig; do
    printf '#!/bin/sh\necho "no C compiler on this PATH (asked for %s)" >&2\nexit 1\n' "$cc" >"$TMP/nocc/$cc"
    chmod +x "$TMP/nocc/$cc"
done
NOCC_PATH="$TMP/nocc:$PATH"
TEST_DEPS=("pytest>=8,<10" "pytest-timeout>=2.3,<3" "psycopg[binary]>=3.1,<4")

# run_case NAME PYTHON PATH INSTALL_ARGS...
run_case() {
    local name=$1 py=$2 path=$3
    shift 3
    local venv="$TMP/venv-$name" dir="$TMP/case-$name"
    log "$name: fresh virtualenv ($("$py" --version)), pip install $*"
    "$py" -m venv "$venv"
    PATH="$path" "$venv/bin/python" -m pip install -q --upgrade pip
    PATH="$path" "$venv/bin/python" -m pip install -q "$@"
    # its dependencies, from wheels only: nothing may need a compiler
    PATH="$path" "$venv/bin/python" -m pip install -q --only-binary :all: alloydb-auth-proxy "${TEST_DEPS[@]}"
    PATH="$path" "$venv/bin/python" -m pip check
    mkdir -p "$dir"
    cp ci/wheel/test_installed.py "$dir/"
    chmod -R a+rX "$dir"
    (cd "$dir" && PATH="$path" EXPECT=${name%%-*} WHEELHOUSE="$ROOT/wheelhouse" \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider --timeout 900 test_installed.py)
}

BINARY=$(ls wheelhouse/alloydb_auth_proxy-*-cp310-abi3-manylinux_2_28_x86_64.whl)
PURE=$(ls wheelhouse/alloydb_auth_proxy-*-py3-none-any.whl)
log "wheels: $(du -h "$BINARY" | cut -f1) $BINARY, $(du -h "$PURE" | cut -f1) $PURE"

run_case binary "$PYTHON" "$NOCC_PATH" --no-index --find-links wheelhouse --no-deps alloydb-auth-proxy
# The abi3 wheel under the oldest and the newest CPython this machine has.
find_python() {  # find_python 3.10 -> an interpreter of that version, or nothing
    local v=$1 exe
    exe=$(command -v "python$v" || true)
    if [ -n "$exe" ] && "$exe" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$v'.split('.')))" 2>/dev/null; then
        echo "$exe"
    elif command -v pyenv >/dev/null; then
        local pv
        pv=$(pyenv versions --bare 2>/dev/null | grep -E "^$v\.[0-9]+$" | tail -1 || true)
        [ -n "$pv" ] && PYENV_VERSION=$pv pyenv which "python$v" 2>/dev/null || true
    fi
}
for v in 3.10 3.13; do
    exe=$(find_python "$v")
    if [ -n "$exe" ]; then
        run_case "binary-py${v/./}" "$exe" "$NOCC_PATH" --no-index --find-links wheelhouse --no-deps alloydb-auth-proxy
    else
        log "no CPython $v on this machine: the abi3 wheel is not checked under it here"
    fi
done
run_case pure "$PYTHON" "$NOCC_PATH" --no-deps "$PURE"

log "sdist"
rm -rf "$TMP/sdist"
.wheel-build/venv/bin/python -m pip install -q build
.wheel-build/venv/bin/python -m build --sdist --no-isolation -o "$TMP/sdist" . >/dev/null
SDIST=$(ls "$TMP"/sdist/alloydb_auth_proxy-*.tar.gz)
run_case sdist "$PYTHON" "$PATH" --no-binary alloydb-auth-proxy "$SDIST"
log "all cases passed"
