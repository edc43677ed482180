# The hot path's map: one extension, proxy._splice, built from _splice.pyx and
# the parts it includes, in this order (each part owns one job):
#
#   _decls.pxi   C declarations only: libc, Linux (epoll, eventfd, pthread)
#                and OpenSSL.
#   _splice.pyx  the module: outcome constants, counters (stats()), error
#                text helpers, and the includes below.
#   _tls.pxi     TLSClientContext and TLSConnection (Python-facing TLS).
#   _bio.pxi     the BIO through which a spliced SSL* talks to the instance.
#   _plane.pxi   the data plane: threads, epoll loop, Splice.
#
# TLSClientContext  one SSL_CTX per certificate refresh: TLS 1.3 only, the
#                   instance's CA as the only trust anchor, our client chain.
# TLSConnection     one non-blocking SSL on a connected socket fd; used from
#                   Python (through proxy/tlsconn.py) for the handshake and the
#                   metadata exchange, then handed to a Splice.
# Splice            moves bytes between a plain client fd and a TLSConnection on
#                   the data-plane thread (native, no GIL): edge-triggered epoll,
#                   a shared scratch buffer per direction, heap memory only for
#                   bytes a slow peer has not taken, no Python object per chunk.
#
# Ownership: a TLSConnection owns its fd and SSL* and frees them once (close()
# or __dealloc__). A Splice takes the client fd and the TLSConnection's fd and
# SSL* at construction; the thread closes all of them exactly once, before
# on_done runs on the loop.

cdef extern from "openssl/ssl.h" nogil:
    ctypedef struct SSL_CTX
    ctypedef struct SSL
    ctypedef struct SSL_METHOD
    ctypedef struct SSL_CIPHER


cdef class TLSClientContext:
    cdef SSL_CTX *ctx
    cdef dict sessions          # server name -> _Session
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


cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_mutex_t:
        pass


# One data-plane thread: its own epoll, wake-up eventfd, scratch buffers and
# lists. Each connection lives on one thread from start to finish, so nothing
# on the per-byte path is shared between threads (see _plane.pxi).
cdef struct conn_t  # below

cdef struct plane_t:
    int index
    int epfd
    int wake_fd                  # Python -> thread (starts, aborts)
    int pid                      # the process that made these fds
    bint made                    # the fds and buffers exist (not the thread)
    bint running
    pthread_mutex_t lock         # guards starts, aborts and the abort fields of conn_t
    conn_t *starts               # under lock
    conn_t *aborts               # under lock
    conn_t *lingering            # thread only
    char *scratch_in
    char *scratch_out
    char *out                    # ciphertext of the current SSL_* call (_bio_write)
    size_t out_len, out_cap
    # Written by the thread only; read whole (64-bit aligned) at scrape time.
    unsigned long long bytes_c2s, bytes_s2c
    long active                  # connections assigned and not yet delivered (GIL)


# One spliced connection, owned by its data-plane thread from Splice.start
# until its completion is delivered; see _plane.pxi for the thread.
cdef struct conn_t:
    plane_t *plane               # the thread it lives on, chosen at start
    int cfd
    int sfd                      # -1 once the instance side is closed
    SSL *ssl
    # Readiness as last reported by epoll, cleared when a call hits EAGAIN.
    bint c_readable, c_writable, s_readable, s_writable
    bint c_hup, s_hup            # a FIN or an error was reported on that side
    bint c_urgent, s_urgent      # urgent data seen: a short read no longer means drained
    bint registered              # both fds are in the thread's epoll
    # Ciphertext the instance has not taken yet (NULL when none).
    char *cpend
    int cpend_len, cpend_off
    bint shut_wr_pending         # half-close the instance once cpend is sent
    # Plaintext the client has not taken yet (NULL when none).
    char *s2c
    int s2c_len, s2c_off
    bint client_eof, server_eof, close_notify_sent, client_first, finished
    bint eof_error               # the instance's stream ended with an error (message set)
    bint s_dead                  # the instance takes no more bytes (client bytes are dropped)
    bint write_failed            # ... because a write to it failed (message set)
    bint draining                # instance side closed; dropping client bytes until it closes
    int final_kind               # the outcome, decided when draining began
    long long drain_deadline     # when draining gives up (the linger)
    bint client_tcp              # the client socket is TCP (RSTs can discard bytes)
    bint queued                  # on the thread's ready list
    int kind
    char message[200]
    unsigned long long bytes_c2s, bytes_s2c
    long long linger_ns
    long long linger_deadline    # 0 while not lingering
    conn_t *start_next
    conn_t *ready_next
    conn_t *linger_prev
    conn_t *linger_next
    conn_t *done_next
    conn_t *abort_next
    void *owner                  # the Splice (a held reference) until delivery
    # Shared with the Python side under plane.lock:
    bint abort_pending           # on the abort list, not yet processed
    bint orphaned                # delivered: the thread frees it after the abort


cdef class Splice:
    cdef conn_t *c
    cdef object on_done
    cdef object loop
    cdef bint started, delivered
    cdef int pid                 # the process that started it (forks leave it alone)
    cdef unsigned long long final_c2s, final_s2c

    cdef _deliver(self)
    cdef void _release(self) noexcept
