"""The first PostgreSQL packets a client sends, read by the proxy under AUTO_IAM.

With automatic IAM login the proxy reads the client's StartupMessage while it
dials the instance: it answers an SSLRequest or GSSENCRequest with ``N``
itself (the tunnel is already TLS, and the AlloyDB server answers ``N`` too),
then forwards the StartupMessage unchanged as the first bytes after the
metadata exchange. Seeing the user name lets it warn about the most common
IAM mistake: a service-account user spelled with ``.gserviceaccount.com``.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from proxy.log import printable

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
PROTOCOL_3 = 196608
MAX_STARTUP = 10000
SERVICE_ACCOUNT_SUFFIX = ".gserviceaccount.com"


class ClientLeft(ConnectionError):
    """The client went away before its startup message: its own choice, not a dial failure."""


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ClientLeft("client closed the connection before its startup message")
        data += chunk
    return data


async def read_startup(sock: socket.socket) -> bytes:
    """Answer encryption requests with N; return the next packet, raw, to forward."""
    loop = asyncio.get_running_loop()
    while True:
        header = await _recv_exactly(sock, 8)
        length, code = struct.unpack(">II", header)
        if length == 8 and code in (SSL_REQUEST, GSSENC_REQUEST):
            await loop.sock_sendall(sock, b"N")
            continue
        if not 8 < length <= MAX_STARTUP:
            return header  # not ours to judge: the server will answer it
        return header + await _recv_exactly(sock, length - 8)


def startup_user(packet: bytes) -> str | None:
    """The ``user`` parameter of a protocol 3 StartupMessage, if that is what this is."""
    if len(packet) < 8 or struct.unpack(">I", packet[4:8])[0] != PROTOCOL_3:
        return None
    parts = packet[8:].split(b"\0")
    params = dict(zip(parts[0::2], parts[1::2], strict=False))
    user = params.get(b"user")
    return user.decode("utf-8", "replace") if user is not None else None


def iam_user_hint(user: str | None) -> str | None:
    """A log line for a likely IAM user name mistake (the client's text escaped)."""
    if user and user.endswith(SERVICE_ACCOUNT_SUFFIX):
        shown = printable(user)
        return (
            f'IAM database user "{shown}" ends in {SERVICE_ACCOUNT_SUFFIX}: AlloyDB names service '
            f'accounts without it, log in as "{shown[: -len(SERVICE_ACCOUNT_SUFFIX)]}"'
        )
    return None
