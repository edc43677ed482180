"""One emulated instance: a TLS 1.3 mTLS server on port 5433 of its loopback IPs.

Per connection: TLS handshake (client certificate required, verified against
the cluster root), the metadata exchange when the client certificate was
issued with ``useMetadataExchange``, then the PostgreSQL front door (``N`` to
SSLRequest/GSSENCRequest, CancelRequest forwarded, StartupMessage checked
for AUTO_IAM), then a byte relay to the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography import x509

from proxy import mdx
from proxy.emulator.faults import Faults
from proxy.emulator.pki import ClusterCA, key_pem, pem

if TYPE_CHECKING:
    from proxy.emulator.emulator import Emulator

PORT = 5433
MDX_TIMEOUT = 30.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 196608
_MAX_STARTUP = 10000


def db_user_for(email: str) -> str:
    """A service account logs in as ``name@project.iam``; a person as their email."""
    suffix = ".gserviceaccount.com"
    return email[: -len(suffix)] if email.endswith(suffix) else email


def pg_error(message: str, code: str = "28000") -> bytes:
    fields = b"".join(
        kind + value.encode() + b"\0"
        for kind, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack(">I", len(body) + 4) + body


@dataclass
class Instance:
    uri: str
    ca: ClusterCA
    private_ip: str
    public_ip: str = ""
    psc_ip: str = ""
    psc_dns_name: str = ""
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    faults: Faults = field(default_factory=Faults)
    serve: bool = True  # False: another server answers on port 5433

    @property
    def ips(self) -> list[str]:
        return [ip for ip in (self.private_ip, self.public_ip, self.psc_ip) if ip]


class InstanceServer:
    """Serves one Instance on every one of its addresses."""

    def __init__(self, emu: Emulator, inst: Instance, other_ca: ClusterCA) -> None:
        self.emu = emu
        self.inst = inst
        self.servers: list[asyncio.base_events.Server] = []
        self._contexts = self._build_contexts(other_ca)

    def _context(self, cert: x509.Certificate, key_bytes: bytes, chain_root: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.inst.ca.root_pem)
        # ssl only loads certificates from files: write them to a private temp dir.
        with tempfile.TemporaryDirectory() as tmp:
            cert_path = os.path.join(tmp, "cert.pem")
            key_path = os.path.join(tmp, "key.pem")
            with open(cert_path, "w", encoding="ascii") as fh:
                fh.write(pem(cert) + chain_root)
            with open(key_path, "wb") as fh:
                fh.write(key_bytes)
            ctx.load_cert_chain(cert_path, key_path)
        return ctx

    def _build_contexts(self, other_ca: ClusterCA) -> dict[str, ssl.SSLContext]:
        inst = self.inst
        dns = [inst.psc_dns_name] if inst.psc_dns_name else []
        good, key = inst.ca.server_certificate(inst.ips, dns, inst.uid)
        wrong, _ = inst.ca.server_certificate(
            ["127.255.255.254"], ["wrong.alloydb.invalid"], inst.uid, key=key
        )
        foreign, _ = inst.ca.server_certificate(inst.ips, dns, inst.uid, key=key, signer=other_ca)
        k = key_pem(key)
        contexts = {
            "good": self._context(good, k, inst.ca.root_pem),
            "wrong_san": self._context(wrong, k, inst.ca.root_pem),
            "unknown_ca": self._context(foreign, k, other_ca.root_pem),
        }

        def choose_certificate(
            sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext
        ) -> None:
            # Called during every handshake: swap in a faulty certificate on demand.
            if self._fault("wrong_san"):
                sslobj.context = contexts["wrong_san"]
            elif self._fault("unknown_ca"):
                sslobj.context = contexts["unknown_ca"]

        contexts["good"].sni_callback = choose_certificate
        return contexts

    async def start(self) -> None:
        try:
            for ip in self.inst.ips:
                server = await asyncio.start_server(
                    self._serve,
                    ip,
                    PORT,
                    reuse_address=True,
                    ssl=self._contexts["good"],
                    ssl_handshake_timeout=MDX_TIMEOUT,
                )
                self.servers.append(server)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()

    def _fault(self, name: str) -> object:
        own = getattr(self.inst.faults, name)
        return own if own not in (None, False, 0) else getattr(self.emu.faults, name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local_ip = writer.get_extra_info("sockname")[0]
        self.emu.connections.append((self.inst.uri, local_ip))
        pg_writer: asyncio.StreamWriter | None = None
        try:
            auth_type = mdx.DB_NATIVE
            principal = None
            if self._expects_mdx(writer):
                result = await self._metadata_exchange(reader, writer)
                if result is None:
                    return
                auth_type, principal = result
            pg_writer = await self._front_door(reader, writer, auth_type, principal)
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            TimeoutError,
            ssl.SSLError,
            mdx.MdxDecodeError,
        ):
            pass
        finally:
            if pg_writer is not None:
                pg_writer.close()
            writer.close()

    def _expects_mdx(self, writer: asyncio.StreamWriter) -> bool:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        serial = x509.load_der_x509_certificate(der).serial_number
        return self.emu.issued.get(serial, False)

    async def _metadata_exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, object] | None:
        size = mdx.body_length(await asyncio.wait_for(reader.readexactly(4), MDX_TIMEOUT))
        body = await asyncio.wait_for(reader.readexactly(size), MDX_TIMEOUT)
        request = mdx.decode_request(body)
        self.emu.mdx_requests.append((self.inst.uri, request))
        if self._fault("close_during_mdx"):
            writer.transport.abort()
            return None
        error = self._fault("mdx_error")
        principal = None
        if not error:
            tokens = self.emu.tokens
            if tokens is not None:
                principal = tokens.get(request.oauth2_token)
                if principal is None:
                    error = "invalid or expired OAuth2 token"
                elif not principal.can_connect:
                    error = f"permission denied: {principal.email} lacks alloydb.instances.connect"
            elif request.auth_type == mdx.AUTO_IAM:
                error = "automatic IAM authentication needs a known token (start the emulator with --token)"
        if error:
            writer.write(mdx.encode_response(mdx.MdxResponse(mdx.ERROR, str(error))))
            await writer.drain()
            return None
        writer.write(mdx.encode_response(mdx.MdxResponse(mdx.OK)))
        await writer.drain()
        return request.auth_type, principal

    async def _front_door(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        auth_type: int,
        principal: object,
    ) -> asyncio.StreamWriter | None:
        emu = self.emu
        while True:
            header = await reader.readexactly(8)
            length, code = struct.unpack(">II", header)
            if not 8 <= length <= _MAX_STARTUP:
                writer.write(pg_error("invalid startup packet length", "08P01"))
                return None
            rest = await reader.readexactly(length - 8)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")  # already inside the connector's TLS
                continue
            break
        packet = header + rest
        pg_reader, pg_writer = await asyncio.open_connection(emu.postgres_host, emu.postgres_port)
        if code == CANCEL_REQUEST:
            pg_writer.write(packet)
            await pg_writer.drain()
            return pg_writer
        if code != PROTOCOL_3:
            writer.write(pg_error("unsupported frontend protocol", "08P01"))
            return pg_writer
        parts = rest.split(b"\0")
        params = dict(zip(parts[0::2], parts[1::2], strict=False))
        user = params.get(b"user", b"").decode("utf-8", "replace")
        if auth_type == mdx.AUTO_IAM:
            expected = db_user_for(getattr(principal, "email", ""))
            if user != expected:
                writer.write(pg_error(f'IAM authentication failed for user "{user}"'))
                await writer.drain()
                return pg_writer
        pg_writer.write(packet)
        await self._relay(reader, writer, pg_reader, pg_writer)
        return pg_writer

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pg_reader: asyncio.StreamReader,
        pg_writer: asyncio.StreamWriter,
    ) -> None:
        reset_after = self._fault("reset_after_bytes")

        async def client_to_pg() -> None:
            while data := await reader.read(65536):
                pg_writer.write(data)
                await pg_writer.drain()
            if pg_writer.can_write_eof():
                pg_writer.write_eof()

        async def pg_to_client() -> None:
            sent = 0
            while data := await pg_reader.read(65536):
                if isinstance(reset_after, int) and reset_after and sent + len(data) > reset_after:
                    raw = writer.get_extra_info("socket")
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                writer.write(data)
                sent += len(data)
                await writer.drain()

        upstream = asyncio.ensure_future(client_to_pg())
        try:
            await pg_to_client()
        finally:
            upstream.cancel()
            await asyncio.gather(upstream, return_exceptions=True)
