# cython: language_level=3
"""The hot path: TLS 1.3 client connections on raw socket fds, and splicing.

libssl is called directly (no MemoryBIO, no ssl.SSLObject): measured here at
1.3x-2.7x the speed of the ssl module's object API. Python meets this module
at connection edges only (context creation, handshake, metadata exchange,
start, end); in between, one native data-plane thread moves the bytes without
the GIL (see "The data plane" below, and _splice.pxd for ownership).
"""

from libc.stdlib cimport malloc, calloc, realloc, free
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
    const char *OpenSSL_version(int t)
    int OPENSSL_VERSION

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
    ctypedef struct SSL_SESSION
    SSL_SESSION *SSL_get1_session(SSL *ssl)
    int SSL_set_session(SSL *ssl, SSL_SESSION *session)
    void SSL_SESSION_free(SSL_SESSION *session)
    SSL_SESSION *SSL_SESSION_dup(const SSL_SESSION *src)
    int SSL_SESSION_is_resumable(const SSL_SESSION *session)
    int SSL_session_reused(const SSL *ssl)
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
        SSL_MODE_AUTO_RETRY
        SSL_OP_IGNORE_UNEXPECTED_EOF
    void SSL_CTX_set_read_ahead(SSL_CTX *ctx, int yes)
    void SSL_CTX_set_default_read_buffer_len(SSL_CTX *ctx, size_t len)

# What Splice.on_done reports (C names for the thread, Python names for users).
cdef enum:
    C_CLIENT_CLOSED = 0
    C_INSTANCE_CLOSED = 1
    C_ERROR_READ_CLIENT = 2
    C_ERROR_WRITE_INSTANCE = 3
    C_ERROR_READ_INSTANCE = 4
    C_ERROR_WRITE_CLIENT = 5
    C_ABORTED = 6
    # What a TLS call waits for.
    C_WANT_READ = 1
    C_WANT_WRITE = 2

CLIENT_CLOSED = C_CLIENT_CLOSED
INSTANCE_CLOSED = C_INSTANCE_CLOSED
ERROR_READ_CLIENT = C_ERROR_READ_CLIENT
ERROR_WRITE_INSTANCE = C_ERROR_WRITE_INSTANCE
ERROR_READ_INSTANCE = C_ERROR_READ_INSTANCE
ERROR_WRITE_CLIENT = C_ERROR_WRITE_CLIENT
ABORTED = C_ABORTED

# Returned by TLSConnection methods while waiting for the socket.
WANT_READ = C_WANT_READ
WANT_WRITE = C_WANT_WRITE

# One TLS record of plaintext per SSL_read; writes of this size fill records.
DEF BUFFER_SIZE = 16384

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


def openssl_version():
    """The OpenSSL this module runs on: the system's, or the one built into a wheel."""
    return OpenSSL_version(OPENSSL_VERSION).decode()


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


cdef class _Session:
    """One resumable TLS session (owns a reference to the SSL_SESSION)."""
    cdef SSL_SESSION *ptr

    def __dealloc__(self):
        if self.ptr != NULL:
            SSL_SESSION_free(self.ptr)


cdef class TLSClientContext:
    """SSL_CTX for one client certificate: TLS 1.3 only, trusting only ``ca_pem``.

    It also keeps the latest resumable session per server name, so that the
    next connection to that server resumes (a PSK handshake: no certificate
    signatures, which cost more than a millisecond of CPU on each side). A
    session is only ever offered to the server name it was made with, and a
    certificate refresh makes a new context, which starts empty.
    """

    def __cinit__(self, bytes cert_chain_pem, bytes key_pem, bytes ca_pem):
        self.ctx = NULL
        self.sessions = {}
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
            | SSL_MODE_RELEASE_BUFFERS
            # The data plane counts on SSL_read returning WANT_READ only when
            # the socket is drained (edge-triggered readiness).
            | SSL_MODE_AUTO_RETRY,
        )
        # Fetch several records per recv() (sized like the data plane's
        # scratch buffer); released again when idle.
        SSL_CTX_set_read_ahead(ctx, 1)
        SSL_CTX_set_default_read_buffer_len(ctx, 131072 + 1024)
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


cdef str _server_name_problem(str name):
    """Why ``name`` cannot be checked against the server certificate ('' if it can)."""
    if not name:
        return "empty"
    if "%" in name:
        return "a scoped address (with %) cannot be verified"
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in name):
        return "control characters, spaces or NUL"
    return ""


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
        problem = _server_name_problem(name)
        if problem:
            close(fd)
            self.closed = True
            raise TLSError(f"invalid server name {name!r}: {problem}")
        self.ssl = SSL_new(context.ctx)
        if self.ssl == NULL:
            close(fd)
            self.closed = True
            raise MemoryError("SSL_new failed")
        _set_nonblocking(fd)
        SSL_set_fd(self.ssl, fd)
        SSL_set_connect_state(self.ssl)
        is_ip = _is_ip(name)
        encoded = name.encode("ascii" if is_ip else "idna")
        session = context.sessions.get(name)
        if session is not None:
            SSL_set_session(self.ssl, (<_Session>session).ptr)
        # Each of these must take, or the identity check would be skipped:
        # fail the dial instead (fail closed).
        if is_ip:
            # IP literals are checked against IP SANs and never sent as SNI.
            ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(self.ssl), encoded) == 1
        else:
            ok = (
                SSL_set_tlsext_host_name(self.ssl, encoded) == 1
                and SSL_set1_host(self.ssl, encoded) == 1
            )
        if not ok:
            reason = _openssl_reason("rejected by OpenSSL")
            self._close()
            raise TLSError(f"cannot check the server identity {name!r}: {reason}")

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

    def remember_session(self):
        """Offer this connection's session to the next one to the same server.

        Call after the first read from the server: TLS 1.3 tickets arrive
        after the handshake and are taken in by SSL_read.
        """
        self._check_open()
        cdef SSL_SESSION *live = SSL_get1_session(self.ssl)
        if live == NULL:
            return
        # A copy: OpenSSL marks the live session unresumable if this
        # connection later ends without close_notify.
        cdef SSL_SESSION *sess = SSL_SESSION_dup(live)
        SSL_SESSION_free(live)
        if sess == NULL:
            return
        if not SSL_SESSION_is_resumable(sess):
            SSL_SESSION_free(sess)
            return
        holder = _Session()
        holder.ptr = sess
        self.context.sessions[self.server_name] = holder

    @property
    def resumed(self):
        self._check_open()
        return bool(SSL_session_reused(self.ssl))

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


include "_plane.pxi"
