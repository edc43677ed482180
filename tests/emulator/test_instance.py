"""The per-instance server on port 5433: TLS, metadata exchange, PostgreSQL front door, relay.

Clients here are Python's ssl, proxy.mdx and pg8000 on an injected socket, the
way the official connector hands its TLS socket to pg8000.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
import struct
import sys
import threading
import time

import pg8000.native
import pytest
from cryptography import x509

from proxy import mdx
from proxy.emulator import Emulator, db_user_for
from proxy.emulator.emulator import allocate_ip

from ..conftest import (
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    IAM_DB_USER,
    SA_EMAIL,
    TOKEN_APP,
    TOKEN_DENIED,
    TOKEN_IAM,
    TOKENS,
    URI,
)
from .clients import (
    CLUSTER,
    client_context,
    client_key,
    error_fields,
    exchange,
    issue,
    read_pg_message,
    recv_exactly,
    server_certificate,
    startup_message,
    tls_client,
)

# Golden frames (protocol reference §5.6, computed with the real generated protobuf classes).
OK_FRAME = bytes.fromhex("000000020801")
ERROR_BAD_FRAME = bytes.fromhex("0000000708021203626164")
# The official connector 1.14.1 (pg8000, AUTO_IAM, token "tok"), as captured on the wire.
CAPTURED_REQUEST = bytes.fromhex(
    "0000002f0a26616c6c6f7964622d707974686f6e2d636f6e6e6563746f72"
    "2f312e31342e312b7067383030301002 1a03746f6b".replace(" ", "")
)


def login(tls: ssl.SSLSocket, user: str, password: str | None = None) -> pg8000.native.Connection:
    """pg8000 on our TLS socket; ssl_context=None makes it send an SSLRequest first."""
    return pg8000.native.Connection(user, database=DB_NAME, password=password, sock=tls)


def mdx_login(emu, token: str, auth_type: int, user: str, password: str | None = None):
    tls = tls_client(emu, emu.instances[URI].private_ip)
    assert exchange(tls, token, auth_type).ok
    return login(tls, user, password)


# ---- TLS --------------------------------------------------------------------


def test_server_certificate_profile(emulator):
    inst = emulator.instances[URI]
    with tls_client(emulator, inst.private_ip) as tls:
        assert tls.version() == "TLSv1.3"
        cert = server_certificate(tls)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Not the PSC endpoint's IP: the real server cannot know it; PSC is verified by name.
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(ip) for ip in (inst.private_ip, inst.public_ip)
    }
    assert san.get_values_for_type(x509.DNSName) == [inst.psc_dns_name]
    assert not inst.psc_dns_name.endswith(".")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.ExtendedKeyUsageOID.SERVER_AUTH
    ]
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == f"{inst.uid}.server.alloydb"


def test_every_address_verifies_by_ip_or_psc_name(emulator):
    inst = emulator.instances[URI]
    for ip in (inst.private_ip, inst.public_ip):
        with tls_client(emulator, ip) as tls:
            assert tls.version() == "TLSv1.3"
    # PSC: the name resolves to psc_ip (via hosts_entries); verified as a DNS SAN.
    assert f"{inst.psc_ip} {inst.psc_dns_name}" in emulator.hosts_entries()
    with tls_client(emulator, inst.psc_ip, server_hostname=inst.psc_dns_name) as tls:
        assert tls.version() == "TLSv1.3"
    # The dotted form is not in the certificate (OpenSSL would not match it).
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_client(emulator, inst.psc_ip, server_hostname=inst.psc_dns_name + ".").close()
    # Nor is the PSC endpoint's IP: a client verifying PSC by IP fails.
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        tls_client(emulator, inst.psc_ip).close()


def test_tls12_is_refused(emulator):
    inst = emulator.instances[URI]
    body_ctx = tls_client(emulator, inst.private_ip)  # a valid certificate, for contrast
    body_ctx.close()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        pytest.raises(ssl.SSLError),
        socket.create_connection((inst.private_ip, 5433), timeout=10) as raw,
    ):
        ctx.wrap_socket(raw)


def test_client_certificate_is_required(emulator):
    inst = emulator.instances[URI]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection((inst.private_ip, 5433), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
        pytest.raises((ssl.SSLError, ConnectionError, EOFError)),
    ):
        # TLS 1.3: the server's verdict on the client arrives with the first read.
        exchange(tls, TOKEN_APP)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("wrong_san", "IP address mismatch"), ("unknown_ca", "certificate verify failed")],
)
def test_certificate_faults_fail_verification(emulator, fault, reason):
    inst = emulator.instances[URI]
    inst.faults.set(**{fault: True})
    with pytest.raises(ssl.SSLCertVerificationError, match=reason):
        tls_client(emulator, inst.private_ip)
    assert emulator.mdx_requests == []
    inst.faults.clear()
    tls_client(emulator, inst.private_ip).close()


def test_wrong_san_chain_itself_is_valid(emulator):
    inst = emulator.instances[URI]
    inst.faults.set(wrong_san=True)
    with tls_client(emulator, inst.private_ip, server_hostname="127.255.255.254") as tls:
        assert tls.version() == "TLSv1.3"


def test_client_certificate_of_another_cluster_is_rejected(emulator):
    other_uri = URI.replace("clusters/clust", "clusters/elsewhere")
    other = emulator.add_instance(other_uri)
    # A certificate for CLUSTER, shown to an instance of another cluster.
    with (
        pytest.raises((ssl.SSLError, ConnectionError, EOFError)),
        tls_client(emulator, other.private_ip, cluster=CLUSTER) as tls,
    ):
        exchange(tls, TOKEN_APP)  # refused at the first read (TLS 1.3)
    with tls_client(emulator, other.private_ip, cluster=other_uri.split("/instances/")[0]) as tls:
        assert exchange(tls, TOKEN_APP).ok


# ---- metadata exchange --------------------------------------------------------


def test_the_codec_matches_the_wire_format_examples():
    """The emulator and the proxy share proxy/mdx.py: pin it to the documented bytes."""
    native = mdx.MdxRequest("x/1.0", mdx.DB_NATIVE, "tok")
    auto = mdx.MdxRequest("x/1.0", mdx.AUTO_IAM, "tok")
    assert mdx.encode_request(auto).hex() == "0000000e0a05782f312e3010021a03746f6b"
    assert mdx.encode_request(native).hex() == "0000000e0a05782f312e3010011a03746f6b"
    assert mdx.decode_request(bytes.fromhex("0a05782f312e3010021a03746f6b")) == auto
    assert mdx.encode_response(mdx.MdxResponse(mdx.OK)).hex() == "000000020801"
    error = mdx.MdxResponse(mdx.ERROR, "bad")
    assert mdx.encode_response(error).hex() == "0000000708021203626164"
    assert mdx.decode_response(bytes.fromhex("08021203626164")) == error
    assert not mdx.decode_response(b"").ok  # an empty response is a failure
    long_token = mdx.encode_request(mdx.MdxRequest("", mdx.AUTO_IAM, "t" * 300))
    assert long_token[4:10].hex() == "10021aac0274"  # the length as a two-byte varint
    assert mdx.decode_request(CAPTURED_REQUEST[4:]) == mdx.MdxRequest(
        "alloydb-python-connector/1.14.1+pg8000", mdx.AUTO_IAM, "tok"
    )


def test_golden_frames(emulator):
    inst = emulator.instances[URI]
    emulator.tokens["tok"] = emulator.tokens[TOKEN_IAM]
    with tls_client(emulator, inst.private_ip) as tls:
        tls.sendall(CAPTURED_REQUEST)
        assert recv_exactly(tls, 6) == OK_FRAME
    uri, request = emulator.mdx_requests[-1]
    assert uri == URI
    assert request == mdx.MdxRequest("alloydb-python-connector/1.14.1+pg8000", mdx.AUTO_IAM, "tok")
    inst.faults.set(mdx_error="bad")
    with tls_client(emulator, inst.private_ip) as tls:
        tls.sendall(CAPTURED_REQUEST)
        assert recv_exactly(tls, len(ERROR_BAD_FRAME)) == ERROR_BAD_FRAME
        assert tls.recv(1) == b""  # closed after ERROR


@pytest.mark.parametrize(
    ("tokens", "token", "auth_type", "message"),
    [
        ("default", "unknown", mdx.DB_NATIVE, "invalid OAuth2 token"),
        ("default", TOKEN_DENIED, mdx.DB_NATIVE, "permission denied"),
        ("default", "", mdx.DB_NATIVE, "missing OAuth2 token"),
        ("default", TOKEN_APP, 7, "invalid auth type 7"),
        ("scoped", "api-only", mdx.AUTO_IAM, "lacks the alloydb.login scope"),
        ("scoped", "expired", mdx.DB_NATIVE, "OAuth2 token expired"),
        (None, "", mdx.DB_NATIVE, "missing OAuth2 token"),
        (None, "anything", mdx.AUTO_IAM, "automatic IAM authentication needs a known token"),
    ],
)
def test_exchange_refusals(make_emulator, tokens, token, auth_type, message):
    from proxy.emulator import Principal

    if tokens == "scoped":
        tokens = {
            TOKEN_APP: Principal("app@p.iam.gserviceaccount.com"),
            "api-only": Principal(SA_EMAIL, scopes=frozenset({"https://example.invalid/other"})),
            "expired": Principal(SA_EMAIL, expires_at=time.time() - 1),
        }
    emu = make_emulator() if tokens == "default" else make_emulator(tokens=tokens)
    with tls_client(emu, emu.instances[URI].private_ip) as tls:
        resp = exchange(tls, token, auth_type)
        assert resp.response_code == mdx.ERROR and message in resp.error
        assert tls.recv(1) == b""


def test_accept_any_token_allows_db_native(make_emulator):
    emu = make_emulator(tokens=None)
    conn = mdx_login(emu, "anything", mdx.DB_NATIVE, DB_USER, DB_PASSWORD)
    assert conn.run("SELECT current_user") == [[DB_USER]]
    conn.close()


def test_mdx_error_fault_global_and_per_instance(emulator):
    inst = emulator.instances[URI]
    emulator.faults.set(mdx_error="global trouble")
    with tls_client(emulator, inst.private_ip) as tls:
        assert exchange(tls, TOKEN_APP).error == "global trouble"
    inst.faults.set(mdx_error="local trouble")  # the instance's own switch wins
    with tls_client(emulator, inst.private_ip) as tls:
        assert exchange(tls, TOKEN_APP).error == "local trouble"


def test_close_during_mdx(emulator):
    inst = emulator.instances[URI]
    emulator.faults.set(close_during_mdx=True)
    with tls_client(emulator, inst.private_ip) as tls, pytest.raises((EOFError, OSError)):
        exchange(tls, TOKEN_APP)
    assert emulator.mdx_requests[-1][1].oauth2_token == TOKEN_APP


def test_oversized_mdx_request_is_refused(emulator):
    inst = emulator.instances[URI]
    with tls_client(emulator, inst.private_ip) as tls:
        tls.sendall(struct.pack(">I", mdx.MAX_MESSAGE_SIZE + 1))
        size = mdx.body_length(recv_exactly(tls, 4))
        resp = mdx.decode_response(recv_exactly(tls, size))
        assert resp.response_code == mdx.ERROR and "exceeds" in resp.error


# ---- PostgreSQL ----------------------------------------------------------------


def test_db_native_login_with_password(emulator):
    conn = mdx_login(emulator, TOKEN_APP, mdx.DB_NATIVE, DB_USER, DB_PASSWORD)
    assert conn.run("SELECT current_user, current_database()") == [[DB_USER, DB_NAME]]
    conn.close()
    assert emulator.mdx_requests[-1][1].auth_type == mdx.DB_NATIVE


def test_db_native_wrong_password_is_postgres_own_refusal(emulator):
    with pytest.raises(pg8000.native.DatabaseError) as info:
        mdx_login(emulator, TOKEN_APP, mdx.DB_NATIVE, DB_USER, "wrong")
    assert info.value.args[0]["C"] == "28P01"


def test_auto_iam_login_without_password(emulator):
    conn = mdx_login(emulator, TOKEN_IAM, mdx.AUTO_IAM, IAM_DB_USER)
    assert conn.run("SELECT current_user") == [[IAM_DB_USER]]
    conn.close()


def test_iam_user_needs_auto_iam(emulator):
    """Under DB_NATIVE an IAM user meets password authentication (and has no password)."""
    with pytest.raises(pg8000.native.DatabaseError) as info:
        mdx_login(emulator, TOKEN_IAM, mdx.DB_NATIVE, IAM_DB_USER, "any password")
    assert info.value.args[0]["C"] == "28P01"  # password authentication failed
    tls = tls_client(emulator, emulator.instances[URI].private_ip, use_mdx=False)
    with pytest.raises(pg8000.native.DatabaseError) as info:
        login(tls, IAM_DB_USER, "any password")
    assert info.value.args[0]["C"] == "28P01"


def test_iam_user_needs_auto_iam_whatever_the_postgres_host_is_called(pg):
    """ "localhost" is loopback too: the source address is still chosen."""
    emu = Emulator(postgres_host="localhost", postgres_port=pg.port, tokens=dict(TOKENS))
    emu.add_instance(URI)
    emu.start()
    try:
        assert emu.postgres_on_loopback()
        with pytest.raises(pg8000.native.DatabaseError) as info:
            mdx_login(emu, TOKEN_IAM, mdx.DB_NATIVE, IAM_DB_USER, "any password")
        assert info.value.args[0]["C"] == "28P01"
        conn = mdx_login(emu, TOKEN_IAM, mdx.AUTO_IAM, IAM_DB_USER)
        assert conn.run("SELECT current_user") == [[IAM_DB_USER]]
        conn.close()
    finally:
        emu.stop()


def test_without_loopback_iam_users_are_refused_by_name(emulator):
    """A PostgreSQL elsewhere cannot be told apart by source address."""
    emulator._postgres_loopback = False
    with pytest.raises(pg8000.native.DatabaseError) as info:
        mdx_login(emulator, TOKEN_IAM, mdx.DB_NATIVE, IAM_DB_USER, "any password")
    assert info.value.args[0]["C"] == "28P01"
    conn = mdx_login(emulator, TOKEN_APP, mdx.DB_NATIVE, DB_USER, DB_PASSWORD)
    assert conn.run("SELECT current_user") == [[DB_USER]]
    conn.close()


def test_an_expired_client_certificate_cannot_resume_a_session(emulator):
    """OpenSSL does not look at the certificate again on resumption; the emulator does."""
    ip = emulator.instances[URI].private_ip
    emulator.faults.set(cert_lifetime=3)
    body = issue(emulator)
    ctx = client_context(body["pemCertificateChain"], body["caCert"])
    with (
        socket.create_connection((ip, 5433), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=ip) as tls,
    ):
        assert exchange(tls, TOKEN_APP).ok
        session = tls.session
    time.sleep(4)
    with (
        socket.create_connection((ip, 5433), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=ip, session=session) as tls,
        pytest.raises((EOFError, OSError)),
    ):
        exchange(tls, TOKEN_APP)


def test_auto_iam_with_another_user_is_refused(emulator):
    with pytest.raises(pg8000.native.DatabaseError) as info:
        mdx_login(emulator, TOKEN_APP, mdx.AUTO_IAM, IAM_DB_USER)  # token of app-sa
    error = info.value.args[0]
    assert error["S"] == "FATAL" and error["C"] == "28000"
    assert error["M"] == f'IAM authentication failed for user "{IAM_DB_USER}"'


def test_auto_iam_raw_bytes(emulator):
    inst = emulator.instances[URI]
    with tls_client(emulator, inst.private_ip) as tls:
        assert exchange(tls, TOKEN_IAM, mdx.AUTO_IAM).ok
        tls.sendall(bytes.fromhex("0000000804d2162f"))  # SSLRequest
        assert tls.recv(1) == b"N"
        tls.sendall(bytes.fromhex("0000000804d21630"))  # GSSENCRequest
        assert tls.recv(1) == b"N"
        tls.sendall(startup_message(user="someone@else.iam", database="postgres"))
        kind, body = read_pg_message(tls)
        assert kind == b"E" and error_fields(body)["C"] == "28000"
        assert tls.recv(1) == b""


def test_db_user_for():
    assert db_user_for("x@p.iam.gserviceaccount.com") == "x@p.iam"
    assert db_user_for("person@example.com") == "person@example.com"


def test_certificate_without_metadata_exchange_goes_straight_to_postgres(emulator):
    inst = emulator.instances[URI]
    tls = tls_client(emulator, inst.private_ip, use_mdx=False)
    conn = login(tls, DB_USER, DB_PASSWORD)
    assert conn.run("SELECT 1") == [[1]]
    conn.close()
    assert emulator.mdx_requests == []


@pytest.mark.parametrize("with_mdx", [True, False])
def test_certificate_not_issued_here_is_sniffed(emulator, with_mdx):
    """Static connection info: the certificate is the cluster's but unknown to the API log."""
    inst = emulator.instances[URI]
    ca = emulator.clusters[CLUSTER]
    leaf = ca.client_certificate(client_key().public_key(), dt.timedelta(hours=1))
    ctx = client_context(ca.chain_pems(leaf), ca.root_pem)
    tls = ctx.wrap_socket(
        socket.create_connection((inst.private_ip, 5433), timeout=10),
        server_hostname=inst.private_ip,
    )
    if with_mdx:
        assert exchange(tls, TOKEN_APP).ok
    conn = login(tls, DB_USER, DB_PASSWORD)
    assert conn.run("SELECT 2") == [[2]]
    conn.close()
    assert len(emulator.mdx_requests) == int(with_mdx)


