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
        session = context.sessions.get(name)
        if session is not None:
            SSL_set_session(self.ssl, (<_Session>session).ptr)
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


# ---------------------------------------------------------------------------
# The data plane: one native thread that splices every connection.
#
# Python hands over an established connection (client fd, SSL*, instance fd)
# and gets it back once, finished, through a completion queue and an eventfd
# that the event loop watches. In between, no Python code and no GIL are
# involved: the thread waits in epoll (edge-triggered, registered once per
# fd, never modified), remembers which fds are readable or writable, and
# only calls read/write/SSL_* where that can make progress.
#
# Bytes move through one per-thread scratch buffer. A connection owns heap
# memory only while a peer is not keeping up (the unwritten rest of one
# scratch buffer), so an idle connection costs its SSL object and this
# struct; OpenSSL's own record buffers are released when idle too.
# ---------------------------------------------------------------------------

cdef extern from "sys/epoll.h" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        unsigned long long u64
    cdef struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum: EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLLIN, EPOLLOUT, EPOLLRDHUP, EPOLLERR, EPOLLHUP
    unsigned int EPOLLET

cdef extern from "sys/eventfd.h" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_CLOEXEC, EFD_NONBLOCK

cdef extern from "pthread.h" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_create(pthread_t *thread, void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_detach(pthread_t thread)
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "signal.h" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t *s)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)
    enum: SIG_BLOCK

cdef extern from "time.h" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum: CLOCK_MONOTONIC

cdef extern from "sys/socket.h" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    enum: MSG_NOSIGNAL

cdef extern from "string.h" nogil:
    void *memcpy(void *dst, const void *src, size_t n)
    char *strncpy(char *dst, const char *src, size_t n)

cdef extern from "openssl/ssl.h" nogil:
    int SSL_has_pending(const SSL *s)

from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF

# Plaintext per read or write call: eight TLS records (measured: fewer
# syscalls per GB than 64 KiB, same latency). One scratch buffer of this
# size per direction serves every connection of the thread.
DEF SCRATCH = 131072
# Rounds per connection per wakeup before the others get a turn.
DEF PUMP_ROUNDS = 16
DEF MAX_EVENTS = 256
DEF MESSAGE = 200
# epoll tags: the low bits of the (8-byte aligned) connection pointer.
DEF SIDE_CLIENT = 0
DEF SIDE_INSTANCE = 1
DEF SIDE_WAKE = 2


ctypedef struct plane_t:
    int epfd
    int wake_fd                  # Python -> thread (aborts)
    int done_fd                  # thread -> Python (completions)
    bint running
    pthread_mutex_t lock
    conn_t *aborts               # under lock
    conn_t *done_head            # under lock, delivered in order
    conn_t *done_tail
    conn_t *ready                # thread only
    conn_t *lingering            # thread only
    char *scratch_in
    char *scratch_out
    char *out                    # ciphertext of the current SSL_* call (_bio_write)
    size_t out_len, out_cap


cdef plane_t _plane
_plane.epfd = -1


cdef long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000LL + ts.tv_nsec


cdef void _set_message_errno(conn_t *c, int err) noexcept nogil:
    cdef const char *text = strerror(err)
    cdef int i = 0
    cdef char ch
    # errno texts are ASCII; lower-cased like Go's syscall errors.
    while text[i] != 0 and i < MESSAGE - 1:
        ch = text[i]
        c.message[i] = ch + 32 if 65 <= ch <= 90 else ch
        i += 1
    c.message[i] = 0


cdef void _set_message_ssl(conn_t *c, int err, int saved_errno) noexcept nogil:
    cdef unsigned long code
    if err == SSL_ERROR_SYSCALL and saved_errno:
        _set_message_errno(c, saved_errno)
        ERR_clear_error()
        return
    code = ERR_get_error()
    ERR_clear_error()
    if code == 0:
        strncpy(c.message, "TLS failure", MESSAGE)
    else:
        ERR_error_string_n(code, c.message, MESSAGE)


