# cython: language_level=3
"""The hot path: TLS 1.3 client connections on raw socket fds, and splicing.

libssl is called directly on the socket fd (no MemoryBIO, no ssl.SSLObject):
measured here at 1.3x-2.7x the speed of the ssl module's object API, and the
only route to kernel TLS later. Python meets this module at connection edges
only (context creation, handshake, metadata exchange, start, end); bytes move
in C between two fixed buffers. See _splice.pxd for the design and ownership.
"""

from libc.stdlib cimport malloc, free
from libc.string cimport strerror
from libc.errno cimport errno, EAGAIN, EINTR

cdef extern from "errno.h":
    enum: EWOULDBLOCK


cdef inline bint _transient(int err) noexcept nogil:
    """A non-blocking call that should simply be retried on readiness."""
    if err == EAGAIN or err == EINTR:
        return True
    return err == EWOULDBLOCK  # the same value as EAGAIN on Linux

cdef extern from "unistd.h" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int close(int fd)

cdef extern from "fcntl.h" nogil:
    int fcntl(int fd, int cmd, ...)
    enum: F_GETFL, F_SETFL, O_NONBLOCK


cdef int _set_nonblocking(int fd) noexcept nogil:
    # The core never blocks: a blocking fd handed in by mistake would stall
    # the whole event loop inside read() or SSL_read().
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0:
        return -1
    return fcntl(fd, F_SETFL, flags | O_NONBLOCK)


cdef extern from "sys/socket.h" nogil:
    int shutdown(int fd, int how)
    enum: SHUT_WR

cdef extern from "openssl/err.h" nogil:
    unsigned long ERR_get_error()
    void ERR_clear_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)

cdef extern from "openssl/bio.h" nogil:
    ctypedef struct BIO
    BIO *BIO_new_mem_buf(const void *buf, int len)
    int BIO_free(BIO *a)

cdef extern from "openssl/x509.h" nogil:
    ctypedef struct X509
    ctypedef struct X509_STORE
    ctypedef struct X509_VERIFY_PARAM
    ctypedef struct EVP_PKEY
    void X509_free(X509 *a)
    void EVP_PKEY_free(EVP_PKEY *a)
    int X509_STORE_add_cert(X509_STORE *store, X509 *x)
    const char *X509_verify_cert_error_string(long n)
    int i2d_X509(X509 *a, unsigned char **out)
    int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM *param, const char *ipasc)
    enum: X509_V_OK

cdef extern from "openssl/pem.h" nogil:
    X509 *PEM_read_bio_X509(BIO *bp, X509 **x, void *cb, void *u)
    EVP_PKEY *PEM_read_bio_PrivateKey(BIO *bp, EVP_PKEY **x, void *cb, void *u)

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_free(void *p)

cdef extern from "openssl/ssl.h" nogil:
    const SSL_METHOD *TLS_client_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *meth)
    void SSL_CTX_free(SSL_CTX *ctx)
    int SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version)
    int SSL_CTX_set_max_proto_version(SSL_CTX *ctx, int version)
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, void *cb)
    X509_STORE *SSL_CTX_get_cert_store(const SSL_CTX *ctx)
    int SSL_CTX_use_certificate(SSL_CTX *ctx, X509 *x)
    long SSL_CTX_add1_chain_cert(SSL_CTX *ctx, X509 *x)
    int SSL_CTX_use_PrivateKey(SSL_CTX *ctx, EVP_PKEY *pkey)
    int SSL_CTX_check_private_key(const SSL_CTX *ctx)
    long SSL_CTX_set_mode(SSL_CTX *ctx, long mode)
    unsigned long long SSL_CTX_set_options(SSL_CTX *ctx, unsigned long long op)
    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    int SSL_set_fd(SSL *ssl, int fd)
    void SSL_set_connect_state(SSL *ssl)
    int SSL_do_handshake(SSL *ssl)
    int SSL_read(SSL *ssl, void *buf, int num)
    int SSL_write(SSL *ssl, const void *buf, int num)
    int SSL_shutdown(SSL *ssl)
    int SSL_get_error(const SSL *ssl, int ret)
    long SSL_get_verify_result(const SSL *ssl)
    X509_VERIFY_PARAM *SSL_get0_param(SSL *ssl)
    int SSL_set1_host(SSL *ssl, const char *hostname)
    long SSL_set_tlsext_host_name(SSL *ssl, const char *name)
    const char *SSL_get_version(const SSL *ssl)
    const SSL_CIPHER *SSL_get_current_cipher(const SSL *ssl)
    const char *SSL_CIPHER_get_name(const SSL_CIPHER *c)
    X509 *SSL_get1_peer_certificate(const SSL *ssl)
    enum:
        SSL_ERROR_NONE
        SSL_ERROR_SSL
        SSL_ERROR_WANT_READ
        SSL_ERROR_WANT_WRITE
        SSL_ERROR_SYSCALL
        SSL_ERROR_ZERO_RETURN
        SSL_VERIFY_PEER
        TLS1_3_VERSION
        SSL_MODE_ENABLE_PARTIAL_WRITE
        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
        SSL_MODE_RELEASE_BUFFERS
        SSL_OP_IGNORE_UNEXPECTED_EOF