def test_restart_aborts_connections_and_serves_again(emulator):
    inst = emulator.instances[URI]
    body = issue(emulator)
    ctx = client_context(body["pemCertificateChain"], body["caCert"])
    tls = ctx.wrap_socket(
        socket.create_connection((inst.private_ip, 5433), timeout=10),
        server_hostname=inst.private_ip,
    )
    assert exchange(tls, TOKEN_APP).ok
    restarting = threading.Thread(
        target=emulator.restart_instance, args=(URI,), kwargs={"down_for": 1.0}
    )
    restarting.start()
    time.sleep(0.5)
    with pytest.raises(OSError):  # down: the port refuses
        socket.create_connection((inst.private_ip, 5433), timeout=5).close()
    restarting.join(30)
    # The open connection was aborted: an EOF, or a reset if bytes were unread.
    with contextlib.suppress(ConnectionResetError, ssl.SSLEOFError):
        assert tls.recv(1) == b""
    tls.close()
    again = ctx.wrap_socket(
        socket.create_connection((inst.private_ip, 5433), timeout=10),
        server_hostname=inst.private_ip,
    )
    assert exchange(again, TOKEN_APP).ok
    again.close()


async def test_reset_after_bytes(emulator):
    # Python's blocking ssl sockets report a reset as a ragged EOF; asyncio's
    # transport reads the raw socket and so can tell an RST from a FIN.
    inst = emulator.instances[URI]
    inst.faults.set(reset_after_bytes=100_000)
    body = await asyncio.to_thread(issue, emulator)
    ctx = client_context(body["pemCertificateChain"], body["caCert"])
    reader, writer = await asyncio.open_connection(
        inst.private_ip, 5433, ssl=ctx, server_hostname=inst.private_ip
    )
    try:
        writer.write(mdx.encode_request(mdx.MdxRequest("t", mdx.AUTO_IAM, TOKEN_IAM)))
        assert await reader.readexactly(6) == OK_FRAME
        writer.write(startup_message(user=IAM_DB_USER, database=DB_NAME))
        query = b"SELECT repeat('x', 1000000)\0"
        writer.write(b"Q" + struct.pack(">I", len(query) + 4) + query)
        received = 0
        with pytest.raises(ConnectionResetError):
            while chunk := await reader.read(65536):
                received += len(chunk)
        assert 0 < received <= 100_000
    finally:
        writer.close()


