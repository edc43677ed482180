"""Who a bearer token stands for, and what the token allows (scopes, expiry)."""

from __future__ import annotations

import time
from dataclasses import dataclass

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
ALLOYDB_LOGIN = "https://www.googleapis.com/auth/alloydb.login"


@dataclass(frozen=True)
class Principal:
    """Who a token stands for, and what the token itself allows.

    ``can_connect``: the principal has alloydb.instances.connect (and may get
    client certificates). ``scopes``: the token's OAuth2 scopes; the Admin API
    needs cloud-platform, the metadata exchange alloydb.login or cloud-platform.
    ``expires_at``: UNIX time after which the token is refused (None = never).
    """

    email: str
    can_connect: bool = True
    scopes: frozenset[str] = frozenset({CLOUD_PLATFORM, ALLOYDB_LOGIN})
    expires_at: float | None = None

    def expired(self) -> bool:
        return self.expires_at is not None and time.time() >= self.expires_at

    def may_log_in(self) -> bool:
        """Its token is good for the metadata exchange (connect check, IAM login)."""
        return bool(self.scopes & {CLOUD_PLATFORM, ALLOYDB_LOGIN})
