"""Loopback fakes of the identity services the credential sources talk to.

One threaded HTTP server plays: Google's OAuth2 token endpoint (service
account JWT and refresh-token grants), Google STS (token exchange), the IAM
Credentials ``generateAccessToken`` call, the Compute Engine metadata server
and the AWS instance metadata service (IMDSv2 session tokens required unless
told otherwise). Every token it issues names its kind and scope, e.g.
``sa|cloud-platform|3``, so tests can tell which credential reached which
place; ``issued`` lists them all (to prove none is ever logged).
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.emulator import Principal
from proxy.emulator.principals import ALLOYDB_LOGIN, CLOUD_PLATFORM

from .. import leakcheck
from ..conftest import SA_EMAIL

PEOPLE = {
    "sa|": "key-sa@project-id.iam.gserviceaccount.com",
    "user|": "person@example.com",
    "gce|": "vm-sa@project-id.iam.gserviceaccount.com",
    "imp|": SA_EMAIL,
    "gcloud-": "person@example.com",
    "static-": "person@example.com",
}


SCOPES = {"cloud-platform": CLOUD_PLATFORM, "alloydb.login": ALLOYDB_LOGIN}


class TokensByPrefix(dict):
    """The emulator's token table: any token the fakes issue maps to its principal,
    with the scope the token was issued for (``sa|alloydb.login|7`` is good for the
    metadata exchange only) and, given the fakes, its expiry."""

    def __init__(self, fakes: IdentityFakes | None = None) -> None:
        super().__init__()
        self.fakes = fakes

    def get(self, token, default=None):
        for prefix, email in PEOPLE.items():
            if token.startswith(prefix):
                scopes = Principal(email).scopes
                parts = token.split("|")
                if len(parts) == 3 and parts[1] in SCOPES:
                    scopes = frozenset({SCOPES[parts[1]]})
                expires = self.fakes.expires.get(token) if self.fakes else None
                return Principal(email, scopes=scopes, expires_at=expires)
        return default


IMDS_SESSION = leakcheck.secret("imds-session-token", "the IMDSv2 session token")
STS_TOKEN = leakcheck.secret("sts-federated-token", "the STS token")
AWS_SECRET_KEY = leakcheck.secret("secret-example", "the AWS secret access key")
AWS_SESSION_TOKEN = leakcheck.secret("aws-session-example", "the AWS session token")
AWS_ROLE = "my-ec2-role"


def _short(scope: str) -> str:
    return scope.split()[0].rsplit("/", 1)[-1] if scope else "none"


class IdentityFakes:
    def __init__(self) -> None:
        self.expires_in = 3600
        self.imdsv2_required = True
        self.sts_error: str | None = None
        self.token_status: int | None = None  # the OAuth2 endpoint answers this, if set
        self.log: list[tuple[str, str, dict[str, str], str]] = []
        self.issued: list[str] = []
        self.expires: dict[str, float] = {}  # token -> UNIX time it expires
        self._counter = itertools.count(1)
        fakes = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(
                self, status: int, body: object, headers: dict[str, str] | None = None
            ) -> None:
                data = (
                    body
                    if isinstance(body, bytes)
                    else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
                )
                self.send_response(status)
                kind = "text/plain" if isinstance(body, (bytes, str)) else "application/json"
                self.send_header("Content-Type", kind)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                fakes.log.append((method, self.path, dict(self.headers), body))
                status, payload, headers = fakes.route(method, self.path, self.headers, body)
                self._reply(status, payload, headers)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.log]

    def _token(self, kind: str, scope: str) -> str:
        token = f"{kind}|{_short(scope)}|{next(self._counter)}"
        leakcheck.secret(token, f"a token the identity fakes issued ({kind})")
        self.issued.append(token)
        self.expires[token] = time.time() + self.expires_in
        return token

    def _expiry(self) -> str:
        when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.expires_in)
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")

    def route(self, method, path, headers, body):  # noqa: C901 - one table of fakes
        url = urlparse(path)
        if url.path == "/token" and method == "POST" and self.token_status:
            return self.token_status, {"error": "temporarily_unavailable"}, None
        if url.path == "/token" and method == "POST":  # Google OAuth2
            form = {k: v[0] for k, v in parse_qs(body).items()}
            if form.get("grant_type") == "urn:ietf:params:oauth:grant-type:jwt-bearer":
                claims = form["assertion"].split(".")[1]
                claims = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
                token = self._token("sa", claims.get("scope", ""))
            elif form.get("grant_type") == "refresh_token":
                token = self._token("user", form.get("scope", ""))
            else:
                return 400, {"error": "unsupported_grant_type"}, None
            return (
                200,
                {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"},
                None,
            )
        if url.path == "/v1/token" and method == "POST":  # STS
            if self.sts_error:
                return 400, {"error": "invalid_grant", "error_description": self.sts_error}, None
            self.issued.append(STS_TOKEN)
            return (
                200,
                {
                    "access_token": STS_TOKEN,
                    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                    "token_type": "Bearer",
                    "expires_in": self.expires_in,
                },
                None,
            )
        if url.path.endswith(":generateAccessToken") and method == "POST":  # IAM Credentials
            source = headers.get("Authorization", "")
            if source != f"Bearer {STS_TOKEN}" and not source.startswith("Bearer base-"):
                return 401, {"error": {"code": 401, "message": "bad source token"}}, None
            scopes = json.loads(body).get("scope") or []
            token = self._token("imp", " ".join(scopes))
            return 200, {"accessToken": token, "expireTime": self._expiry()}, None
        if url.path.startswith("/latest/"):  # AWS IMDS
            if url.path == "/latest/api/token" and method == "PUT":
                return 200, IMDS_SESSION, None
            if self.imdsv2_required and headers.get("X-aws-ec2-metadata-token") != IMDS_SESSION:
                return 401, "Unauthorized", None
            if url.path == "/latest/meta-data/placement/availability-zone":
                return 200, "us-east-2a", None
            if url.path == "/latest/meta-data/iam/security-credentials":
                return 200, AWS_ROLE, None
            if url.path == f"/latest/meta-data/iam/security-credentials/{AWS_ROLE}":
                return (
                    200,
                    {
                        "AccessKeyId": "AKIDEXAMPLE",
                        "SecretAccessKey": AWS_SECRET_KEY,
                        "Token": AWS_SESSION_TOKEN,
                    },
                    None,
                )
            return 404, "not found", None
        gce = {"Metadata-Flavor": "Google"}
        if url.path == "/" and headers.get("Metadata-Flavor") == "Google":
            return 200, "", gce
        if url.path.startswith("/computeMetadata/v1/"):
            if headers.get("Metadata-Flavor") != "Google":
                return 403, "missing Metadata-Flavor", None
            rest = url.path[len("/computeMetadata/v1/") :]
            if rest == "project/project-id":
                return 200, "fake-project", gce
            if rest.startswith("instance/service-accounts/default/token"):
                scopes = parse_qs(url.query).get("scopes", [""])[0]
                token = self._token("gce", scopes.replace(",", " "))
                return (
                    200,
                    {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"},
                    gce,
                )
            if rest.startswith("instance/service-accounts/default"):
                return (
                    200,
                    {
                        "email": "vm-sa@project-id.iam.gserviceaccount.com",
                        "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                        "aliases": ["default"],
                    },
                    gce,
                )
            return 404, "not found", gce
        return 404, {"error": f"no fake for {method} {url.path}"}, None


def service_account_info(
    token_uri: str, email: str = "key-sa@project-id.iam.gserviceaccount.com"
) -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    leakcheck.secret_key_pem(key_pem, f"the private key of {email}")
    return {
        "type": "service_account",
        "project_id": "project-id",
        "private_key_id": "abc123",
        "private_key": key_pem,
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": token_uri,
    }


def aws_external_account_info(base: str, target: str, *, imdsv2: bool = True) -> dict:
    source = {
        "environment_id": "aws1",
        "region_url": f"{base}/latest/meta-data/placement/availability-zone",
        "url": f"{base}/latest/meta-data/iam/security-credentials",
        "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
    }
    if imdsv2:
        source["imdsv2_session_token_url"] = f"{base}/latest/api/token"
    return {
        "type": "external_account",
        "audience": "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/pool/providers/aws",
        "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
        "token_url": f"{base}/v1/token",
        "service_account_impersonation_url": f"{base}/v1/projects/-/serviceAccounts/{target}:generateAccessToken",
        "credential_source": source,
    }


class ConnectProxy:
    """An HTTPS proxy on loopback that never connects anywhere: it answers CONNECT for
    ``host`` itself, terminates TLS with a certificate from a test CA and serves the
    requests from ``fakes``. Used where a client library has a fixed Google host."""

    def __init__(
        self, fakes: IdentityFakes, host: str, ca_file: str, cert_file: str, key_file: str
    ):
        import socket
        import ssl

        self.fakes = fakes
        self.host = host
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert_file, key_file)
        self.ca_file = ca_file
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.refused: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_head(stream) -> tuple[str, dict[str, str]] | None:
        line = stream.readline()
        if not line:
            return None
        headers = {}
        while (h := stream.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().title()] = value.strip()
        return line.decode("latin-1").strip(), headers

    def _serve(self, conn) -> None:
        with conn:
            head = self._read_head(conn.makefile("rb"))
            if head is None:
                return
            request_line, _ = head
            method, target, _ = request_line.split(" ", 2)
            if method != "CONNECT" or target.split(":")[0] != self.host:
                self.refused.append(request_line)
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                stream = tls.makefile("rb")
                while (head := self._read_head(stream)) is not None:
                    request_line, headers = head
                    method, path, _ = request_line.split(" ", 2)
                    length = int(headers.get("Content-Length") or 0)
                    body = stream.read(length).decode() if length else ""
                    self.fakes.log.append((method, path, headers, body))
                    status, payload, _ = self.fakes.route(method, path, headers, body)
                    data = json.dumps(payload).encode()
                    tls.sendall(
                        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n".encode()
                        + data
                    )

    def close(self) -> None:
        self.sock.close()