def test_cancel_request_is_forwarded(emulator):
    conn = mdx_login(emulator, TOKEN_APP, mdx.DB_NATIVE, DB_USER, DB_PASSWORD)
    key_data = conn._backend_key_data  # pid + secret, from BackendKeyData
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            conn.run("SELECT pg_sleep(20)")
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=slow)
    began = time.monotonic()
    worker.start()
    time.sleep(0.3)
    with tls_client(emulator, emulator.instances[URI].private_ip) as tls:
        assert exchange(tls, TOKEN_APP).ok
        tls.sendall(struct.pack(">II", 16, 80877102) + key_data)
        assert tls.recv(1) == b""  # PostgreSQL closes a cancel connection without a word
    worker.join(20)
    conn.close()
    assert time.monotonic() - began < 10
    assert errors and errors[0].args[0]["C"] == "57014"  # query_canceled


def test_sessions_leave_nothing_behind(emulator, pg):
    def backends() -> set[str]:
        # By pid: a session of an earlier test may still be ending meanwhile.
        rows = pg.psql(f"SELECT pid FROM pg_stat_activity WHERE usename = '{DB_USER}'")
        return set(rows.split())

    before = backends()
    conns = [mdx_login(emulator, TOKEN_APP, mdx.DB_NATIVE, DB_USER, DB_PASSWORD) for _ in range(5)]
    ours = backends() - before
    assert len(ours) == 5
    for conn in conns[:3]:
        conn.close()  # Terminate, then close
    for conn in conns[3:]:
        conn._sock.close()  # the client just vanishes
        conn._usock.close()
    deadline = time.monotonic() + 10
    while backends() & ours and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not backends() & ours