cdef void _finish(conn_t *c, int kind) noexcept nogil:
    """Close both sides once; the completion is queued by the caller's batch."""
    cdef char drain[4096]
    cdef int i
    if c.finished:
        return
    c.finished = True
    c.kind = kind
    if kind == C_INSTANCE_CLOSED or kind == C_CLIENT_CLOSED:
        # Half-close first and drop unread client input, so closing does not
        # turn into a RST that could discard bytes the client has not read.
        shutdown(c.cfd, SHUT_WR)
        for i in range(16):  # bounded: a client that keeps sending gets the RST
            if read(c.cfd, drain, sizeof(drain)) <= 0:
                break
    close(c.cfd)  # closing removes the fds from epoll
    SSL_free(c.ssl)
    c.ssl = NULL
    close(c.sfd)
    free(c.cpend)
    free(c.s2c)
    c.cpend = c.s2c = NULL
    if c.linger_deadline:
        _linger_remove(c)


cdef void _linger_add(conn_t *c, long long now) noexcept nogil:
    c.linger_deadline = now + c.linger_ns
    c.linger_prev = NULL
    c.linger_next = _plane.lingering
    if _plane.lingering != NULL:
        _plane.lingering.linger_prev = c
    _plane.lingering = c


cdef void _linger_remove(conn_t *c) noexcept nogil:
    if c.linger_prev != NULL:
        c.linger_prev.linger_next = c.linger_next
    else:
        _plane.lingering = c.linger_next
    if c.linger_next != NULL:
        c.linger_next.linger_prev = c.linger_prev
    c.linger_deadline = 0
    c.linger_prev = c.linger_next = NULL


# -- The instance socket's BIO ------------------------------------------------
# After the handshake, the SSL* talks to the instance through this BIO instead
# of OpenSSL's socket BIO, for two reasons:
#  * writes are gathered: every record one SSL_write (or SSL_shutdown, or a
#    KeyUpdate reply inside SSL_read) produces lands in the thread's out
#    buffer and leaves in one send() (_flush), four records per syscall;
#  * reads know when the socket is drained: a short recv() clears
#    s_readable, so OpenSSL's next read returns "retry" without a syscall.

cdef extern from "openssl/bio.h" nogil:
    ctypedef struct BIO_METHOD
    int BIO_get_new_index()
    BIO_METHOD *BIO_meth_new(int type, const char *name)
    int BIO_meth_set_write(BIO_METHOD *m, int (*f)(BIO *, const char *, int) noexcept nogil)
    int BIO_meth_set_read(BIO_METHOD *m, int (*f)(BIO *, char *, int) noexcept nogil)
    int BIO_meth_set_ctrl(BIO_METHOD *m, long (*f)(BIO *, int, long, void *) noexcept nogil)
    int BIO_meth_set_create(BIO_METHOD *m, int (*f)(BIO *) noexcept nogil)
    BIO *BIO_new(const BIO_METHOD *m)
    void BIO_set_data(BIO *b, void *ptr)
    void *BIO_get_data(BIO *b)
    void BIO_set_init(BIO *b, int init)
    void BIO_set_retry_read(BIO *b)
    void BIO_clear_retry_flags(BIO *b)
    enum: BIO_TYPE_SOURCE_SINK, BIO_CTRL_FLUSH

cdef extern from "openssl/ssl.h" nogil:
    void SSL_set_bio(SSL *s, BIO *rbio, BIO *wbio)
    long SSL_clear_mode(SSL *s, long mode)

cdef extern from "sys/socket.h" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)

cdef BIO_METHOD *_plane_bio_method = NULL


cdef int _bio_create(BIO *b) noexcept nogil:
    BIO_set_init(b, 1)
    return 1


cdef long _bio_ctrl(BIO *b, int cmd, long num, void *ptr) noexcept nogil:
    return 1 if cmd == BIO_CTRL_FLUSH else 0


cdef int _bio_read(BIO *b, char *buf, int size) noexcept nogil:
    cdef conn_t *c = <conn_t *>BIO_get_data(b)
    cdef ssize_t n
    BIO_clear_retry_flags(b)
    if not c.s_readable:
        BIO_set_retry_read(b)
        return -1
    n = recv(c.sfd, buf, size, 0)
    if n > 0:
        if n < size and not c.s_hup:
            c.s_readable = False  # drained; more data (or the FIN) is a new edge
        return <int>n
    if n < 0 and _transient(errno):
        c.s_readable = False
        BIO_set_retry_read(b)
    return <int>n  # 0 is EOF; -1 with errno is SSL_ERROR_SYSCALL


