#!/usr/bin/env bash
# Builds OpenSSL 3.x as static, position-independent libraries into PREFIX:
#
#   bash ci/build_openssl.sh PREFIX [OPENSSL_TARGET]
#
# The source is the newest 3.x that Debian publishes (ci/openssl_source.py) or
# OPENSSL_TARBALL. CC, AR and RANLIB are taken from the environment (zig's, in
# ci/build_wheel.sh; the image's compiler under cibuildwheel). OPENSSL_TARGET
# defaults to OpenSSL's guess for this machine. Only what the proxy uses is
# built: no engines, loadable modules, legacy ciphers, apps, tests or docs.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${1:?usage: build_openssl.sh PREFIX [OPENSSL_TARGET]}
TARGET=${2:-}
PYTHON=${PYTHON:-python3}
SRC_CACHE=${OPENSSL_SRC_CACHE:-.wheel-build/src}

TARBALL=$("$PYTHON" ci/openssl_source.py "$SRC_CACHE")
SRC=$(mktemp -d "${TMPDIR:-/tmp}/openssl-build.XXXXXX")
trap 'rm -rf "$SRC"' EXIT
tar -xzf "$TARBALL" -C "$SRC" --strip-components=1
cd "$SRC"
CONFIGURE=(./Configure)
[ -n "$TARGET" ] && CONFIGURE+=("$TARGET")
"${CONFIGURE[@]}" no-shared no-module no-dso no-engine no-legacy \
    no-apps no-tests no-docs no-ui-console no-comp no-quic \
    no-idea no-seed no-sm2 no-sm3 no-sm4 no-camellia no-aria no-whirlpool \
    no-md4 no-mdc2 no-rc2 no-rc4 no-rc5 no-bf no-cast no-srp no-gost \
    -fPIC --prefix="$PREFIX" --libdir=lib --openssldir=/etc/ssl >configure.log 2>&1 \
    || { tail -40 configure.log >&2; exit 1; }
make -j"$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)" build_libs >make.log 2>&1 \
    || { tail -40 make.log >&2; exit 1; }
make install_dev >install.log 2>&1 || { tail -40 install.log >&2; exit 1; }
echo "$PREFIX"