# ---- the emulator object ---------------------------------------------------------


def test_addresses_are_distinct_loopback_ips(emulator):
    second = emulator.add_instance(
        URI.replace("/instances/inst", "/instances/second"), public_ip=True
    )
    first = emulator.instances[URI]
    ips = [first.private_ip, first.public_ip, first.psc_ip, second.private_ip, second.public_ip]
    assert len(set(ips)) == len(ips)
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("127.0.0.0/8") for ip in ips)
    assert second.psc_ip == "" and second.psc_dns_name == ""
    assert allocate_ip().split(".")[1] == str(100 + os.getpid() % 100)
    with tls_client(emulator, second.public_ip) as tls:
        assert exchange(tls, TOKEN_APP).ok


def test_add_instance_validates(emulator):
    with pytest.raises(ValueError):
        emulator.add_instance("projects/p/instances/i")
    with pytest.raises(ValueError):
        emulator.add_instance(URI)


def test_stop_closes_every_socket(make_emulator):
    emu = make_emulator()
    inst = emu.instances[URI]
    conn = mdx_login(emu, TOKEN_APP, mdx.DB_NATIVE, DB_USER, DB_PASSWORD)
    admin = emu.admin_url
    emu.stop()
    emu.stop()  # idempotent
    for ip in inst.ips:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ip, 5433), timeout=2)
    host, port = admin[len("http://") :].split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2)
    with pytest.raises(pg8000.native.InterfaceError):
        conn.run("SELECT 1")  # the live session was closed too


