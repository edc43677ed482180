"""Fault switches of the emulator, changeable at run time from any thread.

``Emulator.faults`` applies to every instance; ``Instance.faults`` to one
instance and wins where set (for the cluster-scoped generateClientCertificate,
an instance's admin switches apply to calls for its cluster). Every switch is
off (None/False/0) by default. Set several at once with ``faults.set(...)``,
reset with ``faults.clear()``; from outside the process use the Admin API's
``POST /emulator/v1/faults`` (see ``proxy.emulator.__main__``).

Admin API:
  admin_status          HTTP status to answer instead of the real response (403, 404, 503, any)
  admin_status_count    answer it only this many times, then behave (None = until cleared)
  admin_status_method   "connectionInfo", "generateClientCertificate" or None for both
  admin_retry_after     with admin_status 429: the Retry-After header's seconds (None = no header)
  admin_malformed       answer 200 with a body cut off inside its JSON (counted by
                        admin_status_count and limited by admin_status_method like admin_status)
  admin_latency         seconds to wait before answering
  cert_lifetime         seconds the issued client certificates live (None = as requested)
  no_private_ip         connectionInfo omits ipAddress (a PSC-only or public-only instance)
  no_public_ip          connectionInfo omits publicIpAddress
  no_psc                connectionInfo omits pscDnsName
Instance server (port 5433):
  mdx_error             answer the metadata exchange with ERROR and this message
  close_during_mdx      abort the connection after reading the exchange request, before answering
  wrong_san             present a certificate (valid chain) whose SAN is another IP
  unknown_ca            present a certificate signed by a CA the client does not trust
  no_session_resumption issue no TLS session tickets, so every handshake is a full one
  reject_client_certs   refuse every client certificate (an "unknown ca" alert; under
                        TLS 1.3 the client sees it on its first read)
  reset_after_bytes     reset (RST) the connection after relaying this many bytes to the client
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any

ADMIN_METHODS = (None, "connectionInfo", "generateClientCertificate")


@dataclass
class Faults:
    admin_status: int | None = None
    admin_status_count: int | None = None
    admin_status_method: str | None = None
    admin_retry_after: int | None = None
    admin_malformed: bool = False
    admin_latency: float = 0.0
    cert_lifetime: float | None = None
    no_private_ip: bool = False
    no_public_ip: bool = False
    no_psc: bool = False
    mdx_error: str | None = None
    close_during_mdx: bool = False
    wrong_san: bool = False
    unknown_ca: bool = False
    reject_client_certs: bool = False
    no_session_resumption: bool = False
    reset_after_bytes: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.startswith("_")]

    def set(self, **switches: Any) -> None:
        """Set several switches at once, e.g. ``faults.set(admin_status=503, admin_status_count=2)``."""
        unknown = set(switches) - set(self.names())
        if unknown:
            raise ValueError(f"unknown fault switch(es): {', '.join(sorted(unknown))}")
        if switches.get("admin_status_method") not in ADMIN_METHODS:
            raise ValueError(f"admin_status_method must be one of {ADMIN_METHODS}")
        retry_after = switches.get("admin_retry_after")
        if retry_after is not None and not (
            isinstance(retry_after, int) and not isinstance(retry_after, bool) and retry_after >= 0
        ):
            raise ValueError(f"admin_retry_after must be whole seconds, got {retry_after!r}")
        status = switches.get("admin_status")
        if status is not None and not (isinstance(status, int) and 100 <= status <= 599):
            raise ValueError(f"admin_status must be an HTTP status code, got {status!r}")
        with self._lock:
            for name, value in switches.items():
                setattr(self, name, value)

    def clear(self) -> None:
        with self._lock:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, f.default)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {name: getattr(self, name) for name in self.names()}

    def take_admin_status(self, method: str) -> int | None:
        """The status to inject for this call, counting it down; None = answer
        normally; 200 = answer with a malformed body (admin_malformed)."""
        with self._lock:
            if self.admin_status is None and not self.admin_malformed:
                return None
            if self.admin_status_method not in (None, method):
                return None
            if self.admin_status_count is not None:
                if self.admin_status_count <= 0:
                    return None
                self.admin_status_count -= 1
            return 200 if self.admin_malformed else self.admin_status
