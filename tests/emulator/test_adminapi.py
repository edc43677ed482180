"""The emulator's Admin API, driven by a plain HTTP client."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
import time

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..conftest import TOKEN_APP, TOKEN_DENIED, URI
from .clients import CLUSTER, call, client_key, issue, public_pem

OTHER = URI.replace("/instances/inst", "/instances/plain")


@pytest.mark.parametrize("version", ["v1", "v1beta", "v1alpha"])
def test_connection_info_under_every_version(emulator, version):
    # The Go REST client's query string is ignored.
    resp = call(
        emulator, "GET", f"/{version}/{URI}/connectionInfo?%24alt=json%3Benum-encoding%3Dint"
    )
    assert resp.status_code == 200
    inst = emulator.instances[URI]
    expected = {
        "name": f"{URI}/connectionInfo",
        "ipAddress": inst.private_ip,
        "publicIpAddress": inst.public_ip,
        "pscDnsName": inst.psc_dns_name + ".",
        "instanceUid": inst.uid,
    }
    if version == "v1":
        del expected["pscDnsName"]  # v1's ConnectionInfo has no such field
    assert resp.json() == expected
    assert not inst.psc_dns_name.endswith(".")


def test_connection_info_omits_addresses_an_instance_lacks(emulator):
    emulator.add_instance(OTHER)
    body = call(emulator, "GET", f"/v1beta/{OTHER}/connectionInfo").json()
    assert set(body) == {"name", "ipAddress", "instanceUid"}


@pytest.mark.parametrize("version", ["v1", "v1beta", "v1alpha"])
@pytest.mark.parametrize(
    "fmt", [serialization.PublicFormat.PKCS1, serialization.PublicFormat.SubjectPublicKeyInfo]
)
def test_client_certificate_chain(emulator, version, fmt):
    pem_key = public_pem(fmt)
    assert pem_key.startswith(
        "-----BEGIN RSA PUBLIC KEY-----"
        if fmt is serialization.PublicFormat.PKCS1
        else "-----BEGIN PUBLIC KEY-----"
    )
    resp = call(
        emulator,
        "POST",
        f"/{version}/{CLUSTER}:generateClientCertificate",
        body={"publicKey": pem_key, "certDuration": "3600s", "useMetadataExchange": True},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert all(p.endswith("\n") for p in body["pemCertificateChain"])
    assert body["caCert"] == body["pemCertificateChain"][-1]
    leaf, intermediate, root = (
        x509.load_pem_x509_certificate(p.encode()) for p in body["pemCertificateChain"]
    )
    assert leaf.public_key().public_numbers() == client_key().public_key().public_numbers()
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    assert intermediate.subject.rfc4514_string().startswith("CN=client.alloydb")
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    remaining = leaf.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert 3590 <= remaining.total_seconds() <= 3600
    assert emulator.issued[leaf.serial_number] is True


def test_use_metadata_exchange_is_recorded_per_certificate(emulator):
    with_mdx = issue(emulator, use_mdx=True)["pemCertificateChain"][0]
    without = issue(emulator, use_mdx=False)["pemCertificateChain"][0]
    serial = lambda p: x509.load_pem_x509_certificate(p.encode()).serial_number  # noqa: E731
    assert emulator.issued[serial(with_mdx)] is True
    assert emulator.issued[serial(without)] is False


def test_parent_in_body_is_accepted(emulator):
    # The Go client marshals the whole request, parent included.
    resp = call(
        emulator,
        "POST",
        f"/v1alpha/{CLUSTER}:generateClientCertificate",
        body={"parent": CLUSTER, "publicKey": public_pem(), "certDuration": "3600s"},
    )
    assert resp.status_code == 200


@pytest.mark.parametrize(
    ("token", "path", "status", "name"),
    [
        ("", f"/v1beta/{URI}/connectionInfo", 401, "UNAUTHENTICATED"),
        ("nope", f"/v1beta/{URI}/connectionInfo", 401, "UNAUTHENTICATED"),
        (TOKEN_DENIED, f"/v1beta/{URI}/connectionInfo", 403, "PERMISSION_DENIED"),
        (TOKEN_APP, f"/v1beta/{URI}x/connectionInfo", 404, "NOT_FOUND"),
        (TOKEN_APP, "/v1beta/nowhere", 404, "NOT_FOUND"),
        (TOKEN_APP, f"/v2/{URI}/connectionInfo", 404, "NOT_FOUND"),
    ],
)
def test_google_style_errors(emulator, token, path, status, name):
    resp = call(emulator, "GET", path, token=token)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["code"] == status and error["status"] == name and error["message"]


def test_unknown_cluster_is_404(emulator):
    resp = call(
        emulator,
        "POST",
        f"/v1beta/{CLUSTER}x:generateClientCertificate",
        body={"publicKey": public_pem()},
    )
    assert resp.status_code == 404 and resp.json()["error"]["status"] == "NOT_FOUND"


def weak_key_pem(bits: int = 2048, exponent: int = 65537) -> str:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"publicKey": "x"}, "invalid public key"),
        ({"publicKey": public_pem(), "certDuration": "an hour"}, "cert_duration"),
        ({"publicKey": public_pem(), "certDuration": 3600}, "cert_duration"),
        ({"publicKey": public_pem(), "certDuration": "60s"}, "between 1h and 24h"),
        ({"publicKey": public_pem(), "certDuration": "90000s"}, "between 1h and 24h"),
        ({"publicKey": public_pem(), "bogus": 1}, 'Unknown name "bogus"'),
        ({"publicKey": public_pem(), "useMetadataExchange": "true"}, "use_metadata_exchange"),
        ({"publicKey": "hello\n" + public_pem()}, "one PEM public key block"),
        ({"publicKey": public_pem() + "trailing words"}, "one PEM public key block"),
        ({"publicKey": weak_key_pem(bits=1024)}, "at least 2048 bits"),
        ({"publicKey": weak_key_pem(exponent=3)}, "exponent 65537"),
        ({"publicKey": 42}, "public_key"),
        ({"publicKey": public_pem(), "public_key": public_pem()}, "given twice"),
    ],
)
def test_bad_body_is_400(emulator, body, message):
    resp = call(emulator, "POST", f"/v1/{CLUSTER}:generateClientCertificate", body=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and message in error["message"]


def test_proto_field_names_are_accepted(emulator):
    # The REST gateway takes proto names as well as JSON names.
    resp = call(
        emulator,
        "POST",
        f"/v1beta/{CLUSTER}:generateClientCertificate",
        body={"public_key": public_pem(), "cert_duration": "7200s", "use_metadata_exchange": True},
    )
    assert resp.status_code == 200, resp.text


def test_null_fields_are_their_defaults(emulator):
    resp = call(
        emulator,
        "POST",
        f"/v1beta/{CLUSTER}:generateClientCertificate",
        body={"publicKey": public_pem(), "parent": None, "useMetadataExchange": None},
    )
    assert resp.status_code == 200, resp.text


def test_a_body_that_is_not_declared_json_is_400(emulator):
    resp = call(
        emulator,
        "POST",
        f"/v1beta/{CLUSTER}:generateClientCertificate",
        data=json.dumps({"publicKey": public_pem()}),
        headers={"Content-Type": "text/plain"},
    )
    assert resp.status_code == 400 and "Content-Type" in resp.json()["error"]["message"]


def test_invalid_json_is_400(emulator):
    resp = call(emulator, "POST", f"/v1/{CLUSTER}:generateClientCertificate", data=b"{not json")
    assert resp.status_code == 400


def test_accept_any_token_mode(make_emulator):
    emu = make_emulator(tokens=None)
    assert call(emu, "GET", f"/v1beta/{URI}/connectionInfo", token="whatever").status_code == 200
    assert call(emu, "GET", f"/v1beta/{URI}/connectionInfo", token=None).status_code == 401


def test_request_log(emulator):
    call(
        emulator,
        "GET",
        f"/v1beta/{URI}/connectionInfo",
        headers={"User-Agent": "tests/1.0", "x-goog-user-project": "quota"},
    )
    issue(emulator)
    info, cert = emulator.admin_requests[-2:]
    assert (info.method, info.path, info.token, info.user_agent, info.body) == (
        "GET",
        f"/v1beta/{URI}/connectionInfo",
        TOKEN_APP,
        "tests/1.0",
        None,
    )
    assert info.headers["x-goog-user-project"] == "quota"
    assert cert.method == "POST" and cert.body["useMetadataExchange"] is True
    assert cert.body["certDuration"] == "3600s"


def test_keep_alive_connection_serves_several_requests(emulator):
    conn = http.client.HTTPConnection("127.0.0.1", int(emulator.admin_url.rsplit(":", 1)[1]))
    try:
        for _ in range(3):
            conn.request(
                "GET", f"/v1/{URI}/connectionInfo", headers={"Authorization": f"Bearer {TOKEN_APP}"}
            )
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["ipAddress"]
        sock = conn.sock
        conn.request("POST", f"/v1/{CLUSTER}:generateClientCertificate", body=b"{}")
        resp = conn.getresponse()
        assert resp.status == 401
        resp.read()
        assert conn.sock is sock  # the same TCP connection all along
    finally:
        conn.close()


def test_malformed_request_gets_400_and_close(emulator):
    host, port = emulator.admin_url[len("http://") :].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        data = sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 400 ")
        assert sock.recv(4096) == b""


def test_forced_status_counts_down(emulator):
    emulator.faults.set(admin_status=503, admin_status_count=2)
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 503
    resp = call(emulator, "GET", f"/v1beta/{URI}/connectionInfo")
    assert resp.status_code == 503 and resp.json()["error"]["status"] == "UNAVAILABLE"
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 200


def test_forced_status_per_method_and_any_code(emulator):
    emulator.faults.set(admin_status=599, admin_status_method="generateClientCertificate")
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 200
    resp = call(
        emulator,
        "POST",
        f"/v1beta/{CLUSTER}:generateClientCertificate",
        body={"publicKey": public_pem()},
    )
    assert resp.status_code == 599 and resp.json()["error"]["code"] == 599
    with pytest.raises(ValueError):
        emulator.faults.set(admin_status_method="bogus")


def test_malformed_answer_counts_down(emulator):
    emulator.faults.set(admin_malformed=True, admin_status_count=1)
    resp = call(emulator, "GET", f"/v1beta/{URI}/connectionInfo")
    assert resp.status_code == 200
    with pytest.raises(ValueError):
        resp.json()
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").json()["ipAddress"]


def test_request_log_has_arrival_times(emulator):
    before = time.monotonic()
    emulator.faults.set(admin_latency=0.3)
    call(emulator, "GET", f"/v1beta/{URI}/connectionInfo")
    (logged,) = list(emulator.admin_requests)
    assert before <= logged.at <= before + 0.25  # logged on arrival, before the latency


def test_per_instance_admin_fault(emulator):
    emulator.add_instance(OTHER)
    emulator.instances[OTHER].faults.set(admin_status=403)
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 200
    resp = call(emulator, "GET", f"/v1beta/{OTHER}/connectionInfo")
    assert resp.status_code == 403 and resp.json()["error"]["status"] == "PERMISSION_DENIED"


def test_address_faults(emulator):
    emulator.faults.set(no_public_ip=True, no_psc=True)
    body = call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").json()
    assert "publicIpAddress" not in body and "pscDnsName" not in body and body["ipAddress"]


def test_cert_lifetime_fault(emulator):
    emulator.faults.set(cert_lifetime=120)
    leaf = x509.load_pem_x509_certificate(issue(emulator)["pemCertificateChain"][0].encode())
    remaining = leaf.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert 100 <= remaining.total_seconds() <= 120


def test_admin_latency_fault(emulator):
    emulator.faults.set(admin_latency=0.5)
    began = time.monotonic()
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 200
    assert time.monotonic() - began >= 0.5


def test_control_endpoint(emulator):
    faults_url = emulator.admin_url + "/emulator/v1/faults"
    resp = requests.post(
        faults_url, json={"admin_status": 503, "admin_status_count": 1}, timeout=10
    )
    assert resp.status_code == 200 and resp.json()["admin_status"] == 503
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 503
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").status_code == 200

    resp = requests.post(faults_url, json={"instance": URI, "mdx_error": "later"}, timeout=10)
    assert resp.status_code == 200
    assert emulator.instances[URI].faults.mdx_error == "later"
    current = requests.get(faults_url, timeout=10).json()
    assert current["instances"][URI]["mdx_error"] == "later"
    resp = requests.post(faults_url, json={"instance": URI, "clear": True}, timeout=10)
    assert resp.json()["mdx_error"] is None

    assert requests.post(faults_url, json={"bogus": 1}, timeout=10).status_code == 400
    assert requests.post(faults_url, json={"instance": "nope"}, timeout=10).status_code == 404
    log = requests.get(emulator.admin_url + "/emulator/v1/requests", timeout=10).json()
    assert any(r["path"] == f"/v1beta/{URI}/connectionInfo" for r in log["requests"])
    assert log["mdx"] == []


def test_percent_encoded_path(emulator):
    resp = call(
        emulator,
        "POST",
        f"/v1beta/{CLUSTER}%3AgenerateClientCertificate",
        body={"publicKey": public_pem()},
    )
    assert resp.status_code == 200
    # An encoded slash is part of a name, never a separator.
    encoded = URI.replace("/instances/", "/instances%2F", 1)
    assert call(emulator, "GET", f"/v1beta/{encoded}/connectionInfo").status_code == 404
    encoded = URI.replace("projects/", "projects%2F", 1)
    assert call(emulator, "GET", f"/v1beta/{encoded}/connectionInfo").status_code == 404


def test_request_log_over_http_redacts_tokens_and_is_bounded(emulator):
    from proxy.emulator import emulator as emulator_module

    call(emulator, "GET", f"/v1beta/{URI}/connectionInfo")
    log = requests.get(emulator.admin_url + "/emulator/v1/requests", timeout=10).json()
    assert log["requests"], log
    text = json.dumps(log)
    assert TOKEN_APP not in text
    assert f"REDACTED({len(TOKEN_APP)} chars)" in text
    assert emulator.admin_requests[-1].token == TOKEN_APP  # in-process tests still see it

    bounded = emulator_module.BoundedLog()
    for i in range(emulator_module.LOG_LIMIT * 2):
        bounded.append(i)
    assert len(bounded) <= emulator_module.LOG_LIMIT * 11 // 10
    assert bounded[-1] == emulator_module.LOG_LIMIT * 2 - 1


def test_errors_carry_an_error_info_detail(emulator):
    error = call(emulator, "GET", f"/v1beta/{URI}/connectionInfo", token=TOKEN_DENIED).json()[
        "error"
    ]
    assert error["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "IAM_PERMISSION_DENIED",
            "domain": "googleapis.com",
            "metadata": {"service": "alloydb.googleapis.com"},
        }
    ]


def test_token_scope_and_expiry_are_checked(make_emulator):
    from proxy.emulator import Principal
    from proxy.emulator.principals import ALLOYDB_LOGIN, CLOUD_PLATFORM

    emu = make_emulator(
        tokens={
            "api": Principal("a@p.iam.gserviceaccount.com", scopes=frozenset({CLOUD_PLATFORM})),
            "login": Principal("a@p.iam.gserviceaccount.com", scopes=frozenset({ALLOYDB_LOGIN})),
            "old": Principal("a@p.iam.gserviceaccount.com", expires_at=time.time() - 1),
        }
    )
    path = f"/v1beta/{URI}/connectionInfo"
    assert call(emu, "GET", path, token="api").status_code == 200
    refused = call(emu, "GET", path, token="login")
    assert refused.status_code == 403
    assert refused.json()["error"]["details"][0]["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"
    expired = call(emu, "GET", path, token="old")
    assert expired.status_code == 401
    assert expired.json()["error"]["details"][0]["reason"] == "ACCESS_TOKEN_EXPIRED"


def test_rate_limit_answer_has_the_real_body_and_retry_after(emulator):
    emulator.faults.set(admin_status=429, admin_retry_after=7)
    resp = call(emulator, "GET", f"/v1beta/{URI}/connectionInfo")
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "7"
    error = resp.json()["error"]
    assert error["status"] == "RESOURCE_EXHAUSTED" and "Quota exceeded" in error["message"]
    assert error["details"][0]["reason"] == "RATE_LIMIT_EXCEEDED"


def test_retry_after_is_whole_seconds_and_inherited(emulator):
    with pytest.raises(ValueError, match="whole seconds"):
        emulator.faults.set(admin_retry_after="1\r\nX-Evil: 1")
    emulator.faults.set(admin_retry_after=5)  # global; the 429 is the instance's own
    emulator.instances[URI].faults.set(admin_status=429)
    assert call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").headers["Retry-After"] == "5"


def test_an_instance_without_a_private_ip(emulator):
    emulator.faults.set(no_private_ip=True)
    body = call(emulator, "GET", f"/v1beta/{URI}/connectionInfo").json()
    assert "ipAddress" not in body and body["publicIpAddress"] and body["pscDnsName"]
