"""The one check of a server name before it is dialled, for both data planes.

A name that cannot be verified against the server certificate (empty, a
scoped IPv6 address, control characters) is refused before any byte is sent.
"""

from __future__ import annotations


def server_name_problem(name: str) -> str:
    """Why ``name`` cannot be checked against the server certificate ('' if it can)."""
    if not name:
        return "empty"
    if "%" in name:
        return "a scoped address (with %) cannot be verified"
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in name):
        return "control characters, spaces or NUL"
    return ""
