"""Plain clients for the emulator: HTTP via requests, TLS via ssl, MDX via proxy.mdx."""

from __future__ import annotations

import functools
import os
import socket
import ssl
import struct
import tempfile

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy import mdx

from ..conftest import TOKEN_APP, URI

CLUSTER = URI.rsplit("/instances/", 1)[0]


@functools.cache
def client_key() -> rsa.RSAPrivateKey:
    """One RSA key for all tests (generating one is the slow part)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(fmt=serialization.PublicFormat.SubjectPublicKeyInfo) -> str:
    return client_key().public_key().public_bytes(serialization.Encoding.PEM, fmt).decode()


def call(
    emu, method: str, path: str, token: str | None = TOKEN_APP, body=None, headers=None, **kwargs
):
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(
        method, emu.admin_url + path, json=body, headers=headers, timeout=10, **kwargs
    )


def issue(emu, cluster: str = CLUSTER, *, use_mdx: bool = True, token: str = TOKEN_APP) -> dict:
    resp = call(
        emu,
        "POST",
        f"/v1beta/{cluster}:generateClientCertificate",
        token=token,
        body={"publicKey": public_pem(), "certDuration": "3600s", "useMetadataExchange": use_mdx},
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def client_context(chain: list[str], ca_cert: str | None) -> ssl.SSLContext:
    """What the connectors build: TLS 1.3, trust only caCert, present the whole chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca_cert is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=ca_cert)
    with tempfile.TemporaryDirectory() as tmp:
        chain_path, key_path = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
        with open(chain_path, "w") as fh:
            fh.write("".join(chain))
        with open(key_path, "wb") as fh:
            fh.write(
                client_key().private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        ctx.load_cert_chain(chain_path, key_path)
    return ctx


def tls_client(
    emu,
    ip: str,
    *,
    server_hostname: str | None = None,
    use_mdx: bool = True,
    cluster: str = CLUSTER,
) -> ssl.SSLSocket:
    """A TLS session to ip:5433 with a fresh certificate from the emulator's Admin API."""
    body = issue(emu, cluster, use_mdx=use_mdx)
    ctx = client_context(body["pemCertificateChain"], body["caCert"])
    raw = socket.create_connection((ip, 5433), timeout=10)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname or ip)
    except BaseException:
        raw.close()
        raise


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def exchange(sock: socket.socket, token: str, auth_type: int = mdx.DB_NATIVE) -> mdx.MdxResponse:
    sock.sendall(mdx.encode_request(mdx.MdxRequest("emulator-tests/1.0", auth_type, token)))
    size = mdx.body_length(recv_exactly(sock, mdx.HEADER_SIZE))
    return mdx.decode_response(recv_exactly(sock, size))


def startup_message(**params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack(">II", len(body) + 8, 196608) + body


def read_pg_message(sock: socket.socket) -> tuple[bytes, bytes]:
    kind = recv_exactly(sock, 1)
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    return kind, recv_exactly(sock, length - 4)


def error_fields(body: bytes) -> dict[str, str]:
    return {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}


def server_certificate(sock: ssl.SSLSocket) -> x509.Certificate:
    return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
