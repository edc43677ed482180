"""The portable data plane: the native core's API on the ``ssl`` module and the event loop.

Used where the binary wheel does not exist (macOS, Windows, musl, other
CPUs) or when asked for (``ALLOYDB_AUTH_PROXY_DATA_PLANE=portable``). It has
the names and behaviour of ``proxy._splice`` (see its theory of operation),
only slower: every byte passes through Python on the event loop thread.

TLS runs on an ``ssl.SSLObject`` between two memory BIOs, with the socket
I/O done here. That is what lets the proxy send close_notify and a TCP
half-close to the instance and still read the instance's last bytes, which
``SSLSocket.unwrap()`` cannot do.

Per connection, bytes wait in at most one buffer per direction; while one
holds bytes nothing more is read in that direction (backpressure, in order).
End of stream and errors follow the native plane: client EOF -> its last
bytes, close_notify and a half-close to the instance, and the instance's
bytes still reach the client for ``linger`` seconds; instance EOF -> its last
bytes go to the client, then both close ("unexpected EOF" without
close_notify); other errors close both; ``on_done(kind, message)`` runs once,
on the loop, after both sockets are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.servername import server_name_problem

CLIENT_CLOSED = 0
INSTANCE_CLOSED = 1
ERROR_READ_CLIENT = 2
ERROR_WRITE_INSTANCE = 3
ERROR_READ_INSTANCE = 4
ERROR_WRITE_CLIENT = 5
ABORTED = 6
WANT_READ = 1
WANT_WRITE = 2

MAX_LINGER = 1e7
# Where the unacknowledged bytes of a socket cannot be read: how long a
# draining client may take before it is closed anyway.
UNKNOWN_ACK_WAIT = 2.0
CHUNK = 131072  # plaintext per read, as the native plane's scratch buffer
_TLS_RECORD_ROOM = CHUNK + 4096  # ciphertext of one read, whole records


class _Scratch(threading.local):
    """Per-thread buffers that reads land in: a fresh 128 KiB bytes object per
    read would be an mmap and munmap each time (glibc's threshold)."""

    def __init__(self) -> None:
        self.inbound = memoryview(bytearray(_TLS_RECORD_ROOM))
        self.plain = memoryview(bytearray(CHUNK + 16384))  # + the rest of one record


_scratch = _Scratch()

_counters = {"active": 0, "total": 0, "bytes_client_to_server": 0, "bytes_server_to_client": 0}


def stats() -> dict[str, int]:
    return dict(_counters)


# The portable plane moves bytes on the event loop's thread: the thread
# count of the native plane is accepted (and checked) but has no effect.
MAX_THREADS = 64


def default_threads() -> int:
    return 1


def set_threads(count: int) -> None:
    if not 1 <= count <= MAX_THREADS:
        raise ValueError(f"data-plane threads must be between 1 and {MAX_THREADS}, not {count}")


def threads() -> int:
    return 1


def thread_loads() -> list[int]:
    return [_counters["active"]]


def openssl_version() -> str:
    return ssl.OPENSSL_VERSION


class TLSError(Exception):
    """A TLS failure, with OpenSSL's reason (or the certificate verify result)."""


def _errno_text(exc: OSError) -> str:
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc).lower() or type(exc).__name__


def _ssl_reason(exc: ssl.SSLError, fallback: str) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or "unknown error"
        if ", certificate is not valid for" in message:
            # Python words its own host and IP checks; say it as OpenSSL does.
            message = message.split(",", 1)[0].replace("Hostname", "hostname")
        return f"certificate verify failed: {message}"
    return exc.reason.lower().replace("_", " ") if exc.reason else (str(exc) or fallback)


