"""Let the emulator's TLS servers send their alert when a handshake fails.

When OpenSSL refuses a client certificate it writes an alert for the peer;
asyncio (3.11 and later) then aborts the transport without sending it, so the
client sees a bare EOF. AlloyDB's server sends the alert, and a client's error
wording and refresh decision depend on it, so the emulator flushes the alert
before asyncio closes. The change is to asyncio's SSLProtocol class, made once
per process when an emulator starts, and acts on server-side connections only;
it only sends bytes OpenSSL meant to send.
Pythons whose asyncio has another TLS layout (3.10) are left as they are.
"""

from __future__ import annotations

import contextlib
from typing import Any


def install() -> None:
    from asyncio import sslproto

    protocol: Any = sslproto.SSLProtocol
    if getattr(protocol, "_sends_handshake_alerts", False):
        return
    if not hasattr(protocol, "_on_handshake_complete") or not hasattr(
        protocol, "_process_outgoing"
    ):
        return
    original = protocol._on_handshake_complete

    def on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
        # Servers only: the proxy's own client side in the same process (tests)
        # must behave as it does in production.
        if handshake_exc is not None and getattr(self, "_server_side", False):
            with contextlib.suppress(Exception):
                alert = self._outgoing.read()
                if alert:
                    self._transport.write(alert)
        original(self, handshake_exc)

    protocol._on_handshake_complete = on_handshake_complete
    protocol._sends_handshake_alerts = True
