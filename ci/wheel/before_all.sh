#!/usr/bin/env bash
# cibuildwheel's before-all in the manylinux and musllinux images: what
# OpenSSL's Configure and the core need there, then the static OpenSSL.
set -euo pipefail
cd "$(dirname "$0")/../.."
if command -v dnf >/dev/null; then
    dnf install -y -q perl-IPC-Cmd perl-Time-Piece
elif command -v yum >/dev/null; then
    yum install -y -q perl-IPC-Cmd perl-Time-Piece
elif command -v apk >/dev/null; then
    apk add --no-cache perl linux-headers
fi
PYTHON=/opt/python/cp310-cp310/bin/python bash ci/build_openssl.sh /opt/openssl-static