cdef int _bio_write(BIO *b, const char *data, int size) noexcept nogil:
    # Always accepted: the caller flushes after each SSL_* call, and keeps
    # what the socket refuses as the connection's pending ciphertext.
    cdef size_t need = _plane.out_len + size
    cdef char *grown
    if need > _plane.out_cap:
        grown = <char *>realloc(_plane.out, need)
        if grown == NULL:
            return -1
        _plane.out = grown
        _plane.out_cap = need
    memcpy(_plane.out + _plane.out_len, data, size)
    _plane.out_len += size
    return size


cdef int _attach_bio(SSL *ssl, conn_t *c) except -1:
    global _plane_bio_method
    cdef BIO_METHOD *m = _plane_bio_method
    if m == NULL:
        m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "alloydb-proxy-plane")
        if m == NULL:
            raise MemoryError("BIO_meth_new failed")
        BIO_meth_set_create(m, _bio_create)
        BIO_meth_set_ctrl(m, _bio_ctrl)
        BIO_meth_set_read(m, _bio_read)
        BIO_meth_set_write(m, _bio_write)
        _plane_bio_method = m
    cdef BIO *bio = BIO_new(m)
    if bio == NULL:
        raise MemoryError("BIO_new failed")
    BIO_set_data(bio, c)
    # Whole SSL_writes: all records of one call leave in one send().
    SSL_clear_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE)
    # Frees the socket BIO from SSL_set_fd (which never closes the fd); it
    # holds no bytes: read-ahead data lives in the SSL record layer.
    SSL_set_bio(ssl, bio, bio)
    return 0


cdef int _send_pending(conn_t *c) noexcept nogil:
    """Send c.cpend to the instance: 1 if all gone, 0 if some waits, -1 if finished.

    c.cpend may borrow the thread's out buffer (see _flush); only bytes the
    socket refuses are then copied to the connection's own heap block.
    """
    cdef bint borrowed = c.cpend == _plane.out
    cdef ssize_t n
    cdef int left
    cdef char *rest
    while c.cpend_off < c.cpend_len:
        n = send(c.sfd, c.cpend + c.cpend_off, c.cpend_len - c.cpend_off, MSG_NOSIGNAL)
        if n > 0:
            c.cpend_off += n
            continue
        if n < 0 and _transient(errno):
            c.s_writable = False
            if borrowed:
                left = c.cpend_len - c.cpend_off
                rest = <char *>malloc(left)
                if rest == NULL:
                    c.cpend = NULL
                    strncpy(c.message, "out of memory", MESSAGE)
                    _finish(c, C_ABORTED)
                    return -1
                memcpy(rest, c.cpend + c.cpend_off, left)
                c.cpend, c.cpend_len, c.cpend_off = rest, left, 0
            return 0
        if borrowed:
            c.cpend = NULL
        _set_message_errno(c, errno)
        _finish(c, C_ERROR_WRITE_INSTANCE)
        return -1
    if not borrowed:
        free(c.cpend)
    c.cpend = NULL
    c.cpend_len = c.cpend_off = 0
    if c.shut_wr_pending:
        c.shut_wr_pending = False
        shutdown(c.sfd, SHUT_WR)
    return 1


cdef int _flush(conn_t *c) noexcept nogil:
    """Send what the last SSL_* call put in the out buffer, behind any pending bytes."""
    cdef size_t n = _plane.out_len
    cdef char *grown
    if n == 0:
        return 0
    _plane.out_len = 0
    if c.cpend == NULL:
        c.cpend, c.cpend_len, c.cpend_off = _plane.out, <int>n, 0
        return _send_pending(c)
    grown = <char *>realloc(c.cpend, c.cpend_len + n)
    if grown == NULL:
        strncpy(c.message, "out of memory", MESSAGE)
        _finish(c, C_ABORTED)
        return -1
    memcpy(grown + c.cpend_len, _plane.out, n)
    c.cpend = grown
    c.cpend_len += <int>n
    return 0


