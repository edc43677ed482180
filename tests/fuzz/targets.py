"""Fuzz targets: every parser of outside input, fed arbitrary bytes.

Each target takes one input and either returns or raises the parser's own
rejection type (listed beside it); any other exception, a hang or a crash
is a finding. The targets are plain functions, so the same set runs under
atheris (``python -m tests.fuzz``, coverage-guided, for a set time) and
under hypothesis in the default test run (tests/unit/test_fuzz_targets.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Callable

from proxy import mdx, pgstartup
from proxy.adminapi import AdminAPIClient, _checked_dns_name, _checked_ip
from proxy.config import parse_instance_arg
from proxy.errors import AdminAPIError, BadCommandError
from proxy.health import HTTPServer, _BadRequest
from proxy.settings import load_config_file, parse_go_bool, parse_go_duration
from proxy.staticinfo import StaticInfoError
from proxy.staticinfo import load as load_static_info


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def mdx_request(data: bytes) -> None:
    with contextlib.suppress(mdx.MdxDecodeError):
        mdx.decode_request(data)


def mdx_response(data: bytes) -> None:
    with contextlib.suppress(mdx.MdxDecodeError):
        mdx.decode_response(data)


def mdx_length(data: bytes) -> None:
    with contextlib.suppress(mdx.MdxDecodeError):
        mdx.body_length(data[:4])


def read_startup_from(data: bytes) -> tuple[bytes | None, bytes, str]:
    """What pgstartup.read_startup returns for a client that sends ``data`` and
    closes: (packet or None, the bytes the proxy answered, "left" if the client
    went away first)."""

    async def run() -> tuple[bytes | None, bytes, str]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        with ours, theirs:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)
            try:
                packet: bytes | None = await asyncio.wait_for(pgstartup.read_startup(ours), 5)
                outcome = ""
            except pgstartup.ClientLeft:
                packet, outcome = None, "left"
            theirs.setblocking(False)
            try:
                answered = theirs.recv(65536)
            except BlockingIOError:
                answered = b""
            return packet, answered, outcome

    return asyncio.run(run())


def pg_startup(data: bytes) -> None:
    """The startup packets read under AUTO_IAM."""
    packet, _, _ = read_startup_from(data)
    if packet is not None:
        pgstartup.iam_user_hint(pgstartup.startup_user(packet))


def instance_argument(data: bytes) -> None:
    with contextlib.suppress(BadCommandError):
        parse_instance_arg(_text(data))


def go_values(data: bytes) -> None:
    """Go durations and booleans, as ALLOYDB_PROXY_* values and flags carry them."""
    for parse in (parse_go_duration, parse_go_bool):
        with contextlib.suppress(ValueError):
            parse(_text(data))


def _with_file(suffix: str, data: bytes, read: Callable[[str], object]) -> None:
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        os.write(fd, data)
        os.close(fd)
        read(path)
    finally:
        os.unlink(path)


def config_files(data: bytes) -> None:
    for suffix in (".toml", ".yaml", ".json"):
        with contextlib.suppress(BadCommandError):
            _with_file(suffix, data, load_config_file)


def static_connection_info(data: bytes) -> None:
    with contextlib.suppress(StaticInfoError):
        _with_file(".json", data, load_static_info)


def admin_api_reply(data: bytes) -> None:
    """An Admin API answer: the status in the first byte, the body after it."""
    status = 200 if not data or data[0] < 128 else 400 + data[0] % 200
    try:
        body = AdminAPIClient._decode(status, data[1:])
        for field in ("ipAddress", "publicIpAddress"):
            _checked_ip(body, field)
        _checked_dns_name(body, "pscDnsName")
        json.dumps(body)
    except AdminAPIError:
        pass


def http_request_head(data: bytes) -> None:
    """The health and admin servers' request reader."""

    async def run() -> None:
        reader = asyncio.StreamReader(limit=16384)
        reader.feed_data(data)
        reader.feed_eof()
        with contextlib.suppress(_BadRequest, ConnectionError):
            await HTTPServer({})._read_head(reader)

    asyncio.run(run())


def pem_chain(data: bytes) -> None:
    """A certificate chain, key and CA as the Admin API or a static file hands them over."""
    from proxy.dataplane import plane

    third = len(data) // 3
    with contextlib.suppress(ValueError, plane.TLSError):
        plane.TLSClientContext(data[:third], data[third : 2 * third], data[2 * third :])


_URI = b"projects/p/locations/us-central1/clusters/c/instances/i"
_STARTUP_BODY = b"user\0bench\0database\0bench\0\0"

# Valid inputs each run starts from (random bytes rarely look like a URI).
SEEDS: dict[str, list[bytes]] = {
    "mdx_request": [mdx.encode_request(mdx.MdxRequest("agent/1.0", mdx.AUTO_IAM, "token"))[4:]],
    "mdx_response": [mdx.encode_response(mdx.MdxResponse(mdx.OK, ""))[4:]],
    "mdx_length": [b"\x00\x00\x00\x10"],
    "pg_startup": [
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
        + (8 + len(_STARTUP_BODY)).to_bytes(4, "big")
        + b"\x00\x03\x00\x00"
        + _STARTUP_BODY
    ],
    "instance_argument": [_URI, _URI + b"?port=5000&address=127.0.0.1&psc&auto-iam-authn=true"],
    "go_values": [b"1m30s", b"1.5h", b"true", b"0"],
    "config_files": [b'port = "5000"\nauto-iam-authn = true\n', b'{"port": 5000}', b"port: 5000\n"],
    "static_connection_info": [
        b'{"publicKey": "k", "privateKey": "k", "' + _URI + b'": {"pemCertificateChain": ["x"],'
        b' "caCert": "x", "ipAddress": "127.0.0.1"}}'
    ],
    "admin_api_reply": [
        b'\x00{"ipAddress": "10.0.0.1", "pscDnsName": "a.b.alloydb.goog"}',
        b'\xf0{"error": {"code": 403, "message": "m", "status": "PERMISSION_DENIED", "details": []}}',
    ],
    "http_request_head": [b"GET /readiness HTTP/1.1\r\nHost: localhost\r\n\r\n"],
    "pem_chain": [b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n" * 3],
}


TARGETS: dict[str, Callable[[bytes], None]] = {
    "mdx_request": mdx_request,
    "mdx_response": mdx_response,
    "mdx_length": mdx_length,
    "pg_startup": pg_startup,
    "instance_argument": instance_argument,
    "go_values": go_values,
    "config_files": config_files,
    "static_connection_info": static_connection_info,
    "admin_api_reply": admin_api_reply,
    "http_request_head": http_request_head,
    "pem_chain": pem_chain,
}
