"""The emulator's Admin API: a small HTTP/1.1 server on loopback.

Routes (``{ver}`` is v1, v1beta or v1alpha; query strings are ignored):
  GET  /{ver}/projects/P/locations/R/clusters/C/instances/I/connectionInfo
  POST /{ver}/projects/P/locations/R/clusters/C:generateClientCertificate
Control routes, for fault switches from outside the process (no token needed):
  GET  /emulator/v1/faults    the global switches and every instance's
  POST /emulator/v1/faults    JSON object of switches (see faults.py); ``"instance": URI``
                              targets one instance, ``"clear": true`` resets first
  GET  /emulator/v1/requests  the Admin API request log and the metadata exchanges
Errors use Google's JSON error body; authentication, permission and quota
errors carry an ErrorInfo in ``details``, as the service's do. Requests need ``Authorization: Bearer`` with a known,
unexpired token that has the cloud-platform scope and whose principal may
connect (any non-empty token when the emulator was given ``tokens=None``).
An encoded slash (``%2F``) in a path is not a separator. ``v1`` answers without
``pscDnsName``, as that API version has no such field. Request bodies are
checked as the service checks them: JSON content type, known fields only,
typed values, one PEM RSA key of at least 2048 bits with exponent 65537,
``certDuration`` within 1-24 h. Connections are kept alive between requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import re
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from proxy.emulator.faults import Faults
from proxy.emulator.pki import load_public_key
from proxy.emulator.principals import CLOUD_PLATFORM

if TYPE_CHECKING:
    from proxy.emulator.emulator import Emulator
    from proxy.emulator.instance import Instance

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
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MAX_BODY = 1 << 20
_MAX_HEADERS = 100
_MIN_CERT, _MAX_CERT = 3600.0, 86400.0  # the API's documented 1-24 h range


@dataclass(frozen=True)
class AdminRequest:
    """One Admin API request as received; ``token`` is the bearer token ("" if none)."""

    method: str
    path: str
    token: str
    user_agent: str
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    at: float = field(default_factory=time.monotonic)  # when it arrived


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason  # the ErrorInfo reason in ``details``
        self.headers = headers or {}
        self.raw = raw  # a body to send as it is instead of the JSON error


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_body(status: int, message: str, reason: str | None = None) -> dict[str, Any]:
    """Google's JSON error envelope; with a reason, the ErrorInfo detail too."""
    name = _STATUS_NAMES.get(status) or _phrase(status).upper().replace(" ", "_")
    error: dict[str, Any] = {"code": status, "message": message, "status": name}
    if reason:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {"service": "alloydb.googleapis.com"},
            }
        ]
    return {"error": error}


def _decoded_path(target: str) -> str:
    """The path without its query, percent-decoded except for ``%2F``: an encoded
    slash is part of a name, never a separator."""
    path = target.split("?", 1)[0]
    return unquote(re.sub("%2[Ff]", "%252F", path))


def parse_duration(text: Any) -> dt.timedelta:
    """A protobuf Duration in JSON (``"3600s"``) within 1-24 h; absent = 1 h."""
    if text is None:
        return dt.timedelta(seconds=_MIN_CERT)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", text) if isinstance(text, str) else None
    if not match:
        raise HttpError(
            400,
            f"Invalid value at 'cert_duration' (type.googleapis.com/google.protobuf.Duration), {json.dumps(text)}",
        )
    seconds = float(match.group(1))
    if not _MIN_CERT <= seconds <= _MAX_CERT:
        raise HttpError(400, f"cert_duration must be between 1h and 24h, got {text}")
    return dt.timedelta(seconds=seconds)


#: generateClientCertificate's request fields, as JSON names and proto names.
_CERT_FIELDS = {
    "parent": "parent",
    "requestId": "request_id",
    "pemCsr": "pem_csr",
    "certDuration": "cert_duration",
    "publicKey": "public_key",
    "useMetadataExchange": "use_metadata_exchange",
}
_PEM_BLOCK = re.compile(
    r"\s*-----BEGIN (RSA )?PUBLIC KEY-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1?PUBLIC KEY-----\s*"
)


