# The hot path's design, in declarations.
#
# TLSClientContext  one SSL_CTX per certificate refresh: TLS 1.3 only, the
#                   instance's CA as the only trust anchor, our client chain.
# TLSConnection     one non-blocking SSL on a connected socket fd; used from
#                   Python (through proxy/tlsconn.py) for the handshake and the
#                   metadata exchange, then handed to a Splice.
# Splice            moves bytes between a plain client fd and a TLSConnection
#                   from event-loop readiness callbacks: one malloc'ed buffer per
#                   direction, no Python object per chunk, backpressure by
#                   dropping read interest while the other side is full.
#
# Ownership: a TLSConnection owns its fd and SSL* and frees them once (close()
# or __dealloc__). A Splice owns the client fd and the TLSConnection from
# construction on, and closes both exactly once, before on_done runs.

cdef extern from "openssl/ssl.h" nogil:
    ctypedef struct SSL_CTX
    ctypedef struct SSL
    ctypedef struct SSL_METHOD
    ctypedef struct SSL_CIPHER


cdef class TLSClientContext:
    cdef SSL_CTX *ctx
    cdef _load_chain(self, bytes pem)
    cdef _load_key(self, bytes pem)
    cdef _load_ca(self, bytes pem)


cdef class TLSConnection:
    cdef SSL *ssl
    cdef int fd
    cdef bint closed
    cdef readonly TLSClientContext context   # keeps the SSL_CTX alive
    cdef readonly str server_name
    cdef void _close(self) noexcept
    cdef _check_open(self)


cdef class Splice:
    cdef int client_fd
    cdef TLSConnection conn
    cdef object on_done
    cdef object loop
    cdef double linger
    cdef object linger_handle
    cdef char *c2s          # client -> instance bytes not yet written
    cdef char *s2c          # instance -> client bytes not yet written
    cdef Py_ssize_t c2s_len, c2s_off, s2c_len, s2c_off
    cdef bint client_eof, server_eof, close_notify_sent, finished, started
    cdef bint client_first          # the client ended first: CLIENT_CLOSED
    cdef int write_wants            # what a pending SSL_write waits for (0, 1 read, 2 write)
    cdef int read_wants             # what SSL_read waits for
    cdef bint reg_client_r, reg_client_w, reg_server_r, reg_server_w
    cdef bint pump_scheduled
    cdef readonly unsigned long long bytes_client_to_server
    cdef readonly unsigned long long bytes_server_to_client

    cdef void _pump(self)
    cdef void _update_interest(self)
    cdef void _finish(self, int kind, str message)
    cdef str _ssl_failure(self, int err)
