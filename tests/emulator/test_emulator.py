"""The emulator on its own, driven by plain HTTP and TLS clients (no proxy involved)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy import mdx
from proxy.emulator import PostgresCluster

from ..conftest import TOKEN_APP, TOKEN_DENIED, URI

CLUSTER = URI.rsplit("/instances/", 1)[0]


def public_key(fmt: serialization.PublicFormat) -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, key.public_key().public_bytes(serialization.Encoding.PEM, fmt).decode()


def call(emu, method, path, token=TOKEN_APP, body=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, emu.admin_url + path, json=body, headers=headers, timeout=10)


@pytest.mark.parametrize("version", ["v1", "v1beta", "v1alpha"])
def test_connection_info_under_every_version(emulator, version):
    resp = call(
        emulator, "GET", f"/{version}/{URI}/connectionInfo?%24alt=json%3Benum-encoding%3Dint"
    )
    assert resp.status_code == 200
    body = resp.json()
    inst = emulator.instances[URI]
    assert body["ipAddress"] == inst.private_ip
    assert body["publicIpAddress"] == inst.public_ip
    assert body["pscDnsName"] == inst.psc_dns_name + "."


@pytest.mark.parametrize(
    "fmt", [serialization.PublicFormat.PKCS1, serialization.PublicFormat.SubjectPublicKeyInfo]
)
def test_client_certificate_chain(emulator, fmt):
    key, pem_key = public_key(fmt)
    resp = call(
        emulator,
        "POST",
        f"/v1beta/{CLUSTER}:generateClientCertificate",
        body={"publicKey": pem_key, "certDuration": "3600s", "useMetadataExchange": True},
    )
    assert resp.status_code == 200
    body = resp.json()
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in body["pemCertificateChain"]]
    assert all(p.endswith("\n") for p in body["pemCertificateChain"])
    leaf, intermediate, root = chain
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    assert body["caCert"] == body["pemCertificateChain"][-1]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 3600 <= lifetime.total_seconds() <= 3600 + 600
    assert emulator.issued[leaf.serial_number] is True


@pytest.mark.parametrize(
    ("token", "path", "status", "name"),
    [
        ("", f"/v1beta/{URI}/connectionInfo", 401, "UNAUTHENTICATED"),
        ("nope", f"/v1beta/{URI}/connectionInfo", 401, "UNAUTHENTICATED"),
        (TOKEN_DENIED, f"/v1beta/{URI}/connectionInfo", 403, "PERMISSION_DENIED"),
        (TOKEN_APP, f"/v1beta/{URI}x/connectionInfo", 404, "NOT_FOUND"),
        (TOKEN_APP, "/v1beta/nowhere", 404, "NOT_FOUND"),
    ],
)
def test_google_style_errors(emulator, token, path, status, name):
    resp = call(emulator, "GET", path, token=token)
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == status
    assert resp.json()["error"]["status"] == name


def test_bad_public_key_is_400(emulator):
    resp = call(
        emulator, "POST", f"/v1/{CLUSTER}:generateClientCertificate", body={"publicKey": "x"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_forced_status_counts_down_and_control_endpoint(emulator):
    resp = requests.post(
        emulator.admin_url + "/emulator/v1/faults",
        json={"admin_status": 503, "admin_status_count": 1},
        timeout=10,
    )
    assert resp.status_code == 200
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 503
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 200
    resp = requests.post(emulator.admin_url + "/emulator/v1/faults", json={"bogus": 1}, timeout=10)
    assert resp.status_code == 400
    log = requests.get(emulator.admin_url + "/emulator/v1/requests", timeout=10).json()["requests"]
    assert any(r["path"].endswith("/connectionInfo") for r in log)


def tls_client(emulator, ip, *, server_hostname=None):
    """A Python ssl client with a fresh certificate from the emulator."""
    key, pem_key = public_key(serialization.PublicFormat.SubjectPublicKeyInfo)
    body = call(
        emulator,
        "POST",
        f"/v1beta/{CLUSTER}:generateClientCertificate",
        body={"publicKey": pem_key, "useMetadataExchange": True},
    ).json()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=body["caCert"])
    with tempfile.TemporaryDirectory() as tmp:
        chain, keyfile = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
        with open(chain, "w") as fh:
            fh.write("".join(body["pemCertificateChain"]))
        with open(keyfile, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        ctx.load_cert_chain(chain, keyfile)
    raw = socket.create_connection((ip, 5433), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=server_hostname or ip)


def test_server_identity_ip_and_psc_names(emulator):
    inst = emulator.instances[URI]
    for ip in (inst.private_ip, inst.public_ip):
        with tls_client(emulator, ip) as tls:
            assert tls.version() == "TLSv1.3"
    with tls_client(emulator, inst.psc_ip, server_hostname=inst.psc_dns_name) as tls:
        assert tls.version() == "TLSv1.3"


def test_mdx_then_startup_reaches_postgres(emulator):
    inst = emulator.instances[URI]
    with tls_client(emulator, inst.private_ip) as tls:
        tls.sendall(mdx.encode_request(mdx.MdxRequest("test/1", mdx.AUTO_IAM, "tok-iam")))
        assert tls.recv(6) == bytes.fromhex("000000020801")
        tls.sendall(bytes.fromhex("0000000804d2162f"))  # SSLRequest
        assert tls.recv(1) == b"N"
        params = b"user\0someone@else.iam\0database\0postgres\0\0"
        tls.sendall((len(params) + 8).to_bytes(4, "big") + (196608).to_bytes(4, "big") + params)
        reply = tls.recv(1000)
        assert reply[:1] == b"E" and b"28000" in reply and b"IAM authentication failed" in reply
    assert emulator.mdx_requests[-1][1].auth_type == mdx.AUTO_IAM


def test_mdx_error_fault_and_unknown_token(emulator):
    inst = emulator.instances[URI]
    with tls_client(emulator, inst.private_ip) as tls:
        tls.sendall(mdx.encode_request(mdx.MdxRequest("t", mdx.DB_NATIVE, "unknown")))
        header = tls.recv(4)
        resp = mdx.decode_response(tls.recv(mdx.body_length(header)))
        assert resp.response_code == mdx.ERROR and "token" in resp.error
    inst.faults.set(mdx_error="boom")
    with tls_client(emulator, inst.private_ip) as tls:
        tls.sendall(mdx.encode_request(mdx.MdxRequest("t", mdx.DB_NATIVE, TOKEN_APP)))
        assert tls.recv(100) == mdx.encode_response(mdx.MdxResponse(mdx.ERROR, "boom"))


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("wrong_san", "IP address mismatch"), ("unknown_ca", "certificate verify failed")],
)
def test_certificate_faults_fail_verification(emulator, fault, reason):
    inst = emulator.instances[URI]
    inst.faults.set(**{fault: True})
    with pytest.raises(ssl.SSLCertVerificationError, match=reason):
        tls_client(emulator, inst.private_ip)


def test_client_certificate_of_another_cluster_is_rejected(emulator):
    other_uri = URI.replace("clusters/clust", "clusters/elsewhere")
    emulator.add_instance(other_uri)
    other = emulator.instances[other_uri]
    key, pem_key = public_key(serialization.PublicFormat.SubjectPublicKeyInfo)
    body = call(
        emulator,
        "POST",
        f"/v1beta/{CLUSTER}:generateClientCertificate",
        body={"publicKey": pem_key},
    ).json()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a certificate for CLUSTER ...
    with tempfile.TemporaryDirectory() as tmp:
        chain, keyfile = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        with open(chain, "w") as fh:
            fh.write("".join(body["pemCertificateChain"]))
        with open(keyfile, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        ctx.load_cert_chain(chain, keyfile)
    # ... is refused by an instance of another cluster (seen at the first read in TLS 1.3).
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        ctx.wrap_socket(socket.create_connection((other.private_ip, 5433), timeout=10)) as tls,
    ):
        tls.sendall(mdx.encode_request(mdx.MdxRequest("t", mdx.DB_NATIVE, TOKEN_APP)))
        if not tls.recv(10):
            raise ConnectionError("closed")


def test_postgres_cluster_stops_cleanly():
    cluster = PostgresCluster().start()
    data_dir = cluster._tmp
    assert cluster.psql("SELECT 1") == "1"
    cluster.stop()
    assert not os.path.exists(data_dir)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cluster.port), timeout=2).close()


def test_command_runs_writes_state_and_stops_on_sigterm(tmp_path):
    state = tmp_path / "state.json"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        admin_port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy.emulator",
            "--instance",
            URI,
            "--psc",
            "--token",
            "t=someone@p.iam.gserviceaccount.com",
            "--admin-port",
            str(admin_port),
            "--state-file",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        info = json.loads(state.read_text())
        assert info["admin_url"] == f"http://127.0.0.1:{admin_port}"
        assert info["instances"][URI]["psc_dns_name"].endswith(".alloydb.goog")
        pg_port = info["postgres"]["port"]
        resp = requests.get(
            f"{info['admin_url']}/v1beta/{URI}/connectionInfo",
            headers={"Authorization": "Bearer t"},
            timeout=10,
        )
        assert resp.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Admin API at" in out
    with pytest.raises(OSError):  # its temporary PostgreSQL is gone
        socket.create_connection(("127.0.0.1", pg_port), timeout=2).close()


def test_admin_latency_fault(emulator):
    emulator.faults.set(admin_latency=0.5)
    began = time.monotonic()
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 200
    assert time.monotonic() - began >= 0.5