def _certificate_request(body: dict[str, Any]) -> dict[str, Any]:
    """The body under its JSON names, refused as the service refuses it."""
    by_proto = {proto: name for name, proto in _CERT_FIELDS.items()}
    out: dict[str, Any] = {}
    for key, value in body.items():
        name = key if key in _CERT_FIELDS else by_proto.get(key)
        if name is None:
            raise HttpError(
                400, f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
            )
        if name in out:
            raise HttpError(
                400,
                f"Invalid JSON payload received. Field '{_CERT_FIELDS[name]}' is given twice.",
            )
        if value is None:
            continue  # proto3 JSON: null is the field's default
        out[name] = value
    flag = out.get("useMetadataExchange", False)
    if not isinstance(flag, bool):
        raise HttpError(
            400, f"Invalid value at 'use_metadata_exchange' (TYPE_BOOL), {json.dumps(flag)}"
        )
    for name in ("parent", "requestId", "pemCsr", "publicKey"):
        if name in out and not isinstance(out[name], str):
            raise HttpError(
                400,
                f"Invalid value at '{_CERT_FIELDS[name]}' (TYPE_STRING), {json.dumps(out[name])}",
            )
    return out


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    """One HTTP/1.1 request: (method, target, headers, body); None at a clean EOF."""
    request_line = await reader.readline()
    if not request_line.strip():
        return None
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {"_version": version}
    for _ in range(_MAX_HEADERS):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise HttpError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    else:
        raise HttpError(400, "too many headers")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            body += await reader.readexactly(size)
            await reader.readline()
            if len(body) > _MAX_BODY:
                raise HttpError(413, "request body too large")
        return method, target, headers, bytes(body)
    try:
        length = int(headers.get("content-length", "0") or 0)
    except ValueError:
        raise HttpError(400, "bad Content-Length") from None
    if not 0 <= length <= _MAX_BODY:
        raise HttpError(413, "request body too large")
    return method, target, headers, await reader.readexactly(length) if length else b""


