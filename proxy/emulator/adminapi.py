"""The emulator's Admin API: a small HTTP/1.1 server on loopback.

Routes (``{ver}`` is v1, v1beta or v1alpha; query strings are ignored):
  GET  /{ver}/projects/P/locations/R/clusters/C/instances/I/connectionInfo
  POST /{ver}/projects/P/locations/R/clusters/C:generateClientCertificate
Control routes for fault switches from outside the process:
  POST /emulator/v1/faults    JSON object of switches (see faults.py); {"clear": true} resets
  GET  /emulator/v1/requests  the request log as JSON
Errors use Google's JSON error body. Requests need ``Authorization: Bearer``
with a known token (unless the emulator accepts any token).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from proxy.emulator.pki import load_public_key

if TYPE_CHECKING:
    from proxy.emulator.emulator import Emulator

_CONNECTION_INFO = re.compile(
    r"^/(v1|v1beta|v1alpha)/(projects/[^/]+/locations/[^/]+/clusters/[^/]+/instances/[^/]+)/connectionInfo$"
)
_CLIENT_CERT = re.compile(
    r"^/(v1|v1beta|v1alpha)/(projects/[^/]+/locations/[^/]+/clusters/[^/:]+):generateClientCertificate$"
)
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_MAX_BODY = 1 << 20


@dataclass(frozen=True)
class AdminRequest:
    method: str
    path: str
    token: str
    user_agent: str
    body: dict[str, Any] | None


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict[str, Any]:
    return {
        "error": {
            "code": status,
            "message": message,
            "status": _STATUS_NAMES.get(
                status, HTTPStatus(status).phrase.upper().replace(" ", "_")
            ),
        }
    }


def _parse_duration(text: Any) -> dt.timedelta:
    if text is None:
        return dt.timedelta(hours=1)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(text))
    if not match:
        raise HttpError(400, f'invalid certDuration "{text}"')
    seconds = float(match.group(1))
    return dt.timedelta(seconds=min(max(seconds, 3600), 86400))


class AdminAPIServer:
    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, target, _version = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length > _MAX_BODY:
                    raise HttpError(400, "request body too large")
                raw = await reader.readexactly(length) if length else b""
                status, body = await self._handle(method, target.split("?", 1)[0], headers, raw)
                payload = json.dumps(body).encode()
                writer.write(
                    f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                    "Content-Type: application/json; charset=UTF-8\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode("latin-1")
                    + payload
                )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, HttpError):
            return
        finally:
            writer.close()

    async def _handle(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        emu = self.emu
        body: dict[str, Any] | None = None
        if raw:
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                return 400, error_body(400, "request body is not valid JSON")
            body = parsed if isinstance(parsed, dict) else None
        token = headers.get("authorization", "")
        token = token[7:] if token.lower().startswith("bearer ") else ""
        emu.admin_requests.append(
            AdminRequest(method, path, token, headers.get("user-agent", ""), body)
        )

        if path == "/emulator/v1/faults" and method == "POST":
            try:
                if body and body.pop("clear", False):
                    emu.faults.clear()
                emu.faults.set(**(body or {}))
            except (TypeError, ValueError) as exc:
                return 400, error_body(400, str(exc))
            return 200, emu.faults.as_dict()
        if path == "/emulator/v1/requests" and method == "GET":
            return 200, {"requests": [r.__dict__ for r in emu.admin_requests]}

        info = _CONNECTION_INFO.match(path)
        cert = _CLIENT_CERT.match(path)
        if info and method == "GET":
            kind, name = "connectionInfo", info.group(2)
        elif cert and method == "POST":
            kind, name = "generateClientCertificate", cert.group(2)
        else:
            return 404, error_body(404, f"method {method} {path} not found")

        try:
            self._authorize(token)
            if emu.faults.admin_latency:
                await asyncio.sleep(emu.faults.admin_latency)
            forced = emu.faults.take_admin_status(kind)
            if forced is not None:
                raise HttpError(forced, f"injected fault: {HTTPStatus(forced).phrase}")
            if kind == "connectionInfo":
                return 200, self._connection_info(name)
            return 200, await self._client_certificate(name, body or {})
        except HttpError as exc:
            return exc.status, error_body(exc.status, exc.message)

    def _authorize(self, token: str) -> None:
        if not token:
            raise HttpError(401, "Request is missing required authentication credential.")
        if self.emu.tokens is None:
            return
        principal = self.emu.tokens.get(token)
        if principal is None:
            raise HttpError(401, "Request had invalid authentication credentials.")
        if not principal.can_connect:
            raise HttpError(
                403,
                f"Permission 'alloydb.clusters.generateClientCertificate' denied for {principal.email}",
            )

    def _connection_info(self, name: str) -> dict[str, Any]:
        inst = self.emu.instances.get(name)
        if inst is None:
            raise HttpError(404, f"Resource '{name}' was not found")
        out: dict[str, Any] = {"name": f"{name}/connectionInfo", "instanceUid": inst.uid}
        out["ipAddress"] = inst.private_ip
        if inst.public_ip:
            out["publicIpAddress"] = inst.public_ip
        if inst.psc_dns_name:
            out["pscDnsName"] = inst.psc_dns_name + "."
        return out

    async def _client_certificate(self, cluster: str, body: dict[str, Any]) -> dict[str, Any]:
        ca = self.emu.clusters.get(cluster)
        if ca is None:
            raise HttpError(404, f"Resource '{cluster}' was not found")
        try:
            public_key = load_public_key(str(body.get("publicKey", "")))
        except (ValueError, TypeError) as exc:
            raise HttpError(400, f"invalid publicKey: {exc}") from None
        lifetime = _parse_duration(body.get("certDuration"))
        if self.emu.faults.cert_lifetime is not None:
            lifetime = dt.timedelta(seconds=self.emu.faults.cert_lifetime)
        leaf = await asyncio.get_running_loop().run_in_executor(
            None, ca.client_certificate, public_key, lifetime
        )
        self.emu.issued[leaf.serial_number] = bool(body.get("useMetadataExchange", False))
        return {"pemCertificateChain": ca.chain_pems(leaf), "caCert": ca.root_pem}