def test_failed_start_closes_what_did_start(pg):
    emu = Emulator(postgres_host=pg.host, postgres_port=pg.port, tokens=None)
    inst = emu.add_instance(URI)
    with socket.socket() as squatter:
        squatter.bind((inst.private_ip, 5433))
        squatter.listen()
        with pytest.raises(OSError):
            emu.start()
    # The Admin API, which did start, was closed again.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", emu._admin.port), timeout=2)
    emu.stop()


# ---- rotation and resumption ----------------------------------------------------


def resumed_twice(emu, ip: str) -> list[bool]:
    """Two sessions with one context (the second may resume the first)."""
    body = issue(emu)
    ctx = client_context(body["pemCertificateChain"], body["caCert"])
    out, session = [], None
    for _ in range(2):
        raw = socket.create_connection((ip, 5433), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=ip, session=session) as tls:
            assert exchange(tls, TOKEN_APP).ok  # tickets arrive with the first data
            out.append(tls.session_reused)
            session = tls.session
    return out


def test_sessions_resume_unless_switched_off(emulator):
    ip = emulator.instances[URI].private_ip
    assert resumed_twice(emulator, ip) == [False, True]
    emulator.faults.set(no_session_resumption=True)
    assert resumed_twice(emulator, ip) == [False, False]


