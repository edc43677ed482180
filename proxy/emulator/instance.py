"""One emulated instance: a TLS 1.3 mTLS server on port 5433 of its loopback IPs.

Theory of operation, per connection:

1. TLS 1.3 handshake; a client certificate is required and must chain to the
   cluster root (the client sends leaf + intermediate). Fault switches can
   swap in a wrong-SAN or foreign-CA server certificate during the handshake.
2. Metadata exchange (MDX), when the client certificate was issued with
   ``useMetadataExchange``: one length-prefixed request in, one response out
   (in a single write), ERROR closes the connection. For a certificate this
   emulator did not issue (e.g. static connection info) the first bytes
   decide: a PostgreSQL packet has byte 4 = 0x00 or 0x04, an MDX request a
   protobuf tag.
3. PostgreSQL front door: ``N`` to SSLRequest/GSSENCRequest (we are already
   inside TLS), CancelRequest forwarded as is, StartupMessage checked against
   the MDX principal for AUTO_IAM, then forwarded unchanged.
4. A byte relay to the real PostgreSQL until either side closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl
import struct
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509

from proxy import mdx
from proxy.emulator.faults import Faults
from proxy.emulator.pgcluster import PASSWORD_SOURCE, TRUSTED_SOURCE
from proxy.emulator.pki import ClusterCA, key_pem, pem

if TYPE_CHECKING:
    from proxy.emulator.emulator import Emulator
    from proxy.emulator.principals import Principal

PORT = 5433
MDX_TIMEOUT = 30.0
STARTUP_TIMEOUT = 60.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 196608
_MAX_STARTUP = 10000
_CHUNK = 65536


def db_user_for(email: str) -> str:
    """A service account logs in as ``name@project.iam``; a person as their email."""
    suffix = ".gserviceaccount.com"
    return email[: -len(suffix)] if email.endswith(suffix) else email


def pg_error(message: str, code: str = "28000") -> bytes:
    """A PostgreSQL ErrorResponse (severity FATAL)."""
    fields = b"".join(
        kind + value.encode() + b"\0"
        for kind, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack(">I", len(body) + 4) + body


@dataclass
class Instance:
    """An emulated instance and its addresses; ``faults`` are its own fault switches."""

    uri: str
    ca: ClusterCA
    private_ip: str
    public_ip: str = ""
    psc_ip: str = ""
    psc_dns_name: str = ""  # without the trailing dot
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    faults: Faults = field(default_factory=Faults)
    serve: bool = True  # False: another server answers on port 5433
    # Where its server forwards sessions, if not to the emulator's PostgreSQL
    # (a benchmark's echo backend): (host, port).
    backend: tuple[str, int] | None = None

    @property
    def cluster(self) -> str:
        return self.uri.rsplit("/instances/", 1)[0]

    @property
    def ips(self) -> list[str]:
        """Every address the instance's server listens on."""
        return [ip for ip in (self.private_ip, self.public_ip, self.psc_ip) if ip]

    @property
    def certificate_ips(self) -> list[str]:
        """The IP SANs of its server certificate: not the PSC endpoint, whose address
        is the consumer's and which clients verify by DNS name (as AlloyDB does)."""
        return [ip for ip in (self.private_ip, self.public_ip) if ip]


class _Reader:
    """A StreamReader with push-back, so the first bytes can be sniffed."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.pending = b""

    async def readexactly(self, n: int) -> bytes:
        if len(self.pending) >= n:
            data, self.pending = self.pending[:n], self.pending[n:]
            return data
        data, self.pending = self.pending, b""
        return data + await self.reader.readexactly(n - len(data))

    async def read(self, n: int) -> bytes:
        if self.pending:
            data, self.pending = self.pending[:n], self.pending[n:]
            return data
        return await self.reader.read(n)

    def unread(self, data: bytes) -> None:
        self.pending = data + self.pending


def _startup_user(params: bytes) -> str:
    """The ``user`` of a StartupMessage's parameters (after its 8-byte header)."""
    parts = params.split(b"\0")
    pairs = dict(zip(parts[0::2], parts[1::2], strict=False))
    return pairs.get(b"user", b"").decode("utf-8", "replace")