class AdminAPIServer:
    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            # Kept-alive client connections would hold wait_closed() open (3.12+).
            for writer in list(self._writers):
                writer.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                keep_alive = True
                try:
                    request = await _read_request(reader)
                    if request is None:
                        return
                    method, target, headers, raw = request
                    extra: dict[str, str] = {}
                    raw_body: bytes | None = None
                    try:
                        status, body = await self._handle(
                            method, _decoded_path(target), headers, raw
                        )
                    except HttpError as exc:  # an API error: the connection stays usable
                        status, body = exc.status, error_body(exc.status, exc.message, exc.reason)
                        extra, raw_body = exc.headers, exc.raw
                    keep_alive = headers.get("connection", "").lower() != "close" and (
                        headers["_version"] != "HTTP/1.0"
                        or headers.get("connection", "").lower() == "keep-alive"
                    )
                except HttpError as exc:
                    # The stream may be out of sync after a malformed request: answer, then close.
                    status, body, keep_alive = (
                        exc.status,
                        error_body(exc.status, exc.message),
                        False,
                    )
                    extra, raw_body = {}, None
                payload = json.dumps(body).encode() if raw_body is None else raw_body
                head = (
                    f"HTTP/1.1 {status} {_phrase(status)}\r\n"
                    "Content-Type: application/json; charset=UTF-8\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                    + f"Content-Length: {len(payload)}\r\n"
                    f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
                )
                writer.write(head.encode("latin-1") + payload)
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, UnicodeError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _handle(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        emu = self.emu
        body: dict[str, Any] | None = None
        bad_json = False
        if raw:
            try:
                parsed = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad_json = True
            else:
                body = parsed if isinstance(parsed, dict) else None
                bad_json = body is None
        if path.startswith("/emulator/v1/"):
            return self._control(method, path, body, bad_json)  # not logged: not the API

        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        emu.admin_requests.append(
            AdminRequest(
                method,
                path,
                token,
                headers.get("user-agent", ""),
                body,
                {k: v for k, v in headers.items() if not k.startswith("_")},
            )
        )

        info = _CONNECTION_INFO.match(path)
        cert = _CLIENT_CERT.match(path)
        if info and method == "GET":
            kind, version, name = "connectionInfo", info.group(1), info.group(2)
            scoped = [emu.instances[name]] if name in emu.instances else []
        elif cert and method == "POST":
            kind, version, name = "generateClientCertificate", cert.group(1), cert.group(2)
            scoped = [i for i in list(emu.instances.values()) if i.cluster == name]
        else:
            return 404, error_body(404, f"method {method} {path} not found")

        self._authorize(token)
        latency = max([emu.faults.admin_latency] + [i.faults.admin_latency for i in scoped])
        if latency:
            await asyncio.sleep(latency)
        self._raise_forced_status(kind, scoped)
        if kind == "connectionInfo":
            return 200, self._connection_info(name, version)
        kind_header = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind_header != "application/json":
            raise HttpError(
                400,
                "Invalid JSON payload received. The request's Content-Type must be "
                f"application/json, not {kind_header or 'absent'}.",
            )
        if bad_json:
            raise HttpError(400, "Invalid JSON payload received.")
        return 200, await self._client_certificate(name, body or {}, scoped)

    def _raise_forced_status(self, kind: str, scoped: list[Instance]) -> None:
        """The status a fault switch injects, as the service would word it."""
        for faults in [i.faults for i in scoped] + [self.emu.faults]:
            status = faults.take_admin_status(kind)
            if status is None:
                continue
            if status == 200:  # admin_malformed: a reply cut off inside its JSON
                raise HttpError(200, "malformed", raw=b'{"pemCertificateChain": ["-----BEGIN')
            if status == 429:
                retry_after = next(
                    (
                        f.admin_retry_after
                        for f in [faults, self.emu.faults]
                        if f.admin_retry_after is not None
                    ),
                    None,
                )
                raise HttpError(
                    429,
                    "Quota exceeded for quota metric 'Requests' and limit 'Requests per "
                    "minute' of service 'alloydb.googleapis.com'.",
                    "RATE_LIMIT_EXCEEDED",
                    {"Retry-After": str(retry_after)} if retry_after is not None else None,
                )
            raise HttpError(status, f"injected fault: {_phrase(status)}")

    def _control(
        self, method: str, path: str, body: dict[str, Any] | None, bad_json: bool
    ) -> tuple[int, dict[str, Any]]:
        emu = self.emu
        if path == "/emulator/v1/faults" and method == "GET":
            return 200, {
                "faults": emu.faults.as_dict(),
                "instances": {uri: i.faults.as_dict() for uri, i in list(emu.instances.items())},
            }
        if path == "/emulator/v1/faults" and method == "POST":
            if bad_json:
                return 400, error_body(400, "invalid JSON payload received")
            switches = dict(body or {})
            target: Faults = emu.faults
            uri = switches.pop("instance", None)
            if uri is not None:
                if uri not in emu.instances:
                    return 404, error_body(404, f"instance {uri!r} not found")
                target = emu.instances[uri].faults
            try:
                if switches.pop("clear", False):
                    target.clear()
                target.set(**switches)
            except (TypeError, ValueError) as exc:
                return 400, error_body(400, str(exc))
            return 200, target.as_dict()
        if path == "/emulator/v1/requests" and method == "GET":
            requests = [dataclasses.asdict(r) for r in list(emu.admin_requests)]
            exchanges = [
                {"instance": uri, **dataclasses.asdict(r)} for uri, r in list(emu.mdx_requests)
            ]
            if not emu.reveal_tokens:
                for entry in requests:
                    entry["token"] = _redacted(entry["token"])
                    for name in list(entry.get("headers") or {}):
                        if name.lower() == "authorization":
                            entry["headers"][name] = _redacted(entry["headers"][name])
                for entry in exchanges:
                    entry["oauth2_token"] = _redacted(entry["oauth2_token"])
            return 200, {"requests": requests, "mdx": exchanges}
        return 404, error_body(404, f"method {method} {path} not found")

    def _authorize(self, token: str) -> None:
        if not token:
            raise HttpError(
                401,
                "Request is missing required authentication credential. "
                "Expected OAuth 2 access token, login cookie or other valid authentication "
                "credential.",
                "CREDENTIALS_MISSING",
            )
        tokens = self.emu.tokens
        if tokens is None:
            return
        principal = tokens.get(token)
        if principal is None or principal.expired():
            raise HttpError(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
                "ACCESS_TOKEN_EXPIRED"
                if principal is not None
                else "ACCESS_TOKEN_TYPE_UNSUPPORTED",
            )
        if CLOUD_PLATFORM not in principal.scopes:
            raise HttpError(
                403,
                "Request had insufficient authentication scopes.",
                "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
            )
        if not principal.can_connect:
            raise HttpError(
                403,
                f"Permission denied for {principal.email} (or it may not exist).",
                "IAM_PERMISSION_DENIED",
            )

    def _connection_info(self, name: str, version: str) -> dict[str, Any]:
        inst = self.emu.instances.get(name)
        if inst is None:
            raise HttpError(404, f"Resource '{name}' was not found")
        faults = (inst.faults, self.emu.faults)
        out: dict[str, Any] = {"name": f"{name}/connectionInfo", "instanceUid": inst.uid}
        if inst.private_ip and not any(f.no_private_ip for f in faults):
            out["ipAddress"] = inst.private_ip
        if inst.public_ip and not any(f.no_public_ip for f in faults):
            out["publicIpAddress"] = inst.public_ip
        # v1's ConnectionInfo has no pscDnsName field.
        if version != "v1" and inst.psc_dns_name and not any(f.no_psc for f in faults):
            out["pscDnsName"] = inst.psc_dns_name + "."
        return out

    async def _client_certificate(
        self, cluster: str, body: dict[str, Any], scoped: list[Instance]
    ) -> dict[str, Any]:
        ca = self.emu.clusters.get(cluster)
        if ca is None:
            raise HttpError(404, f"Resource '{cluster}' was not found")
        body = _certificate_request(body)
        parent = body.get("parent")
        if parent not in (None, "", cluster):
            raise HttpError(400, f"parent {parent!r} does not match the URL")
        text = body.get("publicKey", "")
        if not _PEM_BLOCK.fullmatch(text):
            raise HttpError(400, "invalid public key: expected one PEM public key block")
        try:
            public_key = load_public_key(text)
        except (ValueError, TypeError) as exc:
            raise HttpError(400, f"invalid public key: {exc}") from None
        numbers = public_key.public_numbers()
        if public_key.key_size < 2048 or numbers.e != 65537:
            raise HttpError(
                400,
                "invalid public key: RSA keys must have at least 2048 bits and exponent 65537",
            )
        lifetime = parse_duration(body.get("certDuration"))
        overrides = [i.faults.cert_lifetime for i in scoped] + [self.emu.faults.cert_lifetime]
        override = next((s for s in overrides if s is not None), None)
        if override is not None:
            lifetime = dt.timedelta(seconds=float(override))
        use_mdx = body.get("useMetadataExchange", False) is True
        leaf = await asyncio.get_running_loop().run_in_executor(
            None, ca.client_certificate, public_key, lifetime
        )
        self.emu.issued[leaf.serial_number] = use_mdx
        return {"pemCertificateChain": ca.chain_pems(leaf), "caCert": ca.root_pem}


def _redacted(secret: str) -> str:
    """Enough to tell tokens apart in a log, not enough to use one."""
    return f"REDACTED({len(secret)} chars)" if secret else ""
