"""The suite-wide secret scan: every secret the suite hands out is searched for
in everything the proxy printed, logged or served during the run.

Secrets (``secret``): the static OAuth2 tokens and the database password of
tests/conftest.py, every token and key the identity fakes issue or hold, the
private key of every service-account file they write, and every value given to
the CLI as ``--token``/``--login-token`` or in an environment variable whose
name says token, password or secret (``secrets_of_command``). Transcripts
(``record``): the output of every CLI subprocess (tests/integration/proxyproc.py,
and any ``subprocess`` run of the CLI, ``doctor`` and Python children that
import the proxy included, through ``watch_subprocesses``), every message of
the in-process logger (``watch_in_process_logs``, whatever the logging level),
and the bodies of the health, metrics and /debug pages the tests fetch. Besides the listed
secrets, any PEM private key in a transcript is a finding: the proxy's own
client key is made in memory and must never be printed.

At the end of the session tests/conftest.py reports each finding and fails the
run (``pytest_sessionfinish``); tests/unit/test_leakcheck.py shows that a
planted secret is found.
"""

from __future__ import annotations

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


_SECRET_FLAGS = ("--token", "--login-token", "-t")
_SECRET_ENV = re.compile(r"(TOKEN|PASSWORD|SECRET)$", re.I)  # not *_TOKEN_URL and such


def secrets_of_command(argv: list[str], env: dict[str, str] | None = None) -> None:
    """Register the secrets a CLI run is given: flag values and telling env variables."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in _SECRET_FLAGS:
            secret(value, f"the value of {flag}")
    for arg in argv:
        name, eq, value = arg.partition("=")
        if eq and name in _SECRET_FLAGS:
            secret(value, f"the value of {name}")
    for name, value in (env or {}).items():
        if _SECRET_ENV.search(name):
            secret(value, f"${name}")


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


def watch_in_process_logs() -> None:
    """Record every message the proxy logs in this process, at every level: the
    library logger's calls are wrapped, so the ``logging`` level (WARNING unless
    a test sets one) filters nothing out of the scan and changes nothing else."""
    from proxy import log

    lines: list[str] = []
    for level in ("info", "debug", "error"):
        original = getattr(log.StdlibLogger, level)

        def wrapped(self: object, message: str, *args: object, _o=original, _l=level) -> None:
            try:
                lines.append(f"{_l} {message % args if args else message}")
            except Exception:  # never let the scan break a test's logging
                lines.append(f"{_l} {message!r} {args!r}")
            _o(self, message, *args)

        setattr(log.StdlibLogger, level, wrapped)
    record("in-process proxy logger", lambda: "\n".join(lines))


def _is_cli(args: object) -> bool:
    """The CLI, or a Python child that imports the proxy (not a child pytest:
    that one runs its own scan)."""
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
    if any(a == "pytest" or a.endswith("/pytest") for a in argv):
        return False
    return any(
        a.endswith("alloydb-auth-proxy")
        or a in ("proxy", "proxy.cli")
        or "proxy.cli" in a
        or "import proxy" in a
        or "from proxy" in a
        for a in argv
    )


def watch_subprocesses() -> None:
    """Record what every run of the CLI through ``subprocess`` printed (run,
    check_output and communicate all end in Popen.communicate)."""
    original = subprocess.Popen.communicate

    def communicate(self: subprocess.Popen, *args: object, **kwargs: object):  # type: ignore[type-arg]
        is_cli = _is_cli(self.args)
        if is_cli:
            secrets_of_command(
                [str(a) for a in self.args] if isinstance(self.args, (list, tuple)) else []
            )
        out, err = original(self, *args, **kwargs)  # type: ignore[arg-type]
        if is_cli:
            text = "\n".join(
                x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err) if x
            )
            record(f"subprocess {' '.join(str(a) for a in self.args)[:200]}", text)
        return out, err

    subprocess.Popen.communicate = communicate  # type: ignore[method-assign]
