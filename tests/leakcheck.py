"""The suite-wide secret scan: every secret the suite hands out is searched for
in everything the proxy printed, logged or served during the run.

Secrets (``secret``): the static OAuth2 tokens and the database password of
tests/conftest.py, every token the identity fakes issue, and the private key of
every service-account file they write. Transcripts (``record``): the output of
every CLI subprocess (tests/integration/proxyproc.py, and any
``subprocess`` run of the CLI, ``doctor`` included, through
``watch_subprocesses``), the in-process ``proxy`` logger, and the bodies of
the health, metrics and /debug pages the tests fetch. Besides the listed
secrets, any PEM private key in a transcript is a finding: the proxy's own
client key is made in memory and must never be printed.

At the end of the session tests/conftest.py reports each finding and fails the
run (``pytest_sessionfinish``); tests/unit/test_leakcheck.py shows that a
planted secret is found.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from collections.abc import Callable

_lock = threading.Lock()
_secrets: dict[str, str] = {}  # value -> what it is
_transcripts: list[tuple[str, Callable[[], str]]] = []
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_MIN_LENGTH = 6  # shorter values would match by chance


def secret(value: str, what: str) -> str:
    """Register ``value`` (e.g. a token) as something no transcript may contain."""
    if len(value) >= _MIN_LENGTH:
        with _lock:
            _secrets.setdefault(value, what)
    return value


def secret_key_pem(pem: str, what: str) -> str:
    """Register a PEM private key by the first line of its base64 body."""
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    if body:
        secret(body[0], what)
    return pem


def record(origin: str, text: str | Callable[[], str]) -> None:
    """Add a transcript: a text, or a function that gives it at the end of the run."""
    get = (lambda: text) if isinstance(text, str) else text
    with _lock:
        _transcripts.append((origin, get))


def findings() -> list[str]:
    """One line per transcript and secret it contains."""
    with _lock:
        secrets = dict(_secrets)
        transcripts = list(_transcripts)
    found: list[str] = []
    for origin, get in transcripts:
        for value in secrets:  # the label may carry the command line: don't repeat it
            origin = origin.replace(value, "***")
        try:
            text = get()
        except Exception as exc:  # a transcript that cannot be read is a finding too
            found.append(f"{origin}: transcript unreadable: {exc!r}")
            continue
        for value, what in secrets.items():
            if value in text:
                found.append(f"{origin}: contains {what}")
        if _PEM_KEY.search(text):
            found.append(f"{origin}: contains a PEM private key")
    return found


def summary() -> str:
    with _lock:
        return f"{len(_transcripts)} transcripts searched for {len(_secrets)} secrets"


class _LogRecorder(logging.Handler):
    """Keeps every record of the in-process ``proxy`` logger, formatted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, rec: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(rec))
        except Exception:  # never let the scan break a test's logging
            self.lines.append(f"{rec.name} unformattable record {rec.msg!r}")


def watch_in_process_logs() -> None:
    recorder = _LogRecorder()
    logging.getLogger("proxy").addHandler(recorder)
    record("in-process proxy logger", lambda: "\n".join(recorder.lines))


def _is_cli(args: object) -> bool:
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
    return any(
        a.endswith("alloydb-auth-proxy") or a in ("proxy", "proxy.cli") or "proxy.cli" in a
        for a in argv
    )


def watch_subprocesses() -> None:
    """Record what every run of the CLI through ``subprocess`` printed (run,
    check_output and communicate all end in Popen.communicate)."""
    original = subprocess.Popen.communicate

    def communicate(self: subprocess.Popen, *args: object, **kwargs: object):  # type: ignore[type-arg]
        out, err = original(self, *args, **kwargs)  # type: ignore[arg-type]
        if _is_cli(self.args):
            text = "\n".join(
                x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err) if x
            )
            record(f"subprocess {' '.join(str(a) for a in self.args)[:200]}", text)
        return out, err

    subprocess.Popen.communicate = communicate  # type: ignore[method-assign]
