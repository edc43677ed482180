"""Find and fetch the newest OpenSSL 3.x source that Debian publishes.

    python ci/openssl_source.py DEST_DIR     -> prints the path of the verified tarball

For each suite below it fetches the mirror's ``InRelease`` (over HTTPS) and,
where ``gpgv`` and Debian's archive keyring are installed, checks its
signature; the ``Sources`` index must match the SHA-256 that ``InRelease``
gives, and the tarball the SHA-256 that ``Sources`` gives. It picks the
highest upstream 3.x version of the ``openssl`` source package and downloads
its ``.orig.tar.gz`` into DEST_DIR (kept there: a second run downloads only
the indexes). A suite that cannot be read is an error, not skipped: skipping
would quietly pick an older OpenSSL. ``OPENSSL_TARBALL`` set to a local
tarball skips all of this (its version comes from its name; the way to build
offline).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

MIRROR = os.environ.get("DEBIAN_MIRROR", "https://deb.debian.org/debian")
SUITES = ("trixie", "trixie-updates", "bookworm", "bookworm-updates")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
TIMEOUT = 120


class SourceError(Exception):
    pass


def fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return bytes(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"{url}: {exc}") from None


def release_hashes(suite: str) -> dict[str, str]:
    """path -> SHA-256 from the suite's InRelease, its signature checked where possible."""
    url = f"{MIRROR}/dists/{suite}/InRelease"
    signed = fetch(url)
    if shutil.which("gpgv") and os.path.isfile(KEYRING):
        with tempfile.NamedTemporaryFile(suffix=".InRelease") as fh:
            fh.write(signed)
            fh.flush()
            check = subprocess.run(
                ["gpgv", "--keyring", KEYRING, fh.name], capture_output=True, text=True
            )
        if check.returncode != 0:
            raise SourceError(f"{url}: bad signature: {check.stderr.strip()[-300:]}")
    text = signed.decode("utf-8", "replace")
    block = text.split("SHA256:", 1)[1] if "SHA256:" in text else ""
    out = {}
    for line in block.splitlines()[1:]:
        parts = line.split()
        if len(parts) != 3 or not line.startswith(" "):
            break
        out[parts[2]] = parts[0]
    return out


def stanzas(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            out.append(fields)
    return out


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def candidates() -> list[tuple[str, str, str, str]]:
    """(upstream version, suite, url, sha256) of every openssl 3.x orig tarball found."""
    found = []
    for suite in SUITES:
        want = release_hashes(suite).get("main/source/Sources.xz")
        url = f"{MIRROR}/dists/{suite}/main/source/Sources.xz"
        packed = fetch(url)
        if want is None or hashlib.sha256(packed).hexdigest() != want:
            raise SourceError(f"{url}: does not match the SHA-256 in {suite}'s InRelease")
        try:
            text = lzma.decompress(packed).decode("utf-8", "replace")
        except lzma.LZMAError as exc:
            raise SourceError(f"{url}: {exc}") from None
        for st in stanzas(text):
            if st.get("Package") != "openssl":
                continue
            for line in st.get("Checksums-Sha256", "").splitlines():
                parts = line.split()
                if len(parts) == 3 and re.fullmatch(r"openssl_3\.[\d.]+\.orig\.tar\.gz", parts[2]):
                    upstream = parts[2][len("openssl_") : -len(".orig.tar.gz")]
                    found.append(
                        (upstream, suite, f"{MIRROR}/{st['Directory']}/{parts[2]}", parts[0])
                    )
    return found


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dest = sys.argv[1]
    local = os.environ.get("OPENSSL_TARBALL")
    if local:
        if not os.path.isfile(local):
            print(f"OPENSSL_TARBALL={local}: no such file", file=sys.stderr)
            return 1
        print(os.path.abspath(local))
        return 0
    try:
        found = candidates()
    except SourceError as exc:
        print(
            f"cannot read Debian's source indexes ({exc}); looked for the 'openssl' source "
            f"package in {', '.join(SUITES)} at {MIRROR} (set DEBIAN_MIRROR to another mirror), "
            "or set OPENSSL_TARBALL to a local openssl-3.x.y.tar.gz",
            file=sys.stderr,
        )
        return 1
    if not found:
        print(
            f"no OpenSSL 3.x source found: looked for the 'openssl' source package in "
            f"{', '.join(SUITES)} at {MIRROR} (set DEBIAN_MIRROR to another mirror), or set "
            "OPENSSL_TARBALL to a local openssl-3.x.y.tar.gz",
            file=sys.stderr,
        )
        return 1
    os.makedirs(dest, exist_ok=True)
    # Newest first; an index can name a file the mirror no longer has.
    for upstream, suite, url, sha256 in sorted(
        found, key=lambda c: version_key(c[0]), reverse=True
    ):
        path = os.path.join(dest, os.path.basename(url))
        if os.path.isfile(path) and sha256_of(path) == sha256:
            print(path)
            return 0
        try:
            data = fetch(url)
        except SourceError as exc:
            print(f"openssl_source: {exc}; trying an older one", file=sys.stderr)
            continue
        if hashlib.sha256(data).hexdigest() != sha256:
            print(f"openssl_source: {url}: SHA-256 differs from the index", file=sys.stderr)
            continue
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=".download-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        print(f"openssl_source: OpenSSL {upstream} from Debian {suite}", file=sys.stderr)
        print(path)
        return 0
    print(
        "no OpenSSL 3.x source could be downloaded from the files the Debian indexes name; "
        "set OPENSSL_TARBALL to a local openssl-3.x.y.tar.gz",
        file=sys.stderr,
    )
    return 1


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
