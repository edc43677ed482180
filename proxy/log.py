"""Plain and structured logging with the Go proxy's exact format and stream split.

Plain (default): ``YYYY/MM/DD HH:MM:SS <msg>`` in local time; info and debug go
to stdout, errors to stderr; a newline is added only when the message lacks one
(the Go proxy's per-connection lines end in ``\\n`` already).

Structured (``--structured-logs``): one JSON object per line with the keys
``timestamp`` (RFC 3339, seconds), ``severity`` (DEBUG/INFO/ERROR) and
``message``, same stream split.

Quiet (``--quiet``): info and debug are dropped, errors stay, in the plain
format (the Go proxy replaces the structured logger in that case too).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import TextIO


def printable(text: str) -> str:
    """``text`` with control characters escaped, for strings a client chose.

    A database user name with a newline could otherwise forge a log line.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


class Logger:
    """The proxy's logger; a process has one, shared by every module."""

    def __init__(
        self,
        *,
        structured: bool = False,
        quiet: bool = False,
        debug: bool = False,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        # The Go proxy installs the plain logger after the structured one when
        # --quiet is set, so quiet always wins.
        self.structured = structured and not quiet
        self.quiet = quiet
        self.debug_enabled = debug and not quiet
        self._out = stdout
        self._err = stderr
        self._lock = threading.Lock()

    def _write(self, stream: TextIO, severity: str, message: str) -> None:
        now = time.time()
        if self.structured:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
            offset = time.strftime("%z", time.localtime(now))
            stamp += "Z" if offset in ("+0000", "-0000") else f"{offset[:3]}:{offset[3:]}"
            line = json.dumps(
                {"timestamp": stamp, "severity": severity, "message": message},
                ensure_ascii=False,
            )
            line += "\n"
        else:
            line = time.strftime("%Y/%m/%d %H:%M:%S ", time.localtime(now)) + message
            if not line.endswith("\n"):
                line += "\n"
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                self._write_failed(stream)

    @staticmethod
    def _write_failed(stream: TextIO) -> None:
        """A log line that cannot be written is dropped, as Go's log package does:
        logging must never stop a connection. When the reader of a pipe has gone
        (EPIPE, permanent), the stream is pointed at /dev/null, so the bytes left
        in its buffer cannot fail again at exit (Python would exit 120)."""
        try:
            stream.flush()
            return  # it was a passing error, and the buffer got out
        except (OSError, ValueError) as exc:
            if not isinstance(exc, BrokenPipeError):
                return
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, stream.fileno())
            finally:
                os.close(null)
            stream.flush()
        except (OSError, ValueError):
            pass

    @property
    def stdout(self) -> TextIO:
        return self._out if self._out is not None else sys.stdout

    @property
    def stderr(self) -> TextIO:
        return self._err if self._err is not None else sys.stderr

    def info(self, message: str, *args: object) -> None:
        if self.quiet:
            return
        self._write(self.stdout, "INFO", message % args if args else message)

    def debug(self, message: str, *args: object) -> None:
        if not self.debug_enabled:
            return
        self._write(self.stdout, "DEBUG", message % args if args else message)

    def error(self, message: str, *args: object) -> None:
        self._write(self.stderr, "ERROR", message % args if args else message)


class StdlibLogger(Logger):
    """The same calls, into the ``proxy`` logger of the ``logging`` module: what a
    program that imports the proxy gets (nothing printed); the CLI replaces it."""

    def __init__(self) -> None:
        super().__init__()
        import logging

        self._std = logging.getLogger("proxy")
        # A library prints nothing unless the program configures logging.
        if not any(isinstance(h, logging.NullHandler) for h in self._std.handlers):
            self._std.addHandler(logging.NullHandler())

    @property
    def debug_enabled(self) -> bool:
        return self._std.isEnabledFor(10)

    @debug_enabled.setter
    def debug_enabled(self, value: bool) -> None:
        pass  # the logging module's level decides

    def info(self, message: str, *args: object) -> None:
        self._std.info(message.rstrip("\n"), *args)

    def debug(self, message: str, *args: object) -> None:
        self._std.debug(message.rstrip("\n"), *args)

    def error(self, message: str, *args: object) -> None:
        self._std.error(message.rstrip("\n"), *args)


_logger: Logger = StdlibLogger()


def get_logger() -> Logger:
    return _logger


def configure(*, structured: bool = False, quiet: bool = False, debug: bool = False) -> Logger:
    """Replace the process logger (called once by the CLI)."""
    global _logger
    _logger = Logger(structured=structured, quiet=quiet, debug=debug)
    return _logger