cdef int _client_write(conn_t *c, char *data, int n) noexcept nogil:
    """Send to the client (no signal on a closed peer); keep what it cannot take.

    Returns 1 on progress, 0 if nothing could be written, -1 when finished.
    """
    global _bytes_s2c
    cdef int off = 0
    cdef ssize_t ret
    while off < n:
        ret = send(c.cfd, data + off, n - off, MSG_NOSIGNAL)
        if ret > 0:
            off += ret
            c.bytes_s2c += ret
            _bytes_s2c += ret
            continue
        if ret < 0 and _transient(errno):
            c.c_writable = False
            break
        _set_message_errno(c, errno)
        _finish(c, C_ERROR_WRITE_CLIENT)
        return -1
    if data == c.s2c:
        c.s2c_off = c.s2c_len - (n - off)
        if c.s2c_off == c.s2c_len:
            free(c.s2c)
            c.s2c = NULL
            c.s2c_len = c.s2c_off = 0
    elif off < n:
        c.s2c = <char *>malloc(n - off)
        if c.s2c == NULL:
            strncpy(c.message, "out of memory", MESSAGE)
            _finish(c, C_ABORTED)
            return -1
        memcpy(c.s2c, data + off, n - off)
        c.s2c_len = n - off
        c.s2c_off = 0
    return 1 if off > 0 else 0


cdef bint _pump_once(conn_t *c) noexcept nogil:
    """One round in each direction; True if anything moved."""
    global _bytes_c2s
    cdef bint progress = False
    cdef ssize_t n
    cdef int ret, err, saved, total, off
    cdef char *buf

    # client -> instance: pending ciphertext first (backpressure), then new bytes
    if c.cpend != NULL:
        if c.s_writable:
            ret = _send_pending(c)
            if ret < 0:
                return False
            progress = ret > 0
    elif not c.client_eof and c.c_readable:
        buf = _plane.scratch_in
        n = read(c.cfd, buf, SCRATCH)
        if n > 0:
            if n < SCRATCH and not c.c_hup:
                # A short read emptied the socket; more data (or the FIN)
                # brings a new edge. A FIN seen already brings none: read on.
                c.c_readable = False
            off = 0
            while off < n:  # the BIO takes everything, so this cannot block
                ERR_clear_error()
                ret = SSL_write(c.ssl, buf + off, <int>(n - off))
                if ret <= 0:
                    saved = errno
                    _set_message_ssl(c, SSL_get_error(c.ssl, ret), saved)
                    _finish(c, C_ERROR_WRITE_INSTANCE)
                    return False
                off += ret
            c.bytes_c2s += n
            _bytes_c2s += n
            if _flush(c) < 0:
                return False
            progress = True
        elif n == 0:
            c.client_eof = True
            if not c.server_eof:
                c.client_first = True
            progress = True
        elif _transient(errno):
            c.c_readable = False
        else:
            _set_message_errno(c, errno)
            _finish(c, C_ERROR_READ_CLIENT)
            return False

    # the client has finished and everything it sent is on its way
    if c.client_eof and not c.close_notify_sent:
        c.close_notify_sent = True
        if c.server_eof:
            _finish(c, C_CLIENT_CLOSED if c.client_first else C_INSTANCE_CLOSED)
            return False
        ERR_clear_error()
        SSL_shutdown(c.ssl)  # one close_notify record, into the out buffer
        ERR_clear_error()
        c.shut_wr_pending = True  # after the last ciphertext has left
        if _flush(c) < 0:
            return False
        if c.cpend == NULL and c.shut_wr_pending:
            c.shut_wr_pending = False
            shutdown(c.sfd, SHUT_WR)
        if c.linger_ns > 0:
            _linger_add(c, _now_ns())
        progress = True

    # instance -> client
    if c.s2c != NULL:
        if c.c_writable:
            ret = _client_write(c, c.s2c + c.s2c_off, c.s2c_len - c.s2c_off)
            if ret < 0:
                return False
            progress = ret > 0 or progress
    elif not c.server_eof and (c.s_readable or SSL_has_pending(c.ssl)):
        buf = _plane.scratch_out
        total = 0
        # Gather several records (read-ahead keeps them in OpenSSL's buffer)
        # into one write to the client.
        while total <= SCRATCH - BUFFER_SIZE:
            ERR_clear_error()
            ret = SSL_read(c.ssl, buf + total, SCRATCH - total)
            if ret > 0:
                total += ret
                continue
            saved = errno
            err = SSL_get_error(c.ssl, ret)
            if err == SSL_ERROR_ZERO_RETURN or (err == SSL_ERROR_SYSCALL and saved == 0):
                c.server_eof = True
                progress = True
            elif err != SSL_ERROR_WANT_READ:
                _set_message_ssl(c, err, saved)
                _finish(c, C_ERROR_READ_INSTANCE)
                return False
            break
        if _plane.out_len and _flush(c) < 0:  # e.g. a KeyUpdate reply
            return False
        if total > 0:
            progress = True
            if _client_write(c, buf, total) < 0:
                return False

    # the instance has finished and the client has all its bytes
    if c.server_eof and c.s2c == NULL:
        _finish(c, C_CLIENT_CLOSED if c.client_first else C_INSTANCE_CLOSED)
        return False
    return progress