# What Splice.on_done reports.
CLIENT_CLOSED = 0
INSTANCE_CLOSED = 1
ERROR_READ_CLIENT = 2
ERROR_WRITE_INSTANCE = 3
ERROR_READ_INSTANCE = 4
ERROR_WRITE_CLIENT = 5
ABORTED = 6

# Returned by TLSConnection methods while waiting for the socket.
WANT_READ = 1
WANT_WRITE = 2

# One TLS record of plaintext per SSL_read; writes of this size fill records.
DEF BUFFER_SIZE = 16384
# Work done per wakeup before yielding to the loop, so one busy connection
# cannot starve the others.
DEF PUMP_ROUNDS = 32

cdef unsigned long long _active = 0
cdef unsigned long long _total = 0
cdef unsigned long long _bytes_c2s = 0
cdef unsigned long long _bytes_s2c = 0


def stats():
    """Process-wide counters, read at scrape time (no per-chunk Python work)."""
    return {
        "active": _active,
        "total": _total,
        "bytes_client_to_server": _bytes_c2s,
        "bytes_server_to_client": _bytes_s2c,
    }


class TLSError(Exception):
    """A TLS failure, with OpenSSL's reason (or the certificate verify result)."""


cdef str _openssl_reason(str fallback="unknown TLS error"):
    cdef unsigned long code = ERR_get_error()
    cdef unsigned long last = code
    cdef char buf[256]
    # The first queued error is usually the root cause; drain the rest.
    while last != 0:
        last = ERR_get_error()
    if code == 0:
        return fallback
    ERR_error_string_n(code, buf, sizeof(buf))
    return buf.decode("utf-8", "replace")


cdef str _errno_text(int err):
    return strerror(err).decode("utf-8", "replace").lower()


