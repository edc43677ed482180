"""TLSConnection: handshake, verification failures and the exchange phase."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl

import pytest

from proxy import tlsconn
from proxy.dataplane import plane as _splice
from proxy.emulator.pki import key_pem, pem

from .conftest import TLSServer, echo


async def tcp_fd(port):
    """A non-blocking TCP connection to 127.0.0.1:port, as a bare fd."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    return sock.detach()


async def connect(ctx, port, name="127.0.0.1"):
    conn = _splice.TLSConnection(ctx, await tcp_fd(port), name)
    await tlsconn.handshake(conn, timeout=10)
    return conn


def test_handshake_and_small_exchange(run, tls_server, client_context):
    server = tls_server()

    async def main():
        conn = await connect(client_context, server.port)
        assert conn.version == "TLSv1.3"
        assert conn.peer_certificate_der
        await tlsconn.send_all(conn, b"\x00\x00\x00\x02hi", timeout=5)
        assert await tlsconn.recv_exactly(conn, 6, timeout=5) == b"\x00\x00\x00\x02hi"
        conn.close()

    run(main)


def test_dns_name_verification(run, tls_server, client_context):
    server = tls_server()

    async def main():
        (await connect(client_context, server.port, "db.example.test.")).close()
        with pytest.raises(_splice.TLSError, match="certificate verify failed: hostname mismatch"):
            await connect(client_context, server.port, "other.example.test")

    run(main)


def test_ip_mismatch_refused(run, tls_server, client_context):
    server = tls_server()

    async def main():
        # Connect to 127.0.0.1 but expect the certificate of 127.0.0.9.
        conn = _splice.TLSConnection(client_context, await tcp_fd(server.port), "127.0.0.9")
        with pytest.raises(_splice.TLSError, match="IP address mismatch"):
            await tlsconn.handshake(conn, timeout=5)
        conn.close()

    run(main)


def test_unknown_ca_refused(run, tls_server, pki):
    server = tls_server()
    other = pki["other"]
    ctx = _splice.TLSClientContext(pki["chain"], pki["key"], other.root_pem.encode())

    async def main():
        with pytest.raises(_splice.TLSError, match="certificate verify failed"):
            await connect(ctx, server.port)

    run(main)


def test_tls12_server_refused(run, tls_server, client_context):
    server = tls_server(tls12_only=True)

    async def main():
        with pytest.raises(_splice.TLSError):
            await connect(client_context, server.port)

    run(main)


def test_expired_server_certificate_refused(run, pki, tmp_path):
    """A server certificate from the cluster's own CA, for the right address, but
    expired an hour ago: the handshake fails on the date, not on anything else."""
    ca = pki["ca"]
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    cert, key = ca.server_certificate(["127.0.0.1"], [], "expired", not_after=past)
    (tmp_path / "server.pem").write_bytes(pem(cert).encode() + ca.root_pem.encode())
    (tmp_path / "server.key").write_bytes(key_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    ctx.load_verify_locations(pki["files"]["root.pem"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    server = TLSServer(ctx, echo)
    client = _splice.TLSClientContext(pki["chain"], pki["key"], ca.root_pem.encode())

    async def main():
        with pytest.raises(_splice.TLSError, match="certificate has expired"):
            await connect(client, server.port)

    try:
        run(main)
    finally:
        server.close()


def test_bad_pem_is_value_error(pki):
    root = pki["ca"].root_pem.encode()
    with pytest.raises(ValueError, match="client certificate"):
        _splice.TLSClientContext(b"garbage", pki["key"], root)
    with pytest.raises(ValueError, match="private key"):
        _splice.TLSClientContext(pki["chain"], b"garbage", root)
    with pytest.raises(ValueError, match="CA certificate"):
        _splice.TLSClientContext(pki["chain"], pki["key"], b"garbage")


def test_sessions_resume_only_for_the_same_server_name(run, tls_server, pki):
    server = tls_server()

    def new_context():
        return _splice.TLSClientContext(pki["chain"], pki["key"], pki["ca"].root_pem.encode())

    async def exchange(ctx, name):
        conn = await connect(ctx, server.port, name)
        await tlsconn.send_all(conn, b"ping", timeout=5)
        assert await tlsconn.recv_exactly(conn, 4, timeout=5) == b"ping"
        conn.remember_session()  # the tickets came in with the answer
        resumed = conn.resumed
        conn.close()
        return resumed

    async def main():
        ctx = new_context()
        assert not await exchange(ctx, "127.0.0.1")
        assert await exchange(ctx, "127.0.0.1")
        assert not await exchange(ctx, "db.example.test")  # never offered across names
        assert await exchange(ctx, "db.example.test")
        assert not await exchange(new_context(), "127.0.0.1")  # a refresh starts empty

    run(main)


@pytest.mark.parametrize(
    "name", ["::1%lo", "127.0.0.1%lo", "db.example.test\0.evil", "db example", ""]
)
def test_a_name_that_cannot_be_verified_fails_the_dial(run, tls_server, client_context, name):
    """Fail closed: a scoped address once turned the IP check off (issue 10, finding 6)."""
    server = tls_server()

    async def main():
        fd = await tcp_fd(server.port)
        ours = os.fstat(fd).st_ino
        with pytest.raises(_splice.TLSError, match="invalid server name"):
            _splice.TLSConnection(client_context, fd, name)
        # Closed by the refusal: the number is free, or already another socket's
        # (the server's accept thread may take it at once).
        with contextlib.suppress(OSError):
            assert os.fstat(fd).st_ino != ours

    run(main)