cdef void _pump(conn_t *c, conn_t **again) noexcept nogil:
    cdef int rounds = 0
    while not c.finished and rounds < PUMP_ROUNDS:
        rounds += 1
        if not _pump_once(c):
            return
    if not c.finished and not c.queued:
        # Out of rounds with work left: continue after the others had a turn.
        c.queued = True
        c.ready_next = again[0]
        again[0] = c


cdef void _push_done(conn_t *done) noexcept nogil:
    cdef conn_t *c
    cdef unsigned long long one = 1
    if done == NULL:
        return
    pthread_mutex_lock(&_plane.lock)
    while done != NULL:
        c = done
        done = c.done_next
        c.done_next = NULL
        if _plane.done_tail != NULL:
            _plane.done_tail.done_next = c
        else:
            _plane.done_head = c
        _plane.done_tail = c
    pthread_mutex_unlock(&_plane.lock)
    write(_plane.done_fd, &one, sizeof(one))


cdef void *_plane_main(void *arg) noexcept nogil:
    cdef epoll_event events[MAX_EVENTS]
    cdef sigset_t all_signals
    cdef int n, i, timeout
    cdef unsigned int ev
    cdef unsigned long long tag, counter
    cdef conn_t *c
    cdef conn_t *ready
    cdef conn_t *again = NULL
    cdef conn_t *done
    cdef conn_t *aborts
    cdef conn_t *next_c
    cdef long long now, soonest
    # Signals belong to Python's main thread.
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)
    while True:
        timeout = -1
        if again != NULL:
            timeout = 0
        elif _plane.lingering != NULL:
            soonest = _plane.lingering.linger_deadline
            c = _plane.lingering.linger_next
            while c != NULL:
                if c.linger_deadline < soonest:
                    soonest = c.linger_deadline
                c = c.linger_next
            now = _now_ns()
            timeout = 0 if soonest <= now else <int>((soonest - now) // 1000000 + 1)
        n = epoll_wait(_plane.epfd, events, MAX_EVENTS, timeout)
        if n < 0:
            n = 0  # EINTR
        ready = again
        again = NULL
        done = NULL
        for i in range(n):
            tag = events[i].data.u64
            ev = events[i].events
            if tag == SIDE_WAKE:
                read(_plane.wake_fd, &counter, sizeof(counter))
                continue
            c = <conn_t *>(tag & ~(<unsigned long long>3))
            if c.finished:
                continue
            if ev & (EPOLLERR | EPOLLHUP):
                # Let the next call on that fd report what happened.
                ev |= EPOLLIN | EPOLLOUT
            if tag & 3 == SIDE_CLIENT:
                if ev & (EPOLLIN | EPOLLRDHUP):
                    c.c_readable = True
                if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                    c.c_hup = True
                if ev & EPOLLOUT:
                    c.c_writable = True
            else:
                if ev & (EPOLLIN | EPOLLRDHUP):
                    c.s_readable = True
                if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                    c.s_hup = True
                if ev & EPOLLOUT:
                    c.s_writable = True
            if not c.queued:
                c.queued = True
                c.ready_next = ready
                ready = c

        # Aborts requested by Python since the last batch.
        pthread_mutex_lock(&_plane.lock)
        aborts = _plane.aborts
        _plane.aborts = NULL
        pthread_mutex_unlock(&_plane.lock)
        while aborts != NULL:
            c = aborts
            aborts = c.abort_next
            c.abort_next = NULL
            if not c.finished:
                _finish(c, C_ABORTED)
                c.done_next = done
                done = c
            pthread_mutex_lock(&_plane.lock)
            c.abort_pending = False
            if c.orphaned:
                free(c)  # already delivered; this was its last reference
            pthread_mutex_unlock(&_plane.lock)

        while ready != NULL:
            c = ready
            ready = c.ready_next
            c.ready_next = NULL
            c.queued = False
            if c.finished:
                continue  # aborted above; its completion is queued
            _pump(c, &again)
            if c.finished:
                c.done_next = done
                done = c

        if _plane.lingering != NULL:
            now = _now_ns()
            c = _plane.lingering
            while c != NULL:
                next_c = c.linger_next
                if c.linger_deadline <= now and not c.finished:
                    _finish(c, C_CLIENT_CLOSED)
                    c.done_next = done
                    done = c
                c = next_c

        # Nothing refers to a finished connection past this point, except
        # the 'again' list, which never holds finished ones.
        _push_done(done)
    return NULL


cdef int _plane_init() except -1:
    if _plane.epfd >= 0:
        return 0
    pthread_mutex_init(&_plane.lock, NULL)
    _plane.scratch_in = <char *>malloc(SCRATCH)
    _plane.scratch_out = <char *>malloc(SCRATCH)
    if _plane.scratch_in == NULL or _plane.scratch_out == NULL:
        raise MemoryError()
    _plane.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    _plane.done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    cdef int epfd = epoll_create1(EPOLL_CLOEXEC)
    if _plane.wake_fd < 0 or _plane.done_fd < 0 or epfd < 0:
        raise OSError(errno, "cannot create the data plane: " + _errno_text(errno))
    cdef epoll_event ev
    ev.events = EPOLLIN
    ev.data.u64 = SIDE_WAKE
    if epoll_ctl(epfd, EPOLL_CTL_ADD, _plane.wake_fd, &ev) < 0:
        raise OSError(errno, "cannot create the data plane: " + _errno_text(errno))
    _plane.epfd = epfd
    return 0


cdef int _plane_start() except -1:
    cdef pthread_t thread
    cdef int err
    _plane_init()
    if _plane.running:
        return 0
    err = pthread_create(&thread, NULL, _plane_main, NULL)
    if err != 0:
        raise OSError(err, "cannot start the data plane thread: " + _errno_text(err))
    pthread_detach(thread)
    _plane.running = True
    return 0


# Created at import: three process-wide fds, so fd accounting is stable.
_plane_init()
cdef object _drain_loop = None


def _drain_completions():
    """Loop reader on done_fd: deliver every finished connection to its Splice."""
    cdef unsigned long long counter
    cdef conn_t *c
    cdef conn_t *head
    read(_plane.done_fd, &counter, sizeof(counter))
    pthread_mutex_lock(&_plane.lock)
    head = _plane.done_head
    _plane.done_head = _plane.done_tail = NULL
    pthread_mutex_unlock(&_plane.lock)
    while head != NULL:
        c = head
        head = c.done_next
        splice = <Splice><PyObject *>c.owner
        c.owner = NULL
        Py_DECREF(splice)  # the reference taken in start(); `splice` holds one
        splice._deliver()


cdef void _watch_completions(loop) except *:
    """Make `loop` the one that receives completions (tests run many loops in turn)."""
    global _drain_loop
    if _drain_loop is loop:
        return
    old = _drain_loop
    if old is not None and not old.is_closed() and not old.is_running():
        old.remove_reader(_plane.done_fd)
    loop.add_reader(_plane.done_fd, _drain_completions)
    _drain_loop = loop


cdef class Splice:
    """Moves bytes between a client fd and an established TLSConnection.

    The connection is handed to the data-plane thread by ``start``; from then
    on Python sees it again exactly once, when ``on_done(kind, message)`` runs
    on the loop after both fds are closed.

    End of stream: when the client stops sending, its last bytes are
    written, then close_notify and a TCP half-close go to the instance, and
    the instance's remaining bytes still reach the client (for up to
    ``linger`` seconds). When the instance stops, its last bytes are flushed
    to the client and both sides are closed. Any error closes both at once.
    """

    def __cinit__(self, int client_fd, TLSConnection conn not None, on_done, double linger=30.0):
        self.c = NULL
        if conn.closed:
            close(client_fd)
            raise ValueError("TLS connection is closed")
        self.c = <conn_t *>calloc(1, sizeof(conn_t))
        if self.c == NULL:
            close(client_fd)
            conn._close()
            raise MemoryError()
        _set_nonblocking(client_fd)
        # The connection's fd and SSL* move here; the TLSConnection is spent.
        self.c.cfd = client_fd
        self.c.sfd = conn.fd
        self.c.ssl = conn.ssl
        conn.ssl = NULL
        conn.closed = True
        self.c.linger_ns = <long long>(linger * 1e9)
        _attach_bio(self.c.ssl, self.c)
        # Anything decrypted or buffered before start is found by the first pump.
        self.c.c_readable = self.c.c_writable = True
        self.c.s_readable = self.c.s_writable = True
        self.on_done = on_done

    def start(self, loop):
        global _active, _total
        cdef epoll_event ev
        if self.started:
            raise RuntimeError("splice already started")
        _plane_start()
        _watch_completions(loop)
        self.started = True
        self.loop = loop
        _active += 1
        _total += 1
        Py_INCREF(self)
        self.c.owner = <void *>self
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = <unsigned long long>self.c | SIDE_CLIENT
        if epoll_ctl(_plane.epfd, EPOLL_CTL_ADD, self.c.cfd, &ev) == 0:
            ev.data.u64 = <unsigned long long>self.c | SIDE_INSTANCE
            if epoll_ctl(_plane.epfd, EPOLL_CTL_ADD, self.c.sfd, &ev) == 0:
                return
        # Cannot be watched (a bad fd): report it through the normal path.
        _set_message_errno(self.c, errno)
        self.abort()

    def abort(self):
        """Tear down soon; on_done still runs once, on the loop, with ABORTED."""
        cdef unsigned long long one = 1
        if not self.started or self.delivered:
            return
        pthread_mutex_lock(&_plane.lock)
        if not self.c.abort_pending:
            self.c.abort_pending = True
            self.c.abort_next = _plane.aborts
            _plane.aborts = self.c
        pthread_mutex_unlock(&_plane.lock)
        write(_plane.wake_fd, &one, sizeof(one))

    @property
    def bytes_client_to_server(self):
        return self.c.bytes_c2s if self.c != NULL else self.final_c2s

    @property
    def bytes_server_to_client(self):
        return self.c.bytes_s2c if self.c != NULL else self.final_s2c

    cdef _deliver(self):
        global _active
        cdef int kind = self.c.kind
        message = self.c.message.decode("utf-8", "replace")
        self.delivered = True
        _active -= 1
        self.final_c2s = self.c.bytes_c2s
        self.final_s2c = self.c.bytes_s2c
        self._release()
        on_done, self.on_done = self.on_done, None
        if on_done is None:
            return
        try:
            on_done(kind, message)
        except BaseException as exc:
            self.loop.call_exception_handler({
                "message": "exception in splice on_done callback",
                "exception": exc,
            })

    cdef void _release(self) noexcept:
        """Free the struct, or leave that to the thread if an abort is in flight."""
        cdef conn_t *c = self.c
        if c == NULL:
            return
        self.c = NULL
        pthread_mutex_lock(&_plane.lock)
        if c.abort_pending:
            c.orphaned = True
            c = NULL
        pthread_mutex_unlock(&_plane.lock)
        free(c)

    def __dealloc__(self):
        # A started, undelivered splice is referenced by the thread and cannot
        # get here; what remains is one never started: close its fds.
        if self.c != NULL and not self.started:
            close(self.c.cfd)
            SSL_free(self.c.ssl)
            close(self.c.sfd)
            free(self.c)
            self.c = NULL