def test_rotating_the_server_certificate_and_ca(emulator):
    inst = emulator.instances[URI]
    old = issue(emulator)
    with tls_client(emulator, inst.private_ip) as tls:
        first = server_certificate(tls)
    emulator.rotate_server_certificate(URI)
    with tls_client(emulator, inst.private_ip) as tls:
        assert server_certificate(tls).serial_number != first.serial_number
    emulator.rotate_server_certificate(URI, new_ca=True)
    new = issue(emulator)
    assert new["caCert"] != old["caCert"]
    # A client still trusting the old CA refuses the server...
    ctx = client_context(old["pemCertificateChain"], old["caCert"])
    with (
        socket.create_connection((inst.private_ip, 5433), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname=inst.private_ip)
    # ...and a client certificate of the old CA is refused by the server.
    ctx = client_context(old["pemCertificateChain"], new["caCert"])
    with (
        socket.create_connection((inst.private_ip, 5433), timeout=10) as raw,
        pytest.raises((ssl.SSLError, OSError, EOFError)),
        ctx.wrap_socket(raw, server_hostname=inst.private_ip) as tls,
    ):
        exchange(tls, TOKEN_APP)
    with tls_client(emulator, inst.private_ip) as tls:
        assert exchange(tls, TOKEN_APP).ok


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio drops the alert before 3.11")
@pytest.mark.parametrize(
    ("fault", "alert"),
    [
        ({"reject_client_certs": True}, "alert unknown ca"),
        ({"cert_lifetime": -60}, "alert certificate expired"),
    ],
)
def test_a_refused_client_certificate_gets_a_tls_alert(emulator, fault, alert):
    """Under TLS 1.3 the client sees the server's refusal on its first read: an alert
    naming the reason, not a bare EOF."""
    emulator.faults.set(**fault)
    with (
        tls_client(emulator, emulator.instances[URI].private_ip) as tls,
        pytest.raises(ssl.SSLError, match=alert),
    ):
        exchange(tls, TOKEN_APP)
