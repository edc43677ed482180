"""Fault switches of the emulator, changeable at run time from any thread.

``Emulator.faults`` applies to every instance; ``Instance.faults`` to one
instance and wins where set. Every switch is off (None/False/0) by default.

Admin API:
  admin_status          HTTP status to answer instead of the real response (e.g. 403, 404, 503)
  admin_status_count    answer it only this many times, then behave (None = until cleared)
  admin_status_method   "connectionInfo", "generateClientCertificate" or None for both
  admin_latency         seconds to wait before answering
  cert_lifetime         seconds the issued client certificates live (None = as requested)
Instance server (port 5433):
  mdx_error             answer the metadata exchange with ERROR and this message
  close_during_mdx      close the connection after reading the exchange request
  wrong_san             present a certificate (valid chain) whose SAN is another IP
  unknown_ca            present a certificate signed by a CA the client does not trust
  reset_after_bytes     reset (RST) the connection after relaying this many bytes to the client
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any

_ADMIN_METHODS = (None, "connectionInfo", "generateClientCertificate")


@dataclass
class Faults:
    admin_status: int | None = None
    admin_status_count: int | None = None
    admin_status_method: str | None = None
    admin_latency: float = 0.0
    cert_lifetime: float | None = None
    mdx_error: str | None = None
    close_during_mdx: bool = False
    wrong_san: bool = False
    unknown_ca: bool = False
    reset_after_bytes: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def set(self, **switches: Any) -> None:
        """Set several switches at once, e.g. ``faults.set(admin_status=503, admin_status_count=2)``."""
        names = {f.name for f in fields(self) if not f.name.startswith("_")}
        unknown = set(switches) - names
        if unknown:
            raise ValueError(f"unknown fault switch(es): {', '.join(sorted(unknown))}")
        if switches.get("admin_status_method") not in _ADMIN_METHODS:
            raise ValueError(f"admin_status_method must be one of {_ADMIN_METHODS}")
        with self._lock:
            for name, value in switches.items():
                setattr(self, name, value)

    def clear(self) -> None:
        with self._lock:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, f.default)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def take_admin_status(self, method: str) -> int | None:
        """The status to inject for this call, counting it down; None = answer normally."""
        with self._lock:
            if self.admin_status is None:
                return None
            if self.admin_status_method not in (None, method):
                return None
            if self.admin_status_count is not None:
                if self.admin_status_count <= 0:
                    return None
                self.admin_status_count -= 1
            return self.admin_status