cdef class TLSClientContext:
    """SSL_CTX for one client certificate: TLS 1.3 only, trusting only ``ca_pem``."""

    def __cinit__(self, bytes cert_chain_pem, bytes key_pem, bytes ca_pem):
        self.ctx = NULL
        cdef SSL_CTX *ctx = SSL_CTX_new(TLS_client_method())
        if ctx == NULL:
            raise MemoryError("SSL_CTX_new failed")
        self.ctx = ctx
        ERR_clear_error()
        SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION)
        SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION)
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL)
        SSL_CTX_set_mode(
            ctx,
            SSL_MODE_ENABLE_PARTIAL_WRITE
            | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
            | SSL_MODE_RELEASE_BUFFERS,
        )
        # A peer that drops TCP without close_notify has still finished: the
        # PostgreSQL protocol frames its own messages, as Go treats io.EOF.
        SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF)
        self._load_chain(cert_chain_pem)
        self._load_key(key_pem)
        self._load_ca(ca_pem)

    cdef _load_chain(self, bytes pem):
        cdef BIO *bio = BIO_new_mem_buf(<const char *>pem, len(pem))
        cdef X509 *cert
        cdef int count = 0
        try:
            while True:
                cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)
                if cert == NULL:
                    break
                if count == 0:
                    ok = SSL_CTX_use_certificate(self.ctx, cert) == 1
                    X509_free(cert)
                else:
                    # add1 takes its own reference, so ours is freed here.
                    ok = SSL_CTX_add1_chain_cert(self.ctx, cert) == 1
                    X509_free(cert)
                if not ok:
                    raise ValueError("invalid client certificate: " + _openssl_reason())
                count += 1
            ERR_clear_error()  # the loop ends on a "no start line" error
            if count == 0:
                raise ValueError("invalid client certificate: no PEM certificate found")
        finally:
            BIO_free(bio)

    cdef _load_key(self, bytes pem):
        cdef BIO *bio = BIO_new_mem_buf(<const char *>pem, len(pem))
        cdef EVP_PKEY *key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)
        BIO_free(bio)
        if key == NULL:
            raise ValueError("invalid private key: " + _openssl_reason())
        ok = SSL_CTX_use_PrivateKey(self.ctx, key) == 1
        EVP_PKEY_free(key)
        if not ok or SSL_CTX_check_private_key(self.ctx) != 1:
            raise ValueError("private key does not match the client certificate: " + _openssl_reason())

    cdef _load_ca(self, bytes pem):
        cdef BIO *bio = BIO_new_mem_buf(<const char *>pem, len(pem))
        cdef X509 *cert
        cdef X509_STORE *store = SSL_CTX_get_cert_store(self.ctx)
        cdef int count = 0
        try:
            while True:
                cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)
                if cert == NULL:
                    break
                X509_STORE_add_cert(store, cert)
                X509_free(cert)
                count += 1
            ERR_clear_error()
            if count == 0:
                raise ValueError("invalid CA certificate: no PEM certificate found")
        finally:
            BIO_free(bio)

    def __dealloc__(self):
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)
            self.ctx = NULL


cdef bint _is_ip(str name):
    import ipaddress
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


cdef class TLSConnection:
    """A non-blocking TLS 1.3 client on a socket fd that it owns."""

    def __cinit__(self, TLSClientContext context not None, int fd, str server_name not None):
        self.ssl = NULL
        self.fd = fd
        self.closed = False
        self.context = context
        name = server_name.rstrip(".")
        self.server_name = name
        self.ssl = SSL_new(context.ctx)
        if self.ssl == NULL:
            close(fd)
            self.closed = True
            raise MemoryError("SSL_new failed")
        _set_nonblocking(fd)
        SSL_set_fd(self.ssl, fd)
        SSL_set_connect_state(self.ssl)
        encoded = name.encode("idna" if not _is_ip(name) else "ascii")
        if _is_ip(name):
            # IP literals are checked against IP SANs and never sent as SNI.
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(self.ssl), encoded)
        else:
            SSL_set_tlsext_host_name(self.ssl, encoded)
            SSL_set1_host(self.ssl, encoded)

    cdef void _close(self) noexcept:
        if self.closed:
            return
        self.closed = True
        if self.ssl != NULL:
            SSL_free(self.ssl)
            self.ssl = NULL
        close(self.fd)

    def close(self):
        self._close()

    def fileno(self):
        return self.fd

    cdef _check_open(self):
        if self.closed:
            raise ConnectionError("TLS connection is closed")

    def do_handshake(self):
        """0 when done, WANT_READ or WANT_WRITE while waiting; TLSError on failure."""
        self._check_open()
        ERR_clear_error()
        cdef int ret = SSL_do_handshake(self.ssl)
        if ret == 1:
            return 0
        cdef int err = SSL_get_error(self.ssl, ret)
        if err == SSL_ERROR_WANT_READ:
            return WANT_READ
        if err == SSL_ERROR_WANT_WRITE:
            return WANT_WRITE
        cdef long verify = SSL_get_verify_result(self.ssl)
        if verify != X509_V_OK:
            ERR_clear_error()
            raise TLSError(
                "certificate verify failed: "
                + X509_verify_cert_error_string(verify).decode("utf-8", "replace")
            )
        if err == SSL_ERROR_SYSCALL:
            saved = errno
            reason = _openssl_reason("")
            if reason:
                raise TLSError(reason)
            raise TLSError(_errno_text(saved) if saved else "connection closed during TLS handshake")
        raise TLSError(_openssl_reason())

    def write(self, bytes data not None):
        """Bytes written (> 0), or -WANT_READ / -WANT_WRITE."""
        self._check_open()
        if not data:
            return 0
        ERR_clear_error()
        cdef int ret = SSL_write(self.ssl, <const char *>data, len(data))
        if ret > 0:
            return ret
        cdef int err = SSL_get_error(self.ssl, ret)
        if err == SSL_ERROR_WANT_READ:
            return -WANT_READ
        if err == SSL_ERROR_WANT_WRITE:
            return -WANT_WRITE
        if err == SSL_ERROR_SYSCALL and errno:
            raise ConnectionError(_errno_text(errno))
        raise TLSError(_openssl_reason("TLS write failed"))

    def read(self, int n):
        """Up to n bytes; b"" on EOF; -WANT_READ / -WANT_WRITE while waiting."""
        self._check_open()
        if n <= 0:
            return b""
        buf = bytearray(n)
        cdef char *p = buf
        ERR_clear_error()
        cdef int ret = SSL_read(self.ssl, p, n)
        if ret > 0:
            return bytes(buf[:ret])
        cdef int err = SSL_get_error(self.ssl, ret)
        if err == SSL_ERROR_WANT_READ:
            return -WANT_READ
        if err == SSL_ERROR_WANT_WRITE:
            return -WANT_WRITE
        if err == SSL_ERROR_ZERO_RETURN:
            return b""
        if err == SSL_ERROR_SYSCALL:
            if errno:
                raise ConnectionError(_errno_text(errno))
            return b""
        raise TLSError(_openssl_reason("TLS read failed"))

    @property
    def version(self):
        self._check_open()
        return SSL_get_version(self.ssl).decode()

    @property
    def cipher(self):
        self._check_open()
        cdef const SSL_CIPHER *c = SSL_get_current_cipher(self.ssl)
        return SSL_CIPHER_get_name(c).decode() if c != NULL else ""

    @property
    def peer_certificate_der(self):
        self._check_open()
        cdef X509 *cert = SSL_get1_peer_certificate(self.ssl)
        cdef unsigned char *out = NULL
        if cert == NULL:
            return b""
        n = i2d_X509(cert, &out)
        X509_free(cert)
        if n <= 0:
            return b""
        try:
            return (<char *>out)[:n]
        finally:
            OPENSSL_free(out)

    def __dealloc__(self):
        self._close()


