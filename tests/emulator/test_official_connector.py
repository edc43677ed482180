"""Fidelity: Google's own Python connector logs in through the emulator.

google-cloud-alloydb-connector (driver pg8000) calls the Admin API over gRPC;
only that one client object is replaced by a small adapter that calls the
emulator's REST API. The connector's own TLS, metadata exchange and driver
path run unchanged against the emulator's instance server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import types

import pytest
import requests

from ..conftest import DB_NAME, DB_PASSWORD, DB_USER, IAM_DB_USER, TOKEN_APP, TOKEN_IAM, URI

alloydbconnector = pytest.importorskip("google.cloud.alloydbconnector")
from google.cloud.alloydbconnector.client import AlloyDBClient  # noqa: E402
from google.oauth2.credentials import Credentials  # noqa: E402


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail loudly if anything resolves a name that is not a loopback address
    (e.g. an ADC lookup or alloydb.googleapis.com)."""
    attempts: list[str] = []
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            allowed = ipaddress.ip_address(name).is_loopback
        except ValueError:
            allowed = name == "localhost"
        if not allowed:
            attempts.append(name)
            raise socket.gaierror(f"tests: {name} is not loopback")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
    assert attempts == []


class RestAdminAdapter:
    """The two GAPIC calls the connector makes, served by the emulator's REST API."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"}

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        resp = requests.request(
            method, f"{self.base_url}/v1beta/{path}", json=body, headers=self.headers, timeout=30
        )
        resp.raise_for_status()
        return resp.json()

    async def get_connection_info(self, request):
        body = await asyncio.to_thread(self._call, "GET", f"{request.parent}/connectionInfo")
        return types.SimpleNamespace(
            ip_address=body.get("ipAddress", ""),
            public_ip_address=body.get("publicIpAddress", ""),
            psc_dns_name=body.get("pscDnsName", ""),
        )

    async def generate_client_certificate(self, request):
        body = await asyncio.to_thread(
            self._call,
            "POST",
            f"{request.parent}:generateClientCertificate",
            {
                "publicKey": request.public_key,
                "certDuration": f"{request.cert_duration.seconds}s",
                "useMetadataExchange": request.use_metadata_exchange,
            },
        )
        return types.SimpleNamespace(
            ca_cert=body["caCert"], pem_certificate_chain=body["pemCertificateChain"]
        )


def connector_for(emulator, token: str, **kwargs):
    # A static token that never needs a refresh, so nothing reaches Google.
    creds = Credentials(token=token, expiry=dt.datetime(2099, 1, 1))
    connector = alloydbconnector.Connector(credentials=creds, **kwargs)
    connector._client = AlloyDBClient(
        emulator.admin_url,
        None,
        creds,
        client=RestAdminAdapter(emulator.admin_url, token),
        driver="pg8000",
    )
    return connector


@pytest.mark.parametrize("ip_type", ["PRIVATE", "PUBLIC"])
def test_db_native_login(emulator, ip_type):
    connector = connector_for(emulator, TOKEN_APP, ip_type=ip_type)
    try:
        conn = connector.connect(URI, "pg8000", user=DB_USER, password=DB_PASSWORD, db=DB_NAME)
        cursor = conn.cursor()
        cursor.execute("SELECT current_user, 1")
        assert cursor.fetchone() == [DB_USER, 1]
        conn.close()
    finally:
        connector.close()
    inst = emulator.instances[URI]
    expected_ip = inst.private_ip if ip_type == "PRIVATE" else inst.public_ip
    assert emulator.connections[-1] == (URI, expected_ip)
    paths = {r.path for r in emulator.admin_requests}
    assert paths == {
        f"/v1beta/{URI}/connectionInfo",
        f"/v1beta/{URI.rsplit('/instances/', 1)[0]}:generateClientCertificate",
    }
    _, request = emulator.mdx_requests[-1]
    assert request.user_agent.startswith("alloydb-python-connector/")
    assert request.auth_type == 1 and request.oauth2_token == TOKEN_APP


def test_auto_iam_login(emulator):
    connector = connector_for(emulator, TOKEN_IAM, enable_iam_auth=True)
    try:
        conn = connector.connect(URI, "pg8000", user=IAM_DB_USER, db=DB_NAME)
        cursor = conn.cursor()
        cursor.execute("SELECT current_user, 1")
        assert cursor.fetchone() == [IAM_DB_USER, 1]
        conn.close()
    finally:
        connector.close()
    assert emulator.mdx_requests[-1][1].auth_type == 2
