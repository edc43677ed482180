"""Error hierarchy: each error carries the instance it is about and its cause.

The string forms mirror the Go connector's ``errtype`` package, because users
grep logs for them, e.g.::

    dial error: failed to dial (instance URI = "p.r.c.i"): connection refused
    refresh error: failed to get instance metadata (instance URI = "p.r.c.i"): ...
    config error: instance does not have IP of type "PUBLIC" (instance URI = "p.r.c.i")

Only the CLI maps errors to exit codes.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base class for every error the proxy reports."""


class BadCommandError(ProxyError, ValueError):
    """Invalid command line, environment or configuration (``Error: <msg>`` + usage, exit 1);
    ``proxy.ConfigError`` for programs using ``proxy.Proxy``."""


class StartupError(ProxyError):
    """The proxy could not start (``unable to start: ...``)."""


class _InstanceError(ProxyError):
    prefix = ""

    def __init__(self, message: str, instance: str, cause: BaseException | str | None = None):
        self.message = message
        self.instance = instance
        self.cause = cause
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f'{self.prefix}: {self.message} (instance URI = "{self.instance}")'
        if self.cause is not None and str(self.cause):
            text += f": {self.cause}"
        return text


class ConfigError(_InstanceError):
    """The instance cannot be used as configured (missing IP type, bad URI)."""

    prefix = "config error"


class RefreshError(_InstanceError):
    """The Admin API did not give us usable connection info or a certificate."""

    prefix = "refresh error"

    def __init__(
        self,
        message: str,
        instance: str,
        cause: BaseException | str | None = None,
        *,
        status: int | None = None,
        reason: str = "",
    ):
        self.status = status
        self.reason = reason
        super().__init__(message, instance, cause)


class DialError(_InstanceError):
    """TCP, TLS or metadata-exchange failure while connecting to an instance."""

    prefix = "dial error"


class CredentialsError(ProxyError):
    """No token could be had from the configured source (never contains a secret)."""


class MetadataExchangeError(ProxyError):
    """The server refused the metadata exchange; the text is the server's own, verbatim."""


class AdminAPIError(ProxyError):
    """A non-2xx answer from the Admin API, formatted like Go's ``googleapi.Error``."""

    def __init__(self, status: int, message: str, reason: str = "", *, codes: str = ""):
        self.status = status
        self.api_message = message
        self.reason = reason
        self.codes = codes or reason  # the error's reasons (ErrorInfo), for metrics
        text = f"googleapi: Error {status}: {message}"
        if reason:
            text += f", {reason}"
        super().__init__(text)


class AdminAPIUnreachable(ProxyError):
    """The Admin API gave no HTTP answer: unreachable, TLS failure, or past the deadline."""