cdef class Splice:
    """Moves bytes between a client fd and an established TLSConnection.

    Theory of operation: every readiness callback runs ``_pump``, which makes
    all the progress it can in both directions (read a side only while the
    buffer toward the other side is empty, write while it holds bytes), then
    ``_update_interest`` registers exactly the readiness events that can
    unblock it. An idle connection therefore waits on the two reads only.

    End of stream: when the client stops sending, its last bytes are
    written, then close_notify and a TCP half-close go to the instance, and
    the instance's remaining bytes still reach the client (for up to
    ``linger`` seconds). When the instance stops, its last bytes are flushed
    to the client and both sides are closed. Any error closes both at once.
    ``on_done(kind, message)`` runs exactly once, after both fds are closed.
    """

    def __cinit__(self, int client_fd, TLSConnection conn not None, on_done, double linger=30.0):
        self.client_fd = client_fd
        self.conn = conn
        self.on_done = on_done
        self.linger = linger
        _set_nonblocking(client_fd)
        self.c2s = <char *>malloc(BUFFER_SIZE)
        self.s2c = <char *>malloc(BUFFER_SIZE)
        if self.c2s == NULL or self.s2c == NULL:
            raise MemoryError()
        if conn.closed:
            raise ValueError("TLS connection is closed")

    def start(self, loop):
        global _active, _total
        if self.started:
            raise RuntimeError("splice already started")
        self.started = True
        self.loop = loop
        _active += 1
        _total += 1
        # Bytes OpenSSL decrypted during the exchange are in its buffer, not
        # in the socket: pump once now instead of waiting for readiness.
        self._pump()

    def abort(self):
        """Tear down now; on_done still runs once, with ABORTED."""
        if self.started:
            self._finish(ABORTED, "")

    # Readiness callbacks: thin def wrappers around the C pump.
    def _on_ready(self):
        self._pump()

    def _on_scheduled(self):
        self.pump_scheduled = False
        self._pump()

    def _on_linger_expired(self):
        self.linger_handle = None
        self._finish(CLIENT_CLOSED, "")

    cdef void _pump(self):
        cdef ssize_t n
        cdef int ret, err, rounds = 0
        cdef bint progress = True
        cdef SSL *ssl
        global _bytes_c2s, _bytes_s2c
        if self.finished:
            return
        ssl = self.conn.ssl
        try:
            while progress and rounds < PUMP_ROUNDS:
                progress = False
                rounds += 1

                # client -> buffer
                if self.c2s_len == 0 and not self.client_eof:
                    n = read(self.client_fd, self.c2s, BUFFER_SIZE)
                    if n > 0:
                        self.c2s_len = n
                        self.c2s_off = 0
                        progress = True
                    elif n == 0:
                        self.client_eof = True
                        if not self.server_eof:
                            self.client_first = True
                        progress = True
                    elif not _transient(errno):
                        self._finish(ERROR_READ_CLIENT, _errno_text(errno))
                        return

                # buffer -> instance
                if self.c2s_off < self.c2s_len:
                    ERR_clear_error()
                    ret = SSL_write(ssl, self.c2s + self.c2s_off, <int>(self.c2s_len - self.c2s_off))
                    if ret > 0:
                        self.write_wants = 0
                        self.c2s_off += ret
                        self.bytes_client_to_server += ret
                        _bytes_c2s += ret
                        if self.c2s_off == self.c2s_len:
                            self.c2s_len = 0
                            self.c2s_off = 0
                        progress = True
                    else:
                        err = SSL_get_error(ssl, ret)
                        if err == SSL_ERROR_WANT_READ:
                            self.write_wants = WANT_READ
                        elif err == SSL_ERROR_WANT_WRITE:
                            self.write_wants = WANT_WRITE
                        else:
                            self._finish(ERROR_WRITE_INSTANCE, self._ssl_failure(err))
                            return

                # the client has finished and everything it sent is delivered
                if self.client_eof and self.c2s_len == 0 and not self.close_notify_sent:
                    self.close_notify_sent = True
                    if self.server_eof:
                        self._finish(CLIENT_CLOSED if self.client_first else INSTANCE_CLOSED, "")
                        return
                    ERR_clear_error()
                    SSL_shutdown(ssl)  # best effort: one close_notify record
                    ERR_clear_error()
                    shutdown(self.conn.fd, SHUT_WR)
                    if self.linger > 0:
                        self.linger_handle = self.loop.call_later(self.linger, self._on_linger_expired)
                    progress = True

                # instance -> buffer
                if self.s2c_len == 0 and not self.server_eof:
                    ERR_clear_error()
                    ret = SSL_read(ssl, self.s2c, BUFFER_SIZE)
                    if ret > 0:
                        self.read_wants = 0
                        self.s2c_len = ret
                        self.s2c_off = 0
                        progress = True
                    else:
                        err = SSL_get_error(ssl, ret)
                        if err == SSL_ERROR_WANT_READ:
                            self.read_wants = WANT_READ
                        elif err == SSL_ERROR_WANT_WRITE:
                            self.read_wants = WANT_WRITE
                        elif err == SSL_ERROR_ZERO_RETURN or (err == SSL_ERROR_SYSCALL and errno == 0):
                            self.server_eof = True
                            self.read_wants = 0
                            progress = True
                        else:
                            self._finish(ERROR_READ_INSTANCE, self._ssl_failure(err))
                            return

                # buffer -> client
                if self.s2c_off < self.s2c_len:
                    n = write(self.client_fd, self.s2c + self.s2c_off, self.s2c_len - self.s2c_off)
                    if n > 0:
                        self.s2c_off += n
                        self.bytes_server_to_client += n
                        _bytes_s2c += n
                        if self.s2c_off == self.s2c_len:
                            self.s2c_len = 0
                            self.s2c_off = 0
                        progress = True
                    elif not _transient(errno):
                        self._finish(ERROR_WRITE_CLIENT, _errno_text(errno))
                        return

                # the instance has finished and the client has all its bytes
                if self.server_eof and self.s2c_len == 0:
                    self._finish(CLIENT_CLOSED if self.client_first else INSTANCE_CLOSED, "")
                    return

            if progress and not self.pump_scheduled:
                # Out of rounds with work left (maybe in OpenSSL's buffer,
                # which no fd readiness would announce): continue next tick.
                self.pump_scheduled = True
                self.loop.call_soon(self._on_scheduled)
            self._update_interest()
        except BaseException as exc:  # never let an exception escape into the loop
            self._finish(ABORTED, f"internal error: {exc!r}")

    cdef str _ssl_failure(self, int err):
        if err == SSL_ERROR_SYSCALL and errno:
            return _errno_text(errno)
        return _openssl_reason("TLS failure")

    cdef void _update_interest(self):
        cdef bint want_client_r = self.c2s_len == 0 and not self.client_eof
        cdef bint want_client_w = self.s2c_off < self.s2c_len
        cdef bint c2s_pending = self.c2s_off < self.c2s_len
        cdef bint want_server_r = (
            (self.s2c_len == 0 and not self.server_eof and self.read_wants != WANT_WRITE)
            or (c2s_pending and self.write_wants == WANT_READ)
        )
        cdef bint want_server_w = (
            (c2s_pending and self.write_wants != WANT_READ)
            or (self.s2c_len == 0 and not self.server_eof and self.read_wants == WANT_WRITE)
        )
        loop = self.loop
        if want_client_r != self.reg_client_r:
            self.reg_client_r = want_client_r
            if want_client_r:
                loop.add_reader(self.client_fd, self._on_ready)
            else:
                loop.remove_reader(self.client_fd)
        if want_client_w != self.reg_client_w:
            self.reg_client_w = want_client_w
            if want_client_w:
                loop.add_writer(self.client_fd, self._on_ready)
            else:
                loop.remove_writer(self.client_fd)
        if want_server_r != self.reg_server_r:
            self.reg_server_r = want_server_r
            if want_server_r:
                loop.add_reader(self.conn.fd, self._on_ready)
            else:
                loop.remove_reader(self.conn.fd)
        if want_server_w != self.reg_server_w:
            self.reg_server_w = want_server_w
            if want_server_w:
                loop.add_writer(self.conn.fd, self._on_ready)
            else:
                loop.remove_writer(self.conn.fd)

    cdef void _finish(self, int kind, str message):
        global _active
        cdef char scratch[4096]
        if self.finished:
            return
        self.finished = True
        _active -= 1
        loop = self.loop
        try:
            if self.reg_client_r:
                loop.remove_reader(self.client_fd)
            if self.reg_client_w:
                loop.remove_writer(self.client_fd)
            if self.reg_server_r:
                loop.remove_reader(self.conn.fd)
            if self.reg_server_w:
                loop.remove_writer(self.conn.fd)
        except BaseException:
            pass  # the loop may already be closing; the fds close below anyway
        self.reg_client_r = self.reg_client_w = self.reg_server_r = self.reg_server_w = False
        if self.linger_handle is not None:
            self.linger_handle.cancel()
            self.linger_handle = None
        if kind == INSTANCE_CLOSED or kind == CLIENT_CLOSED:
            # Half-close first and drop unread client input, so closing does
            # not turn into a RST that could discard bytes the client has not
            # read yet.
            shutdown(self.client_fd, SHUT_WR)
            for _ in range(16):  # bounded: a client that keeps sending gets the RST
                if read(self.client_fd, scratch, sizeof(scratch)) <= 0:
                    break
        close(self.client_fd)
        self.conn._close()
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            try:
                on_done(kind, message)
            except BaseException as exc:
                loop.call_exception_handler({
                    "message": "exception in splice on_done callback",
                    "exception": exc,
                })

    def __dealloc__(self):
        global _active
        if self.started and not self.finished:
            # Dropped without finishing (e.g. the loop went away): still
            # release the fds; no callback can run safely here.
            self.finished = True
            _active -= 1
            close(self.client_fd)
            self.conn._close()
        elif not self.started:
            close(self.client_fd)
            if self.conn is not None:
                self.conn._close()
        free(self.c2s)
        free(self.s2c)