class TLSClientContext:
    """TLS 1.3 only, this client certificate, trusting only ``ca_pem``; one
    resumable session kept per server name (see the native context)."""

    def __init__(self, cert_chain_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        try:
            ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"invalid CA certificate: {exc}") from None
        _load_chain(ctx, cert_chain_pem, key_pem)
        self.ctx = ctx
        self.sessions: dict[str, ssl.SSLSession] = {}


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` reads files only. The key goes into one encrypted
    under a random password that never leaves this process: an anonymous
    memory file where the OS has them (Linux), else a file in a private
    temporary directory, removed at once."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ValueError(f"invalid client certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid private key: {exc}") from None
    if certs[0].public_key() != key.public_key():
        raise ValueError("private key does not match the client certificate")
    password = secrets.token_bytes(32)
    sealed = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    blob = chain_pem.rstrip(b"\n") + b"\n" + sealed
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("alloydb-client-cert", os.MFD_CLOEXEC)
            try:
                os.write(fd, blob)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=password)
            finally:
                os.close(fd)
            return
        with tempfile.TemporaryDirectory(prefix="alloydb-proxy-") as tmp:
            path = os.path.join(tmp, "client.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            ctx.load_cert_chain(path, password=password)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cannot load the client certificate: {exc}") from None


class TLSConnection:
    """A non-blocking TLS 1.3 client on a socket fd that it owns."""

    def __init__(self, context: TLSClientContext, fd: int, server_name: str) -> None:
        self.context = context
        self.closed = False
        self.sock = socket.socket(fileno=fd)
        name = server_name.rstrip(".")
        self.server_name = name
        problem = server_name_problem(name)
        if problem:
            self.close()
            raise TLSError(f"invalid server name {name!r}: {problem}")
        self.sock.setblocking(False)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.pending_out = bytearray()  # ciphertext the socket has not taken
        self.eof = False  # the socket has returned EOF
        self.drained = False  # the last fill() found the socket (probably) empty
        try:
            self.obj = context.ctx.wrap_bio(
                self.incoming,
                self.outgoing,
                server_hostname=name,
                session=context.sessions.get(name),
            )
        except (ssl.SSLError, ValueError) as exc:
            self.close()
            raise TLSError(f"cannot check the server identity {name!r}: {exc}") from None

    # -- socket <-> BIO

    def flush(self) -> bool:
        """Send buffered ciphertext; True when none is left. OSError on failure."""
        if self.outgoing.pending:
            data = self.outgoing.read()
            if self.pending_out:
                self.pending_out += data
            else:  # the usual case: straight out, no copy
                try:
                    sent = self.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                if sent == len(data):
                    return True
                self.pending_out += memoryview(data)[sent:]
        while self.pending_out:
            try:
                sent = self.sock.send(self.pending_out)
            except (BlockingIOError, InterruptedError):
                return False
            del self.pending_out[:sent]
        return True

    def fill(self) -> bool:
        """Read ciphertext from the socket; False if it had none. OSError on failure."""
        if self.eof:
            return True
        try:
            buf = _scratch.inbound
            n = self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            self.drained = True
            return False
        self.drained = n < len(buf)  # (a guess, saving a recv that would say EAGAIN)
        if n:
            self.incoming.write(buf[:n])
        else:
            self.eof = True
            self.incoming.write_eof()
        return True

    # -- the native TLSConnection's methods

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionError("TLS connection is closed")

    def do_handshake(self) -> int:
        self._check_open()
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                try:
                    if not self.flush():
                        return WANT_WRITE
                    if not self.fill():
                        return WANT_READ
                except OSError as exc:
                    raise TLSError(_errno_text(exc)) from None
                continue
            except ssl.SSLEOFError:
                raise TLSError("connection closed during TLS handshake") from None
            except ssl.SSLError as exc:
                raise TLSError(_ssl_reason(exc, "TLS handshake failed")) from None
            try:
                return 0 if self.flush() else WANT_WRITE
            except OSError as exc:
                raise TLSError(_errno_text(exc)) from None

    def write(self, data: bytes) -> int:
        self._check_open()
        if not data:
            return 0
        try:
            if not self.flush():
                return -WANT_WRITE
            self.obj.write(data)  # a memory BIO takes it all
            self.flush()
        except OSError as exc:
            if isinstance(exc, ssl.SSLError):
                raise TLSError(_ssl_reason(exc, "TLS write failed")) from None
            raise ConnectionError(_errno_text(exc)) from None
        return len(data)

    def read(self, n: int) -> bytes | int:
        self._check_open()
        if n <= 0:
            return b""
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                try:
                    self.flush()
                    if not self.fill():
                        return -WANT_READ
                except OSError as exc:
                    raise ConnectionError(_errno_text(exc)) from None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as exc:
                raise TLSError(_ssl_reason(exc, "TLS read failed")) from None

    def remember_session(self) -> None:
        self._check_open()
        session = self.obj.session
        if session is not None and session.has_ticket:
            self.context.sessions[self.server_name] = session

    @property
    def resumed(self) -> bool:
        self._check_open()
        return self.obj.session_reused

    @property
    def version(self) -> str:
        self._check_open()
        return self.obj.version() or ""

    @property
    def cipher(self) -> str:
        self._check_open()
        c = self.obj.cipher()
        return c[0] if c else ""

    @property
    def peer_certificate_der(self) -> bytes:
        self._check_open()
        return self.obj.getpeercert(binary_form=True) or b""


def _read_into(obj: ssl.SSLObject, n: int, view: memoryview) -> int:
    """Plaintext into ``view`` (any writable buffer works; typeshed says bytearray)."""
    return cast(int, obj.read(n, view))


_SO_NWRITE = 0x1024  # macOS: bytes in the send buffer, not yet acknowledged


def _unacked(sock: socket.socket) -> int:
    """Bytes the peer has not acknowledged (Linux, macOS), else -1: unknown."""
    try:
        if sys.platform == "darwin":
            return sock.getsockopt(socket.SOL_SOCKET, _SO_NWRITE)
        import fcntl
        import termios

        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # = SIOCOUTQ
    except (ImportError, OSError, AttributeError):
        return -1
    return int.from_bytes(buf, sys.byteorder, signed=True)


class Splice:
    """Moves bytes between a client fd and an established TLSConnection, on the loop."""

    def __init__(
        self,
        client_fd: int,
        conn: TLSConnection,
        on_done: Callable[[int, str], None],
        linger: float = 30.0,
    ) -> None:
        if conn.closed:
            os.close(client_fd)
            raise ValueError("TLS connection is closed")
        if not (0.0 <= linger <= MAX_LINGER):  # NaN fails both
            os.close(client_fd)
            conn.close()
            raise ValueError(f"linger must be between 0 and {MAX_LINGER:g} seconds, not {linger!r}")
        self.client = socket.socket(fileno=client_fd)
        self.client.setblocking(False)
        # Urgent data stays in the stream rather than being dropped from it.
        for sock in (self.client, conn.sock):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        self.client_tcp = self.client.family in (socket.AF_INET, socket.AF_INET6)
        self.conn = conn
        self.on_done: Callable[[int, str], None] | None = on_done
        self.linger = linger
        self.bytes_client_to_server = 0
        self.bytes_server_to_client = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = self.finished = False
        self.pid = os.getpid()
        self.s2c = bytearray()  # plaintext the client has not taken
        self.client_eof = self.server_eof = False
        self.client_first = False  # the client ended first
        self.notify_written = False  # close_notify is in the outgoing BIO
        self.shut_sent = False  # close_notify and the half-close went to the instance
        self.write_failed = False  # writing to the instance failed: drop the client's bytes
        self.kind = -1
        self.message = ""
        self.timer: asyncio.TimerHandle | None = None  # the linger
        self.poll: asyncio.TimerHandle | None = None  # while draining
        self.watching: set[tuple[int, bool]] = set()
        self.wanted: tuple[bool, ...] = ()  # what _rearm asked for last
        self.draining = False
        self.drain_started = 0.0

    # -- public

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.started:
            raise RuntimeError("splice already started")
        self.started = True
        self.loop = loop
        _counters["active"] += 1
        _counters["total"] += 1
        loop.call_soon(self._pump)  # anything decrypted before start is found here

    def abort(self) -> None:
        if not self.started or self.finished or self.pid != os.getpid():
            return
        self._finish(ABORTED, "")

    # -- readiness

    def _want(self, fd: int, write: bool, on: bool) -> None:
        assert self.loop is not None
        key = (fd, write)
        if on and key not in self.watching:
            self.watching.add(key)
            # An event serves one direction: the client readable or the instance
            # writable moves client bytes; the other two, instance bytes.
            towards_instance = (fd == self.client.fileno()) != write
            callback = self._pump_c2s if towards_instance else self._pump_s2c
            (self.loop.add_writer if write else self.loop.add_reader)(fd, callback)
        elif not on and key in self.watching:
            self.watching.discard(key)
            (self.loop.remove_writer if write else self.loop.remove_reader)(fd)

    def _pump_c2s(self) -> None:
        self._pump(True, False)

    def _pump_s2c(self) -> None:
        self._pump(False, True)

    def _pump(self, c2s: bool = True, s2c: bool = True) -> None:
        """One round in the directions asked; readiness is level-triggered, so what
        is left on a socket wakes us again. Only what OpenSSL holds does not."""
        if self.finished:
            return
        if self.draining:
            self._drain()
            return
        try:
            if c2s:
                self._c2s()
                if self.finished:
                    return
            if s2c:
                self._s2c()
            if self.finished or self._ended():
                return
            conn = self.conn
            if not (self.server_eof or self.s2c) and (conn.incoming.pending or conn.obj.pending()):
                assert self.loop is not None
                self.loop.call_soon(self._pump_s2c)  # after the other connections' turn
            self._rearm()
        except Exception as exc:  # a bug here must end one connection, not the loop
            self._finish(ERROR_READ_CLIENT, f"internal error: {exc!r}")

    def _out_waiting(self) -> bool:
        """Ciphertext for the instance that its socket has not taken yet."""
        return bool(self.conn.pending_out) or self.conn.outgoing.pending > 0

    def _rearm(self) -> None:
        cfd, sfd = self.client.fileno(), self.conn.fileno()
        if self.draining:
            self._want(cfd, False, True)
            self._want(cfd, True, False)
            self._want(sfd, False, False)
            self._want(sfd, True, False)
            return
        out_waiting = self._out_waiting()
        wanted = (
            # client -> instance: read the client while nothing of it is waiting
            not self.client_eof and not out_waiting,
            # instance -> client
            bool(self.s2c),
            not self.server_eof and not self.s2c,
            out_waiting and not self.write_failed,
        )
        if wanted == self.wanted:
            return  # the usual case: nothing to change
        self.wanted = wanted
        self._want(cfd, False, wanted[0])
        self._want(cfd, True, wanted[1])
        self._want(sfd, False, wanted[2])
        self._want(sfd, True, wanted[3])

    # -- directions

    def _c2s(self) -> bool:
        conn = self.conn
        moved = False
        if self.write_failed:
            # Nobody takes the client's bytes any more: read and drop them.
            if not self.client_eof:
                try:
                    n = self.client.recv_into(_scratch.plain, CHUNK)
                except (BlockingIOError, InterruptedError):
                    return False
                except OSError as exc:
                    self._finish(ERROR_READ_CLIENT, _errno_text(exc))
                    return True
                if not n:
                    self.client_eof = True
                return True
            return False
        if self._out_waiting():
            try:
                if not conn.flush():
                    return False
            except OSError as exc:
                return self._instance_write_failed(_errno_text(exc))
            moved = True
        if self.client_eof:
            if not self.shut_sent:
                self._send_shutdown()
            return moved
        buf = _scratch.plain
        try:
            n = self.client.recv_into(buf, CHUNK)
        except (BlockingIOError, InterruptedError):
            return moved
        except OSError as exc:
            self._finish(ERROR_READ_CLIENT, _errno_text(exc))
            return True
        if not n:
            self.client_eof = True
            if not self.server_eof:  # (once it has ended, its tail is flushed: no half-close)
                self.client_first = True
                self._send_shutdown()
            return True
        self.bytes_client_to_server += n
        _counters["bytes_client_to_server"] += n
        try:
            conn.obj.write(buf[:n])
            conn.flush()  # what the socket does not take waits: _out_waiting
        except ssl.SSLError as exc:
            return self._instance_write_failed(_ssl_reason(exc, "TLS write failed"))
        except OSError as exc:
            return self._instance_write_failed(_errno_text(exc))
        return True

    def _send_shutdown(self) -> None:
        """The client has finished: close_notify, then a TCP half-close, to the instance."""
        conn = self.conn
        if self.shut_sent or self.write_failed or self.server_eof:
            return  # (once the instance has ended, its tail is flushed whatever the client does)
        if not self.notify_written:
            # unwrap() calls SSL_shutdown twice, and the second call reads
            # records, dropping application data. Given an empty BIO it reads
            # nothing (WANT_READ): so the ciphertext that has arrived is set
            # aside and put back, and no plaintext may be waiting in OpenSSL
            # (_s2c never leaves part of a record unread).
            if conn.obj.pending():
                return
            arrived = conn.incoming.read()
            with contextlib.suppress(ssl.SSLError):
                conn.obj.unwrap()  # writes close_notify; the peer's comes later
            if arrived:
                conn.incoming.write(arrived)
            if conn.eof:
                conn.incoming.write_eof()
            self.notify_written = True
        try:
            if not conn.flush():
                return  # the next round flushes and comes back here
        except OSError as exc:
            self._instance_write_failed(_errno_text(exc))
            return
        self.shut_sent = True
        with contextlib.suppress(OSError):  # as the native plane: its result changes nothing
            conn.sock.shutdown(socket.SHUT_WR)
        self._start_linger()

    def _instance_write_failed(self, message: str) -> bool:
        self.write_failed = True
        self.conn.pending_out.clear()
        self.conn.outgoing.read()
        if not self.message:
            self.message = message
        return True

    def _s2c(self) -> bool:
        conn = self.conn
        moved = False
        if self.s2c:
            try:
                sent = self.client.send(self.s2c)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self._finish(ERROR_WRITE_CLIENT, _errno_text(exc))
                return True
            del self.s2c[:sent]
            self._sent_to_client(sent)
            if self.s2c:
                return sent > 0
            moved = True
        if self.server_eof:
            return moved
        buf = _scratch.plain
        total = 0
        eof_reason: str | None = None
        filled = False
        while total < CHUNK:
            if not (conn.incoming.pending or conn.obj.pending() or conn.eof):
                # Nothing for OpenSSL to decrypt: read the socket, unless this round
                # has found it empty already (readiness is level-triggered).
                if filled and conn.drained:
                    break
                try:
                    filled = True
                    if not conn.fill():
                        break
                except OSError as exc:
                    eof_reason = _errno_text(exc)
                    break
            try:
                n = _read_into(conn.obj, CHUNK - total, buf[total:])
            except ssl.SSLWantReadError:
                if not self.write_failed:
                    try:
                        conn.flush()  # e.g. a KeyUpdate reply
                    except OSError as exc:
                        self._instance_write_failed(_errno_text(exc))
                try:
                    if conn.fill():
                        continue
                except OSError as exc:
                    eof_reason = _errno_text(exc)
                break
            except ssl.SSLZeroReturnError:
                eof_reason = ""
                break
            except ssl.SSLEOFError:
                eof_reason = "unexpected EOF"
                break
            except ssl.SSLError as exc:
                eof_reason = _ssl_reason(exc, "TLS read failed")
                break
            if not n:
                eof_reason = ""
                break
            total += n
        if conn.outgoing.pending and not self.write_failed:
            try:
                conn.flush()  # e.g. a KeyUpdate reply
            except OSError as exc:
                self._instance_write_failed(_errno_text(exc))
        if eof_reason is None and conn.obj.pending():
            # The rest of the record read last: never left half-read (see _send_shutdown).
            with contextlib.suppress(ssl.SSLError):  # else the next round meets it again
                total += _read_into(conn.obj, conn.obj.pending(), buf[total:])
        waiting_to_shut = self.client_eof and not self.notify_written
        if eof_reason is None and waiting_to_shut and not self._out_waiting():
            self._send_shutdown()
        if eof_reason is not None:
            self.server_eof = True
            if eof_reason and not self.write_failed:
                self.message = eof_reason
            if eof_reason:
                self.kind = ERROR_READ_INSTANCE
            moved = True
        if total:
            data = buf[:total]
            try:
                sent = self.client.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._finish(ERROR_WRITE_CLIENT, _errno_text(exc))
                return True
            self._sent_to_client(sent)
            if sent < total:
                self.s2c += data[sent:]
            moved = True
        return moved

    def _sent_to_client(self, n: int) -> None:
        # Counted when the client's socket took them, as the native plane does.
        self.bytes_server_to_client += n
        _counters["bytes_server_to_client"] += n

    # -- the end

    def _ended(self) -> bool:
        """Finish (or start draining the client) once the instance's bytes are all out."""
        if self.draining:
            return self._drain()
        if not (self.server_eof and not self.s2c):
            return False
        if self.kind == ERROR_READ_INSTANCE:  # it ended without close_notify, or broke
            kind = ERROR_WRITE_INSTANCE if self.write_failed else ERROR_READ_INSTANCE
        else:
            # A clean end: a write error before it only ended our side.
            kind = CLIENT_CLOSED if self.client_first else INSTANCE_CLOSED
            self.message = ""
        if not self.client_eof and self.linger > 0 and self.client_tcp:
            # A close on unread client bytes would send a RST, which discards
            # our unacknowledged bytes: half-close and read until the client
            # closes too (or the linger ends).
            self.kind = kind
            self.draining = True
            assert self.loop is not None
            self.drain_started = self.loop.time()
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_WR)
            self._want(self.conn.fileno(), False, False)
            self._want(self.conn.fileno(), True, False)
            self.conn.close()
            self._start_linger()
            return self._drain()
        self._finish(kind, self.message)
        return True

    def _drain(self) -> bool:
        while True:
            try:
                n = self.client.recv_into(_scratch.plain, CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                n = 0
            if not n:
                self._finish(self.kind, self.message)
                return True
        unacked = _unacked(self.client)
        assert self.loop is not None
        waited = self.loop.time() - self.drain_started
        if unacked == 0 or (unacked < 0 and waited >= UNKNOWN_ACK_WAIT):
            self._finish(self.kind, self.message)  # the client holds all our bytes (or may)
            return True
        self._rearm()
        if self.poll is None:  # acks wake nobody: look again, one timer at a time
            assert self.loop is not None
            self.poll = self.loop.call_later(0.05, self._poll_drain)
        return True

    def _poll_drain(self) -> None:
        self.poll = None
        self._pump()

    def _start_linger(self) -> None:
        if self.timer is not None or self.loop is None:
            return
        if self.linger == 0:
            self.loop.call_soon(self._linger_over)
        else:
            self.timer = self.loop.call_later(self.linger, self._linger_over)

    def _linger_over(self) -> None:
        if self.finished or (self.server_eof and not self.draining):
            return  # the instance has ended: its tail is being flushed (see _ended)
        if self.draining:
            self._finish(self.kind, self.message)
        elif self.client_eof:
            # The instance did not finish within the linger: the client did first.
            self._finish(CLIENT_CLOSED, "")

    def _finish(self, kind: int, message: str) -> None:
        if self.finished:
            return
        self.finished = True
        for fd, write in list(self.watching):
            self._want(fd, write, False)
        for handle in (self.timer, self.poll):
            if handle is not None:
                handle.cancel()
        self.client.close()
        self.conn.close()
        _counters["active"] -= 1
        on_done, self.on_done = self.on_done, None
        assert self.loop is not None
        if on_done is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
                self.loop.call_soon(self._deliver, on_done, kind, message)

    def _deliver(self, on_done: Callable[[int, str], None], kind: int, message: str) -> None:
        try:
            on_done(kind, message)
        except Exception as exc:
            assert self.loop is not None
            context: dict[str, Any] = {
                "message": "exception in splice on_done callback",
                "exception": exc,
            }
            self.loop.call_exception_handler(context)
