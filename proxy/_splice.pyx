# cython: language_level=3
"""The hot path: TLS 1.3 client connections on raw socket fds, and splicing.

libssl is called directly (no MemoryBIO, no ssl.SSLObject): measured here at
1.3x-2.7x the speed of the ssl module's object API. Python meets this module
at connection edges only (context creation, handshake, metadata exchange,
start, end); in between, one native data-plane thread moves the bytes without
the GIL (see "The data plane" below, and _splice.pxd for ownership).
"""

include "_decls.pxi"

cdef inline bint _transient(int err) noexcept nogil:
    """A non-blocking call that should simply be retried on readiness."""
    if err == EAGAIN or err == EINTR:
        return True
    return err == EWOULDBLOCK  # the same value as EAGAIN on Linux


cdef int _set_nonblocking(int fd) noexcept nogil:
    # The core never blocks: a blocking fd handed in by mistake would stall
    # the whole event loop inside read() or SSL_read().
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0:
        return -1
    return fcntl(fd, F_SETFL, flags | O_NONBLOCK)


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


include "_tls.pxi"
include "_bio.pxi"
include "_plane.pxi"