class _SwitchingContext(ssl.SSLContext):
    """A server context that may hand a new connection to another context.

    The listening socket keeps the context it started with; this lets a fault
    switch or a rotation decide, per connection, which one really serves it.
    """

    switch: Callable[[], ssl.SSLContext | None] | None = None

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        other = self.switch() if self.switch is not None else None
        if other is not None:
            return other.wrap_bio(*args, **kwargs)
        return super().wrap_bio(*args, **kwargs)


class InstanceServer:
    """Serves one Instance on every one of its addresses (built off the event loop)."""

    def __init__(self, emu: Emulator, inst: Instance, other_ca: ClusterCA) -> None:
        self.emu = emu
        self.inst = inst
        self.servers: list[asyncio.base_events.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._other_ca = other_ca
        self._contexts = self._build_contexts(other_ca)
        self._front = _SwitchingContext(ssl.PROTOCOL_TLS_SERVER)
        self._front.switch = self._choose_context

    def _choose_context(self) -> ssl.SSLContext:
        contexts = self._contexts  # one read: a rotation may replace the dict
        if self._fault("reject_client_certs"):
            return contexts["reject_client_certs"]
        if self._fault("no_session_resumption"):
            return contexts["no_resumption"]
        return contexts["good"]

    def prepare(self, ca: ClusterCA) -> dict[str, _SwitchingContext]:
        """Contexts with a new server certificate from ``ca`` (see ``install``)."""
        return self._build_contexts(self._other_ca, ca)

    def install(self, contexts: dict[str, _SwitchingContext]) -> None:
        """Serve new connections with ``contexts``; sessions of the old ones cannot
        be resumed (new ticket keys)."""
        self._contexts = contexts

    def _context(
        self,
        cert: x509.Certificate,
        key_bytes: bytes,
        chain_root: str,
        ca: ClusterCA,
        client_ca: str | None = None,
    ) -> _SwitchingContext:
        """A server context presenting ``cert``; client certificates must chain to
        ``ca`` (or to ``client_ca``, a PEM, for the reject fault)."""
        ctx = _SwitchingContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca or ca.root_pem)
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

    def _build_contexts(
        self, other_ca: ClusterCA, ca: ClusterCA | None = None
    ) -> dict[str, _SwitchingContext]:
        inst = self.inst
        ca = ca or inst.ca
        dns = [inst.psc_dns_name] if inst.psc_dns_name else []
        good, key = ca.server_certificate(inst.certificate_ips, dns, inst.uid)
        wrong, _ = ca.server_certificate(
            ["127.255.255.254"], ["wrong.alloydb.invalid"], inst.uid, key=key
        )
        foreign, _ = ca.server_certificate(
            inst.certificate_ips, dns, inst.uid, key=key, signer=other_ca
        )
        k = key_pem(key)
        contexts = {
            "good": self._context(good, k, ca.root_pem, ca),
            "wrong_san": self._context(wrong, k, ca.root_pem, ca),
            "unknown_ca": self._context(foreign, k, other_ca.root_pem, ca),
            "reject_client_certs": self._context(good, k, ca.root_pem, ca, other_ca.root_pem),
            "no_resumption": self._context(good, k, ca.root_pem, ca),
        }
        contexts["no_resumption"].num_tickets = 0  # TLS 1.3: no tickets, no resumption

        def choose_certificate(
            sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext
        ) -> None:
            # Called during every handshake (with or without SNI): swap in a
            # faulty certificate on demand.
            if self._fault("wrong_san"):
                sslobj.context = contexts["wrong_san"]
            elif self._fault("unknown_ca"):
                sslobj.context = contexts["unknown_ca"]

        # (The client CA cannot be swapped this way, as OpenSSL keeps the first
        # context's trust store: _choose_context hands whole connections over.)
        contexts["good"].sni_callback = choose_certificate
        contexts["no_resumption"].sni_callback = choose_certificate
        return contexts

    async def start(self) -> None:
        try:
            for ip in self.inst.ips:
                server = await asyncio.start_server(
                    self._serve,
                    ip,
                    PORT,
                    reuse_address=True,
                    ssl=self._front,
                    ssl_handshake_timeout=MDX_TIMEOUT,
                )
                self.servers.append(server)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()

    def _fault(self, name: str) -> object:
        own = getattr(self.inst.faults, name)
        return own if own not in (None, False, 0) else getattr(self.emu.faults, name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local_ip = writer.get_extra_info("sockname")[0]
        self.emu.connections.append((self.inst.uri, local_ip))
        self._writers.add(writer)
        stream = _Reader(reader)
        pg_writer: asyncio.StreamWriter | None = None
        try:
            auth_type, principal = mdx.DB_NATIVE, None
            if await self._expects_mdx(stream, writer):
                result = await self._metadata_exchange(stream, writer)
                if result is None:
                    return
                auth_type, principal = result
            pg_writer = await self._front_door(stream, writer, auth_type, principal)
        except (OSError, EOFError, TimeoutError, mdx.MdxDecodeError):
            pass  # the peer went away or misbehaved: this connection only
        finally:
            self._writers.discard(writer)
            if pg_writer is not None:
                pg_writer.close()
            writer.close()

    async def _expects_mdx(self, stream: _Reader, writer: asyncio.StreamWriter) -> bool:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
            # OpenSSL does not check the client certificate again when a session
            # is resumed; the service does not accept an expired one either way.
            raise EOFError("client certificate expired (resumed session)")
        issued = self.emu.issued.get(cert.serial_number)
        if issued is not None:
            return issued
        head = await asyncio.wait_for(stream.readexactly(5), MDX_TIMEOUT)
        stream.unread(head)
        (length,) = struct.unpack(">I", head[:4])
        return length < 8 or head[4] not in (0x00, 0x04)

    async def _metadata_exchange(
        self, stream: _Reader, writer: asyncio.StreamWriter
    ) -> tuple[int, Principal | None] | None:
        header = await asyncio.wait_for(stream.readexactly(mdx.HEADER_SIZE), MDX_TIMEOUT)
        try:
            size = mdx.body_length(header)
        except mdx.MdxDecodeError as exc:
            await self._mdx_reply(writer, str(exc))
            return None
        body = await asyncio.wait_for(stream.readexactly(size), MDX_TIMEOUT)
        try:
            request = mdx.decode_request(body)
        except mdx.MdxDecodeError as exc:
            await self._mdx_reply(writer, f"invalid metadata exchange request: {exc}")
            return None
        self.emu.mdx_requests.append((self.inst.uri, request))
        if self._fault("close_during_mdx"):
            writer.transport.abort()
            return None
        principal, error = self._check_exchange(request)
        if error:
            await self._mdx_reply(writer, error)
            return None
        await self._mdx_reply(writer, None)
        auth_type = mdx.DB_NATIVE if request.auth_type != mdx.AUTO_IAM else mdx.AUTO_IAM
        return auth_type, principal

    def _check_exchange(self, request: mdx.MdxRequest) -> tuple[Principal | None, str]:
        """The principal behind the request, or the error the server answers with."""
        injected = self._fault("mdx_error")
        if injected:
            return None, str(injected)
        if request.auth_type not in (mdx.AUTH_TYPE_UNSPECIFIED, mdx.DB_NATIVE, mdx.AUTO_IAM):
            return None, f"invalid auth type {request.auth_type}"
        if not request.oauth2_token:
            return None, "missing OAuth2 token"
        tokens = self.emu.tokens
        if tokens is None:  # demo mode: any non-empty token, but nobody to log in as
            if request.auth_type == mdx.AUTO_IAM:
                return None, (
                    "automatic IAM authentication needs a known token "
                    "(start the emulator with --token)"
                )
            return None, ""
        principal = tokens.get(request.oauth2_token)
        if principal is None:
            return None, "invalid OAuth2 token"
        if principal.expired():
            return None, "OAuth2 token expired"
        if not principal.may_log_in():
            return None, "OAuth2 token lacks the alloydb.login scope"
        if not principal.can_connect:
            return None, f"permission denied: {principal.email} lacks alloydb.instances.connect"
        return principal, ""

    @staticmethod
    async def _mdx_reply(writer: asyncio.StreamWriter, error: str | None) -> None:
        # One write, so prefix and body travel in one TLS record (Go reads each once).
        if error is None:
            writer.write(mdx.encode_response(mdx.MdxResponse(mdx.OK)))
        else:
            writer.write(mdx.encode_response(mdx.MdxResponse(mdx.ERROR, error[:4096])))
        await writer.drain()

    async def _front_door(
        self,
        stream: _Reader,
        writer: asyncio.StreamWriter,
        auth_type: int,
        principal: Principal | None,
    ) -> asyncio.StreamWriter | None:
        emu = self.emu
        while True:
            header = await asyncio.wait_for(stream.readexactly(8), STARTUP_TIMEOUT)
            length, code = struct.unpack(">II", header)
            if not 8 <= length <= _MAX_STARTUP:
                writer.write(pg_error("invalid length of startup packet", "08P01"))
                await writer.drain()
                return None
            rest = await asyncio.wait_for(stream.readexactly(length - 8), STARTUP_TIMEOUT)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")  # already inside the connector's TLS
                continue
            break
        packet = header + rest
        if code not in (CANCEL_REQUEST, PROTOCOL_3):
            writer.write(
                pg_error(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}", "0A000")
            )
            await writer.drain()
            return None
        if code == PROTOCOL_3 and auth_type == mdx.AUTO_IAM:
            user = _startup_user(rest)
            if principal is None or user != db_user_for(principal.email):
                writer.write(pg_error(f'IAM authentication failed for user "{user}"'))
                await writer.drain()
                return None
        # Only an AUTO_IAM login comes from the address PostgreSQL trusts for IAM
        # users; everything else must pass password authentication. A server
        # that is not on loopback cannot be told apart by address: there an IAM
        # user (a name with "@") is refused outright without AUTO_IAM, as an IAM
        # user has no password to give.
        local = None
        host, port = self.inst.backend or (emu.postgres_host, emu.postgres_port)
        if self.inst.backend is not None:
            pass  # not PostgreSQL: no source address to choose
        elif emu.postgres_on_loopback():
            local = (TRUSTED_SOURCE if auth_type == mdx.AUTO_IAM else PASSWORD_SOURCE, 0)
        elif code == PROTOCOL_3 and auth_type != mdx.AUTO_IAM and "@" in _startup_user(rest):
            user = _startup_user(rest)
            writer.write(pg_error(f'password authentication failed for user "{user}"', "28P01"))
            await writer.drain()
            return None
        try:
            pg_reader, pg_writer = await asyncio.open_connection(host, port, local_addr=local)
        except OSError as exc:
            writer.write(pg_error(f"could not connect to the database server: {exc}", "08006"))
            await writer.drain()
            return None
        pg_writer.write(packet)  # the StartupMessage (or CancelRequest), unchanged
        await pg_writer.drain()
        if code == PROTOCOL_3:
            await self._relay(stream, writer, pg_reader, pg_writer)
        return pg_writer

    async def _relay(
        self,
        stream: _Reader,
        writer: asyncio.StreamWriter,
        pg_reader: asyncio.StreamReader,
        pg_writer: asyncio.StreamWriter,
    ) -> None:
        reset_after = self._fault("reset_after_bytes")
        limit = reset_after if isinstance(reset_after, int) and reset_after > 0 else None

        async def client_to_pg() -> None:
            while data := await stream.read(_CHUNK):
                pg_writer.write(data)
                await pg_writer.drain()
            if pg_writer.can_write_eof():
                pg_writer.write_eof()  # pass the client's EOF on; PostgreSQL then closes

        async def pg_to_client() -> None:
            sent = 0
            while data := await pg_reader.read(_CHUNK):
                if limit is not None and sent + len(data) >= limit:
                    writer.write(data[: limit - sent])
                    await writer.drain()
                    self._reset(writer)
                    return
                writer.write(data)
                sent += len(data)
                await writer.drain()

        upstream = asyncio.ensure_future(client_to_pg())
        downstream = asyncio.ensure_future(pg_to_client())
        try:
            # Either direction ending ends the session: PostgreSQL closing, or the
            # client going away (EOF/error) - then nothing more will be read.
            await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
            if upstream.done() and upstream.exception() is None and not downstream.done():
                # Client half-closed cleanly: let PostgreSQL's last bytes through.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(downstream), 5)
        finally:
            for task in (upstream, downstream):
                task.cancel()
            await asyncio.gather(upstream, downstream, return_exceptions=True)

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        """Abort with an RST (SO_LINGER 0) instead of a TLS close_notify/FIN."""
        raw = writer.get_extra_info("socket")
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
