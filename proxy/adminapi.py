"""AlloyDB Admin API client: connectionInfo and generateClientCertificate over REST.

Uses API version v1beta (it carries ``pscDnsName``; v1 does not). Requests run
in a worker thread through ``requests`` so that proxies (``HTTPS_PROXY``) and
TLS work as users expect, without blocking the event loop. Only HTTP 503 is
retried, with the backoff the Google client libraries use (1 s, x1.3, capped
at 60 s, within a 60 s deadline, with jitter).

Each request has a total deadline (REQUEST_TIMEOUT), not only the per-socket
timeout of ``requests``: a server that trickles its answer cannot hold a
dial, nor, once the headers are in, a worker thread (the body is read against
the deadline). Headers are bounded only per read, as ``requests`` does. A
request that gets no HTTP answer raises AdminAPIUnreachable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from proxy import workers
from proxy.config import InstanceURI
from proxy.credentials import TokenSource
from proxy.errors import AdminAPIError, AdminAPIUnreachable

if TYPE_CHECKING:
    import requests

API_VERSION = "v1beta"
CERT_DURATION = "3600s"
REQUEST_TIMEOUT = 60.0
#: Both answers are a few KiB; anything this large is not the Admin API.
MAX_RESPONSE = 4 * 1024 * 1024

_BACKOFF_INITIAL = 1.0
_BACKOFF_MAX = 60.0
_BACKOFF_MULTIPLIER = 1.3
_RETRY_DEADLINE = 60.0


@dataclass(frozen=True)
class InstanceAddresses:
    private_ip: str
    public_ip: str
    psc_dns_name: str  # trailing dot removed

    def as_map(self) -> dict[str, str]:
        """Only the address kinds the instance has, keyed like the Go connector."""
        found = {"PRIVATE": self.private_ip, "PUBLIC": self.public_ip, "PSC": self.psc_dns_name}
        return {kind: addr for kind, addr in found.items() if addr}


@dataclass(frozen=True)
class ClientCertificate:
    chain_pem: list[str]  # [leaf, intermediate..., root]
    ca_pem: str


class AdminAPIClient:
    def __init__(
        self,
        endpoint: str,
        tokens: TokenSource,
        user_agent: str,
        quota_project: str | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._tokens = tokens
        self._user_agent = user_agent
        self._quota_project = quota_project
        # requests (and urllib3) take about 40 ms to import: not at start-up,
        # but on the worker thread of the first call.
        self._session: requests.Session | None = None
        self._session_lock = threading.Lock()

    def close(self) -> None:
        with self._session_lock:
            if self._session is not None:
                self._session.close()

    def _get_session(self) -> requests.Session:
        with self._session_lock:
            if self._session is None:
                import requests

                self._session = requests.Session()
            return self._session

    async def connection_info(self, uri: InstanceURI) -> InstanceAddresses:
        body = await self._call("GET", f"{uri.name}/connectionInfo", uri.name, None)
        return InstanceAddresses(
            private_ip=_checked_ip(body, "ipAddress"),
            public_ip=_checked_ip(body, "publicIpAddress"),
            psc_dns_name=_checked_dns_name(body, "pscDnsName"),
        )

    async def client_certificate(self, uri: InstanceURI, public_key_pem: str) -> ClientCertificate:
        payload = {
            "publicKey": public_key_pem,
            "certDuration": CERT_DURATION,
            "useMetadataExchange": True,
        }
        body = await self._call(
            "POST", f"{uri.cluster_name}:generateClientCertificate", uri.cluster_name, payload
        )
        chain = body.get("pemCertificateChain") or []
        ca = body.get("caCert") or ""
        if not chain or not isinstance(chain, list):
            raise AdminAPIError(200, "response has no pemCertificateChain")
        if "-----BEGIN CERTIFICATE-----" not in ca:
            raise AdminAPIError(200, "no PEM data found in the ca cert")
        return ClientCertificate([str(c) for c in chain], str(ca))

    async def _call(
        self, method: str, path: str, parent: str, payload: dict[str, Any] | None
    ) -> dict[str, Any]:
        token = (await self._tokens.token()).value
        headers = {
            "Authorization": f"Bearer {token}",
            "User-Agent": self._user_agent,
            "x-goog-api-client": self._user_agent,
            "x-goog-request-params": "parent=" + quote(parent, safe=""),
            "Content-Type": "application/json",
        }
        if self._quota_project:
            headers["x-goog-user-project"] = self._quota_project
        url = f"{self.endpoint}/{API_VERSION}/{path}"
        data = json.dumps(payload) if payload is not None else None
        deadline = time.monotonic() + _RETRY_DEADLINE
        delay = _BACKOFF_INITIAL
        while True:
            status, body = await self._request(method, url, headers, data)
            if status == 503 and time.monotonic() + delay < deadline:
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * _BACKOFF_MULTIPLIER, _BACKOFF_MAX)
                continue
            return self._decode(status, body)

    async def _request(
        self, method: str, url: str, headers: dict[str, str], data: str | None
    ) -> tuple[int, bytes]:
        deadline = time.monotonic() + REQUEST_TIMEOUT
        try:
            return await asyncio.wait_for(
                workers.ADMIN_API.run(self._send, method, url, headers, data, deadline),
                REQUEST_TIMEOUT,
            )
        except (TimeoutError, asyncio.TimeoutError):  # two classes before 3.11
            raise AdminAPIUnreachable(
                f'{method} "{url}": no answer within {REQUEST_TIMEOUT:g}s'
            ) from None
        except _TransportError as exc:
            raise AdminAPIUnreachable(f'{method} "{url}": {exc}') from None

    def _send(
        self, method: str, url: str, headers: dict[str, str], data: str | None, deadline: float
    ) -> tuple[int, bytes]:
        import requests

        try:
            return self._receive(method, url, headers, data, deadline)
        except requests.RequestException as exc:
            raise _TransportError(_reason(exc)) from None

    def _receive(
        self, method: str, url: str, headers: dict[str, str], data: str | None, deadline: float
    ) -> tuple[int, bytes]:
        import requests
        import urllib3

        with self._get_session().request(
            method, url, headers=headers, data=data, timeout=REQUEST_TIMEOUT, stream=True
        ) as response:
            raw = response.raw
            # Each read waits at most until the deadline (the socket's timeout
            # is cut to what is left) and returns what has arrived, so the
            # deadline check runs even while the server trickles.
            sock = getattr(getattr(raw, "connection", None), "sock", None)
            read = getattr(raw, "read1", None) or raw.read
            body = bytearray()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise requests.Timeout(f"answer not complete after {REQUEST_TIMEOUT:g}s")
                if sock is not None:
                    sock.settimeout(left)
                try:
                    piece = read(65536, decode_content=True)
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    if time.monotonic() >= deadline:
                        raise requests.Timeout(
                            f"answer not complete after {REQUEST_TIMEOUT:g}s"
                        ) from None
                    raise requests.ConnectionError(str(exc)) from exc
                if not piece:
                    break
                body += piece
                if len(body) > MAX_RESPONSE:
                    raise requests.RequestException(f"answer larger than {MAX_RESPONSE} bytes")
            return response.status_code, bytes(body)

    @staticmethod
    def _decode(status: int, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:  # not JSON, or not UTF-8/16/32 text at all
            body = None
        if 200 <= status < 300:
            if not isinstance(body, dict):
                raise AdminAPIError(status, "response is not a JSON object")
            return body
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            raise AdminAPIError(
                status,
                str(err.get("message", "")),
                str(err.get("status", "")),
                codes=_error_codes(err),
            )
        text = raw.decode("utf-8", "replace").strip()[:200]
        raise AdminAPIError(status, text or "no error body")


# A DNS name as the certificate check takes it: labels of letters, digits,
# hyphens and underscores.
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
)


def _checked_ip(body: dict[str, Any], field: str) -> str:
    """The field's IP address ('' if absent); anything else is the API's error."""
    value = str(body.get(field) or "")
    if not value:
        return ""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise AdminAPIError(200, f"connectionInfo has an invalid {field}: {value!r}") from None
    if "%" in value:
        raise AdminAPIError(200, f"connectionInfo has a scoped {field}: {value!r}")
    return value


def _checked_dns_name(body: dict[str, Any], field: str) -> str:
    value = str(body.get(field) or "").rstrip(".")
    if value and not _DNS_NAME.fullmatch(value):
        raise AdminAPIError(200, f"connectionInfo has an invalid {field}: {value!r}")
    return value


def _error_codes(error: dict[str, Any]) -> str:
    """The error's machine-readable reasons, comma-joined, for the refresh-failure
    metric: the ErrorInfo details' reasons, else the legacy ``errors`` array's."""
    reasons: list[str] = []
    for source in ("details", "errors"):
        items = error.get(source)
        if isinstance(items, list):
            reasons = [
                str(item["reason"])
                for item in items
                if isinstance(item, dict) and isinstance(item.get("reason"), str)
            ]
        if reasons:
            break
    return ",".join(reasons)


class _TransportError(Exception):
    """The Admin API could not be reached (the innermost reason, for the message)."""


def _reason(exc: requests.RequestException) -> str:
    """The innermost cause of a transport failure ("connection refused"), not urllib3's story."""
    cause: BaseException = exc
    while True:
        inner = cause.__context__ or cause.__cause__
        if inner is None or inner is cause:
            break
        cause = inner
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
    return str(exc)
