# ---------------------------------------------------------------------------
# The data plane: native threads that splice the connections.
# (Included by _splice.pyx; _splice.pxd declares plane_t, conn_t and Splice.)
#
# Theory of operation
#
# There are set_threads() planes (default: one per usable CPU, at most 16),
# each a thread with its own epoll, wake-up eventfd, scratch buffers and
# linger list. Python gives a new connection to the plane with the fewest
# connections (Splice.start, under the GIL), which starts its thread on first
# use; the connection stays on that plane until it ends, so its bytes never
# cross threads and nothing on the per-byte path is locked or shared.
#
# Python hands over an established connection (client fd, SSL*, instance fd)
# through the plane's start queue and gets it back once, finished, through
# the process-wide completion queue and an eventfd that the event loop
# watches. In between, no Python code and no GIL are involved: the thread
# registers both fds in its epoll (edge-triggered, once, never modified),
# remembers which fds are readable or writable, and only calls
# read/write/SSL_* where that can make progress. Every conn_t field is its
# thread's alone from the start queue to the completion queue, except the
# abort fields, which are shared under the plane's lock.
#
# Bytes move through one per-thread scratch buffer per direction. A
# connection owns heap memory only while a peer is not keeping up: `cpend`
# (ciphertext the instance has not taken) and `s2c` (plaintext the client has
# not taken, sent from `s2c_off` on). While either is pending, nothing new is
# read in that direction: that is the backpressure, and it keeps the bytes in
# order.
#
# End of stream, per direction:
#  * client EOF: its last bytes, then close_notify and a TCP half-close go to
#    the instance; the instance's bytes still reach the client for up to
#    `linger` seconds from the half-close;
#  * instance EOF (close_notify, or a bare TCP FIN: a truncation, reported as
#    "unexpected EOF" like Go's crypto/tls): its last bytes are flushed to the
#    client, whatever the client does meanwhile, then both sides close. A
#    write error towards the instance only stops the client's bytes (nobody
#    takes them); the read side still runs to the instance's end, so what it
#    sent before it went away still goes out.
# Any other error closes both sides at once; the first error wins.
#
# When the instance has finished, a TCP client (or a unix one that is still
# sending) is drained (read, dropped) until it closes, or holds all our
# bytes, or the linger ends: closing on its unread bytes would send a RST,
# which discards our unacked bytes, the instance's last ones (see
# _start_draining and _pump_once).
#
# Lifetime: a conn_t is freed by Python (Splice._release) after delivery. So
# nothing on the thread may refer to a finished connection once the batch
# that finished it is pushed: its fds are removed from epoll before they are
# closed (a forked child may hold copies, which keeps the registration alive),
# and it is taken off the thread's own lists first.
# ---------------------------------------------------------------------------

from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF

# Plaintext per read or write call: eight TLS records (measured: fewer
# syscalls per GB than 64 KiB, same latency). One scratch buffer of this
# size per direction serves every connection of the thread.
DEF SCRATCH = 131072
# Rounds per connection per wakeup before the others get a turn.
DEF PUMP_ROUNDS = 16
DEF MAX_EVENTS = 256
DEF MESSAGE = 200
# The longest epoll wait while a linger deadline is pending (ms): deadlines
# far away are simply re-checked.
DEF MAX_WAIT_MS = 60000
# How often a draining connection checks whether the client has acknowledged
# all our bytes (nothing else wakes it when the client only reads).
DEF DRAIN_POLL_MS = 10
# epoll tags: the low bits of the (8-byte aligned) connection pointer.
DEF SIDE_CLIENT = 0
DEF SIDE_INSTANCE = 1
DEF SIDE_WAKE = 2
# The longest linger a Splice accepts (seconds): about 115 days, far inside
# the range of the nanosecond clock arithmetic.
MAX_LINGER = 1e7


# Threads: the default is one per usable CPU, at most DEFAULT_THREADS_CAP;
# set_threads() accepts up to MAX_PLANES.
DEF MAX_PLANES = 64
MAX_THREADS = MAX_PLANES
DEFAULT_THREADS_CAP = 16


# Finished connections of every thread, delivered to Python in order through
# one eventfd (a lock taken once per finished batch, never per byte).
ctypedef struct completions_t:
    int done_fd                  # thread -> Python
    int pid                      # the process that made done_fd
    pthread_mutex_t lock
    conn_t *head                 # under lock
    conn_t *tail


cdef plane_t _planes[MAX_PLANES]
cdef int _plane_count = 0        # threads new connections are spread over
cdef completions_t _done
_done.done_fd = -1
cdef object _drain_loop = None   # the loop that reads done_fd


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


cdef void _close_instance(conn_t *c) noexcept nogil:
    """Free the SSL* and close the instance socket (once; sfd is -1 after)."""
    if c.sfd < 0:
        return
    if c.plane.out_len:
        # A failed SSL_* call leaves its fatal alert in the shared out buffer.
        # It is this instance's (best effort, only if it keeps the stream in
        # order) and never the next connection's.
        if c.cpend == NULL and not c.s_dead:
            send(c.sfd, c.plane.out, c.plane.out_len, MSG_NOSIGNAL | MSG_DONTWAIT)
        c.plane.out_len = 0
    # Before close(): a copy of the fd (a fork between fork and exec) would
    # keep the registration, and its events would name a freed conn_t.
    if c.registered:
        epoll_ctl(c.plane.epfd, EPOLL_CTL_DEL, c.sfd, NULL)
    SSL_free(c.ssl)
    c.ssl = NULL
    close(c.sfd)
    c.sfd = -1
    if c.cpend == c.plane.out:
        c.cpend = NULL  # borrowed, never ours to free
    free(c.cpend)
    c.cpend = NULL
    c.cpend_len = c.cpend_off = 0


cdef void _finish(conn_t *c, int kind) noexcept nogil:
    """Close both sides once; the completion is queued by the caller's batch."""
    cdef char drain[4096]
    cdef int i
    if c.finished:
        return
    c.finished = True
    c.kind = kind
    _close_instance(c)
    if c.registered:
        epoll_ctl(c.plane.epfd, EPOLL_CTL_DEL, c.cfd, NULL)
        c.registered = False
    if c.draining or kind == C_INSTANCE_CLOSED or kind == C_CLIENT_CLOSED or c.server_eof:
        # Half-close first and drop unread client input, so closing does not
        # turn into a RST that could discard bytes the client has not read
        # (or, on a unix socket, an ECONNRESET where it expects EOF).
        if not c.draining:
            shutdown(c.cfd, SHUT_WR)
        for i in range(16):  # bounded: a client that keeps sending gets the RST
            if read(c.cfd, drain, sizeof(drain)) <= 0:
                break
    close(c.cfd)
    free(c.s2c)
    c.s2c = NULL
    if c.linger_deadline:
        _linger_remove(c)


cdef bint _client_unacked(conn_t *c) noexcept nogil:
    """Whether bytes of ours are not yet acknowledged (TCP) or read (unix) by the client."""
    cdef int unacked = 0
    return ioctl(c.cfd, SIOCOUTQ, &unacked) < 0 or unacked > 0


cdef bint _client_is_sending(conn_t *c) noexcept nogil:
    """Whether client bytes wait unread (they are dropped: the instance has gone)."""
    cdef ssize_t n = read(c.cfd, c.plane.scratch_in, SCRATCH)
    if n == 0:
        c.client_eof = True
    return n > 0


cdef void _start_draining(conn_t *c, int kind) noexcept nogil:
    """The instance has finished and the client has every byte, maybe not yet acknowledged.

    A close now, while the client still sends (or sends again), draws a RST,
    and a RST discards whatever of ours is not acknowledged yet: the
    instance's last bytes. So the client gets its FIN, the instance side
    closes, and the client's further bytes are read and dropped until it
    closes too, or has acknowledged all of ours (polled every DRAIN_POLL_MS),
    or the linger runs out. The outcome is decided already.
    """
    cdef long long now = _now_ns()
    c.draining = True
    c.final_kind = kind
    c.drain_deadline = now + c.linger_ns
    shutdown(c.cfd, SHUT_WR)
    _close_instance(c)
    _linger_at(c, now + DRAIN_POLL_MS * 1000000LL)


cdef int _drain_client(conn_t *c) noexcept nogil:
    """Read and drop client bytes: 1 on progress, 0 if none, -1 when finished."""
    cdef ssize_t n
    if not c.c_readable:
        return 0
    n = read(c.cfd, c.plane.scratch_in, SCRATCH)
    if n > 0:
        return 1
    if n < 0 and _transient(errno):
        c.c_readable = False
        if _client_unacked(c):
            return 0
    _finish(c, c.final_kind)  # EOF, an error, or nothing left to lose
    return -1


cdef void _linger_add(conn_t *c) noexcept nogil:
    if not c.linger_deadline:
        _linger_at(c, _now_ns() + c.linger_ns)


cdef void _linger_at(conn_t *c, long long deadline) noexcept nogil:
    """Put c on the linger list with this deadline (or move its deadline)."""
    cdef bint listed = c.linger_deadline != 0
    c.linger_deadline = deadline if deadline != 0 else 1  # 0 means "not listed"
    if listed:
        return
    c.linger_prev = NULL
    c.linger_next = c.plane.lingering
    if c.plane.lingering != NULL:
        c.plane.lingering.linger_prev = c
    c.plane.lingering = c


cdef void _linger_remove(conn_t *c) noexcept nogil:
    if c.linger_prev != NULL:
        c.linger_prev.linger_next = c.linger_next
    else:
        c.plane.lingering = c.linger_next
    if c.linger_next != NULL:
        c.linger_next.linger_prev = c.linger_prev
    c.linger_deadline = 0
    c.linger_prev = c.linger_next = NULL


cdef void _half_close_instance(conn_t *c) noexcept nogil:
    """The client's last bytes and close_notify have left: send the FIN, start the linger."""
    shutdown(c.sfd, SHUT_WR)
    if not c.server_eof:  # otherwise only the tail to the client is left
        _linger_add(c)


# -- Towards the instance -----------------------------------------------------

cdef void _instance_write_failed(conn_t *c, int err, int saved_errno) noexcept nogil:
    """A write towards the instance failed (the connection goes on).

    The instance takes no more bytes: the client's further bytes are
    dropped. But what it sent before it went away (its last bytes, maybe its
    close_notify) may still wait unread behind the client's backpressure, so
    the read side carries on until the instance's stream ends: cleanly
    (INSTANCE_CLOSED, as it meant to close) or with the read error, reported
    as this write error, which came first.
    """
    if c.cpend == c.plane.out:
        c.cpend = NULL  # borrowed (see _send_pending), not ours to free
    if not c.server_eof and not c.write_failed:
        c.write_failed = True
        if err == SSL_ERROR_SYSCALL:
            _set_message_errno(c, saved_errno)
        else:
            _set_message_ssl(c, err, saved_errno)
    c.s_dead = True
    free(c.cpend)
    c.cpend = NULL
    c.cpend_len = c.cpend_off = 0
    c.shut_wr_pending = False
    c.plane.out_len = 0
    ERR_clear_error()


cdef int _send_pending(conn_t *c) noexcept nogil:
    """Send c.cpend to the instance: 1 if all gone, 0 if some waits, -1 if finished.

    c.cpend may borrow the thread's out buffer (see _flush); only bytes the
    socket refuses are then copied to the connection's own heap block.
    """
    cdef bint borrowed = c.cpend == c.plane.out
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
        _instance_write_failed(c, SSL_ERROR_SYSCALL, errno)
        return 1
    if not borrowed:
        free(c.cpend)
    c.cpend = NULL
    c.cpend_len = c.cpend_off = 0
    if c.shut_wr_pending:
        c.shut_wr_pending = False
        _half_close_instance(c)
    return 1


cdef int _flush(conn_t *c) noexcept nogil:
    """Send what the last SSL_* call put in the out buffer, behind any pending bytes.

    0 or 1 as _send_pending, -1 when finished.
    """
    cdef size_t n = c.plane.out_len
    cdef char *grown
    if n == 0:
        return 0
    c.plane.out_len = 0
    if c.s_dead:
        return 0
    if c.cpend == NULL:
        c.cpend, c.cpend_len, c.cpend_off = c.plane.out, <int>n, 0
        return _send_pending(c)
    grown = <char *>realloc(c.cpend, c.cpend_len + n)
    if grown == NULL:
        strncpy(c.message, "out of memory", MESSAGE)
        _finish(c, C_ABORTED)
        return -1
    memcpy(grown + c.cpend_len, c.plane.out, n)
    c.cpend = grown
    c.cpend_len += <int>n
    return 0


# -- Towards the client -------------------------------------------------------

cdef int _to_client(conn_t *c, const char *data, int n) noexcept nogil:
    """Send up to n bytes to the client: how many went, or -1 when finished."""
    cdef int off = 0
    cdef ssize_t ret
    while off < n:
        ret = send(c.cfd, data + off, n - off, MSG_NOSIGNAL)
        if ret > 0:
            off += <int>ret
            c.bytes_s2c += ret
            c.plane.bytes_s2c += ret
            continue
        if ret < 0 and _transient(errno):
            c.c_writable = False
            break
        _set_message_errno(c, errno)
        _finish(c, C_ERROR_WRITE_CLIENT)
        return -1
    return off


cdef int _client_flush(conn_t *c) noexcept nogil:
    """Send the pending tail (c.s2c from c.s2c_off): 1 on progress, 0 if none, -1 when finished."""
    cdef int sent = _to_client(c, c.s2c + c.s2c_off, c.s2c_len - c.s2c_off)
    if sent < 0:
        return -1
    c.s2c_off += sent
    if c.s2c_off == c.s2c_len:
        free(c.s2c)
        c.s2c = NULL
        c.s2c_len = c.s2c_off = 0
    return 1 if sent > 0 else 0


cdef int _client_write(conn_t *c, const char *buf, int n) noexcept nogil:
    """Send fresh bytes (no tail pending); keep what the client cannot take yet.

    Returns 1 on progress, 0 if nothing could be written, -1 when finished.
    """
    cdef int sent = _to_client(c, buf, n)
    if sent < 0:
        return -1
    if sent < n:
        c.s2c = <char *>malloc(n - sent)
        if c.s2c == NULL:
            strncpy(c.message, "out of memory", MESSAGE)
            _finish(c, C_ABORTED)
            return -1
        memcpy(c.s2c, buf + sent, n - sent)
        c.s2c_len = n - sent
        c.s2c_off = 0
    return 1 if sent > 0 else 0


# -- One connection's work ----------------------------------------------------

cdef int _pump_c2s(conn_t *c) noexcept nogil:
    """Client -> instance: 1 on progress, 0 if none, -1 when finished."""
    cdef ssize_t n
    cdef int ret, saved, off
    cdef char *buf
    cdef bint progress = False
    if c.cpend != NULL:
        # pending ciphertext first (backpressure), then new bytes
        if c.s_writable:
            return _send_pending(c)
        return 0
    if not c.client_eof and c.c_readable:
        buf = c.plane.scratch_in
        n = read(c.cfd, buf, SCRATCH)
        if n > 0:
            if n < SCRATCH and not c.c_hup and not c.c_urgent:
                # A short read emptied the socket; more data (or the FIN)
                # brings a new edge. A FIN seen already brings none: read on.
                c.c_readable = False
            if c.s_dead:
                return 1  # the instance has gone: nobody takes these bytes
            off = 0
            while off < n:  # the BIO takes everything, so this cannot block
                ERR_clear_error()
                ret = SSL_write(c.ssl, buf + off, <int>(n - off))
                if ret <= 0:
                    saved = errno
                    _instance_write_failed(c, SSL_get_error(c.ssl, ret), saved)
                    return 1
                off += ret
            c.bytes_c2s += n
            c.plane.bytes_c2s += n
            if _flush(c) < 0:
                return -1
            return 1
        if n == 0:
            c.client_eof = True
            if not c.server_eof:
                c.client_first = True
            progress = True
        elif _transient(errno):
            c.c_readable = False
        else:
            _set_message_errno(c, errno)
            _finish(c, C_ERROR_READ_CLIENT)
            return -1
    if c.client_eof and not c.close_notify_sent:
        # the client has finished and everything it sent is on its way
        c.close_notify_sent = True
        progress = True
        if not c.s_dead:
            ERR_clear_error()
            SSL_shutdown(c.ssl)  # one close_notify record, into the out buffer
            ERR_clear_error()
            c.shut_wr_pending = True  # after the last ciphertext has left
            if _flush(c) < 0:
                return -1
            if c.cpend == NULL and c.shut_wr_pending:
                c.shut_wr_pending = False
                _half_close_instance(c)
    return 1 if progress else 0


cdef int _pump_s2c(conn_t *c) noexcept nogil:
    """Instance -> client: 1 on progress, 0 if none, -1 when finished."""
    cdef int ret, err, saved, total
    cdef char *buf
    cdef bint progress = False
    if c.s2c != NULL:
        if c.c_writable:
            return _client_flush(c)
        return 0
    if c.server_eof or not (c.s_readable or SSL_has_pending(c.ssl)):
        return 0
    buf = c.plane.scratch_out
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
            # With SSL_OP_IGNORE_UNEXPECTED_EOF a bare FIN reads like
            # close_notify; only the latter sets the received-shutdown bit.
            if not (SSL_get_shutdown(c.ssl) & SSL_RECEIVED_SHUTDOWN):
                if not c.write_failed:
                    strncpy(c.message, "unexpected EOF", MESSAGE)
                c.eof_error = True
            ERR_clear_error()
            progress = True
        elif err != SSL_ERROR_WANT_READ:
            # The stream is broken here, but what was decrypted before the
            # failure is genuine and still goes out first (as Go's io.Copy
            # writes what Read returned before the error).
            if not c.write_failed:  # else that error came first
                _set_message_ssl(c, err, saved)
            c.server_eof = c.eof_error = True
            progress = True
        break
    if c.plane.out_len and _flush(c) < 0:  # e.g. a KeyUpdate reply
        return -1
    if total > 0:
        ret = _client_write(c, buf, total)
        if ret < 0:
            return -1
        progress = True
    return 1 if progress else 0


cdef bint _pump_once(conn_t *c) noexcept nogil:
    """One round in each direction; True if anything moved and the connection is open."""
    cdef int a, b, kind
    c.plane.out_len = 0  # nothing of another connection's may be flushed here
    if c.draining:
        return _drain_client(c) > 0
    a = _pump_c2s(c)
    if a < 0:
        return False
    b = _pump_s2c(c)
    if b < 0:
        return False
    # the instance has finished and the client has all its bytes
    if c.server_eof and c.s2c == NULL:
        if c.eof_error:
            kind = C_ERROR_WRITE_INSTANCE if c.write_failed else C_ERROR_READ_INSTANCE
        else:
            kind = C_CLIENT_CLOSED if c.client_first else C_INSTANCE_CLOSED
            c.message[0] = 0  # a clean end: a write error before it only ended our side
        # Over TCP, a RST would discard our unacknowledged bytes (the FIN
        # included): drain until the client has acknowledged them all. A
        # unix socket loses nothing (our bytes are in the client's queue
        # already), but a close on unread bytes makes the client read
        # ECONNRESET after them instead of EOF: drain only if it is sending
        # now, so an idle client is closed at once. A linger of 0 waits for
        # nothing.
        if (
            not c.client_eof
            and c.linger_ns > 0
            and (c.client_tcp or (_client_unacked(c) and _client_is_sending(c)))
        ):
            _start_draining(c, kind)
            return True
        _finish(c, kind)
        return False
    return a > 0 or b > 0


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


cdef void _queue_ready(conn_t *c, conn_t **ready) noexcept nogil:
    if not c.queued:
        c.queued = True
        c.ready_next = ready[0]
        ready[0] = c


cdef void _push_done(conn_t *done) noexcept nogil:
    cdef conn_t *c
    cdef unsigned long long one = 1
    if done == NULL:
        return
    pthread_mutex_lock(&_done.lock)
    while done != NULL:
        c = done
        done = c.done_next
        c.done_next = NULL
        if _done.tail != NULL:
            _done.tail.done_next = c
        else:
            _done.head = c
        _done.tail = c
    pthread_mutex_unlock(&_done.lock)
    write(_done.done_fd, &one, sizeof(one))


cdef bint _register(conn_t *c) noexcept nogil:
    """Watch both fds (on the thread, so no event can find a half-registered pair)."""
    cdef epoll_event ev
    ev.events = EPOLLIN | EPOLLOUT | EPOLLPRI | EPOLLRDHUP | EPOLLET
    ev.data.u64 = <unsigned long long>c | SIDE_CLIENT
    if epoll_ctl(c.plane.epfd, EPOLL_CTL_ADD, c.cfd, &ev) != 0:
        return False
    ev.data.u64 = <unsigned long long>c | SIDE_INSTANCE
    if epoll_ctl(c.plane.epfd, EPOLL_CTL_ADD, c.sfd, &ev) != 0:
        epoll_ctl(c.plane.epfd, EPOLL_CTL_DEL, c.cfd, NULL)
        return False
    c.registered = True
    return True


cdef int _wait_ms(plane_t *p, conn_t *again) noexcept nogil:
    cdef long long soonest, now, left
    cdef conn_t *c
    if again != NULL:
        return 0
    if p.lingering == NULL:
        return -1
    soonest = p.lingering.linger_deadline
    c = p.lingering.linger_next
    while c != NULL:
        if c.linger_deadline < soonest:
            soonest = c.linger_deadline
        c = c.linger_next
    now = _now_ns()
    if soonest <= now:
        return 0
    left = (soonest - now) // 1000000 + 1
    return MAX_WAIT_MS if left > MAX_WAIT_MS else <int>left


cdef void *_plane_main(void *arg) noexcept nogil:
    cdef plane_t *p = <plane_t *>arg
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i
    cdef unsigned int ev
    cdef unsigned long long tag, counter
    cdef conn_t *c
    cdef conn_t *ready
    cdef conn_t *again = NULL
    cdef conn_t *done
    cdef conn_t *starts
    cdef conn_t *aborts
    cdef conn_t *next_c
    cdef conn_t **link
    cdef long long now
    while True:
        n = epoll_wait(p.epfd, events, MAX_EVENTS, _wait_ms(p, again))
        if n < 0:
            n = 0  # EINTR
        ready = again
        again = NULL
        done = NULL
        for i in range(n):
            tag = events[i].data.u64
            ev = events[i].events
            if tag == SIDE_WAKE:
                read(p.wake_fd, &counter, sizeof(counter))
                continue
            c = <conn_t *>(tag & ~(<unsigned long long>3))
            if c.finished:
                continue
            if ev & (EPOLLERR | EPOLLHUP):
                # Let the next call on that fd report what happened.
                ev |= EPOLLIN | EPOLLOUT
            if tag & 3 == SIDE_CLIENT:
                if ev & (EPOLLIN | EPOLLRDHUP | EPOLLPRI):
                    c.c_readable = True
                if ev & EPOLLPRI:
                    c.c_urgent = True
                if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                    c.c_hup = True
                if ev & EPOLLOUT:
                    c.c_writable = True
            else:
                if ev & (EPOLLIN | EPOLLRDHUP | EPOLLPRI):
                    c.s_readable = True
                if ev & EPOLLPRI:
                    c.s_urgent = True
                if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                    c.s_hup = True
                if ev & EPOLLOUT:
                    c.s_writable = True
            _queue_ready(c, &ready)

        # Starts and aborts requested by Python since the last batch, taken
        # together: an abort never overtakes the start of its connection.
        pthread_mutex_lock(&p.lock)
        starts = p.starts
        p.starts = NULL
        aborts = p.aborts
        p.aborts = NULL
        pthread_mutex_unlock(&p.lock)
        while starts != NULL:
            c = starts
            starts = c.start_next
            c.start_next = NULL
            if _register(c):
                # Anything decrypted or buffered before start is found by the first pump.
                _queue_ready(c, &ready)
            else:
                _set_message_errno(c, errno)
                _finish(c, C_ABORTED)
                c.done_next = done
                done = c
        while aborts != NULL:
            c = aborts
            aborts = c.abort_next
            c.abort_next = NULL
            if not c.finished:
                _finish(c, C_ABORTED)
                c.done_next = done
                done = c
            pthread_mutex_lock(&p.lock)
            c.abort_pending = False
            if c.orphaned:
                free(c)  # already delivered; this was its last reference
            pthread_mutex_unlock(&p.lock)

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

        if p.lingering != NULL:
            now = _now_ns()
            c = p.lingering
            while c != NULL:
                next_c = c.linger_next
                if c.linger_deadline <= now and not c.finished:
                    if c.draining and now < c.drain_deadline and _client_unacked(c):
                        c.linger_deadline = now + DRAIN_POLL_MS * 1000000LL  # poll again
                    else:  # _finish takes it off the list
                        _finish(c, c.final_kind if c.draining else C_CLIENT_CLOSED)
                        c.done_next = done
                        done = c
                c = next_c
            # A connection finished here may still wait on 'again': take it
            # off before Python can free it.
            link = &again
            while link[0] != NULL:
                c = link[0]
                if c.finished:
                    link[0] = c.ready_next
                    c.ready_next = NULL
                    c.queued = False
                else:
                    link = &c.ready_next

        # Nothing on the thread refers to a finished connection past this point.
        _push_done(done)
    return NULL


cdef int _completions_init() except -1:
    if _done.done_fd >= 0:
        return 0
    pthread_mutex_init(&_done.lock, NULL)
    _done.done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    if _done.done_fd < 0:
        raise OSError(errno, "cannot create the data plane: " + _errno_text(errno))
    _done.pid = getpid()
    return 0


cdef int _plane_init(plane_t *p, int index) except -1:
    """Make one thread's epoll, wake-up eventfd and scratch buffers (not the thread)."""
    if p.made:
        return 0
    p.index = index
    pthread_mutex_init(&p.lock, NULL)
    if p.scratch_in == NULL:
        p.scratch_in = <char *>malloc(SCRATCH)
        p.scratch_out = <char *>malloc(SCRATCH)
    if p.scratch_in == NULL or p.scratch_out == NULL:
        raise MemoryError()
    cdef int err = 0
    cdef int wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    cdef int epfd = epoll_create1(EPOLL_CLOEXEC) if wake_fd >= 0 else -1
    cdef epoll_event ev
    ev.events = EPOLLIN
    ev.data.u64 = SIDE_WAKE
    if epfd < 0 or epoll_ctl(epfd, EPOLL_CTL_ADD, wake_fd, &ev) < 0:
        err = errno
        # Nothing half-made stays open: the next start tries again (EMFILE passes).
        if wake_fd >= 0:
            close(wake_fd)
        if epfd >= 0:
            close(epfd)
        raise OSError(err, "cannot create the data plane: " + _errno_text(err))
    p.wake_fd = wake_fd
    p.epfd = epfd
    p.pid = getpid()
    p.made = True
    return 0


cdef void _plane_forget_parent() noexcept:
    """In a forked child: drop the parent's data plane and start afresh on first use.

    The threads were not copied, their connections are the parent's (their
    conn_t copies are left alone, never freed here), and the locks may have
    been held at the fork. The epoll and eventfd copies would share state
    with the parent, so they are closed.
    """
    global _drain_loop
    cdef int i
    cdef plane_t *p
    for i in range(MAX_PLANES):
        p = &_planes[i]
        if p.made:
            close(p.epfd)
            close(p.wake_fd)
        p.epfd = p.wake_fd = -1
        p.made = p.running = False
        pthread_mutex_init(&p.lock, NULL)  # the parent's thread may have held it
        p.starts = p.aborts = NULL
        p.lingering = NULL
        p.out_len = 0
        p.active = 0
    if _done.done_fd >= 0:
        close(_done.done_fd)
    _done.done_fd = -1
    _done.head = _done.tail = NULL
    _drain_loop = None


def _after_fork_in_child():
    _plane_forget_parent()


def default_threads():
    """One thread per CPU this process may run on, at most DEFAULT_THREADS_CAP."""
    return max(1, min(len(_os.sched_getaffinity(0)), DEFAULT_THREADS_CAP))


def set_threads(int count):
    """Spread new connections over ``count`` data-plane threads (1..MAX_THREADS).

    Threads start on their first connection and then stay; lowering the
    count only stops new connections from going to the threads above it.
    """
    global _plane_count
    cdef int i
    if not 1 <= count <= MAX_PLANES:
        raise ValueError(f"data-plane threads must be between 1 and {MAX_PLANES}, not {count}")
    _completions_init()
    for i in range(count):
        _plane_init(&_planes[i], i)
    _plane_count = count


def threads():
    """How many data-plane threads new connections are spread over."""
    return _plane_count


cdef plane_t *_least_loaded(bint running_only):
    """The thread with the fewest connections (of the running ones only, if asked;
    NULL when none runs)."""
    cdef plane_t *best = NULL
    cdef int i
    for i in range(_plane_count):
        if running_only and not _planes[i].running:
            continue
        if best == NULL or _planes[i].active < best.active:
            best = &_planes[i]
    return best


cdef int _plane_start(plane_t *p) except -1:
    cdef pthread_t thread
    cdef sigset_t all_signals, old
    cdef int err
    cdef bytes name
    if p.running:
        return 0
    # Signals belong to Python's main thread: the new thread starts with all
    # of them blocked (set around pthread_create, so none slips in first).
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, &old)
    err = pthread_create(&thread, NULL, _plane_main, p)
    pthread_sigmask(SIG_SETMASK, &old, NULL)
    if err != 0:
        raise OSError(err, "cannot start the data plane thread: " + _errno_text(err))
    # Named for top -H, perf and /proc/PID/task/*/comm (15 bytes at most).
    name = f"dataplane-{p.index}".encode()
    pthread_setname_np(thread, name)
    pthread_detach(thread)
    p.running = True
    return 0


cdef plane_t *_plane_for_new_connection() except NULL:
    """The least-loaded thread, started if need be (after a fork: afresh)."""
    if _done.done_fd >= 0 and _done.pid != getpid():
        _plane_forget_parent()  # forked without os.fork (no at-fork hook ran)
    set_threads(_plane_count)   # makes what a fork closed
    cdef plane_t *p = _least_loaded(False)
    cdef plane_t *running
    try:
        _plane_start(p)
    except OSError:
        # No new thread now (e.g. a thread limit): the least-loaded running one
        # takes the connection, if there is one; the next start tries again.
        running = _least_loaded(True)
        if running == NULL:
            raise
        p = running
    return p


def stats():
    """Process-wide counters, read at scrape time (no per-chunk Python work)."""
    cdef unsigned long long c2s = 0, s2c = 0
    cdef int i
    for i in range(MAX_PLANES):
        c2s += _planes[i].bytes_c2s
        s2c += _planes[i].bytes_s2c
    return {
        "active": _active,
        "total": _total,
        "bytes_client_to_server": c2s,
        "bytes_server_to_client": s2c,
    }


def thread_loads():
    """Connections on each data-plane thread made so far, also those above a
    lowered count (for tests and the debug page)."""
    return [_planes[i].active for i in range(MAX_PLANES) if _planes[i].made]


import os as _os
# Created at import, for the default count: one eventfd for completions and
# an epoll and an eventfd per thread, so fd accounting is stable.
set_threads(default_threads())
_os.register_at_fork(after_in_child=_after_fork_in_child)


def _drain_completions():
    """Loop reader on done_fd: deliver every finished connection to its Splice."""
    cdef unsigned long long counter
    cdef unsigned long long one = 1
    cdef conn_t *c
    cdef conn_t *head
    cdef conn_t *tail
    read(_done.done_fd, &counter, sizeof(counter))
    pthread_mutex_lock(&_done.lock)
    head = _done.head
    _done.head = _done.tail = NULL
    pthread_mutex_unlock(&_done.lock)
    while head != NULL:
        c = head
        head = c.done_next
        splice = <Splice><PyObject *>c.owner
        c.owner = NULL
        Py_DECREF(splice)  # the reference taken in start(); `splice` holds one
        try:
            splice._deliver()
        except BaseException:
            # Only KeyboardInterrupt and the like get here (on_done's own
            # exceptions go to the loop's handler): the rest of the batch
            # goes back to the front of the queue for the next call.
            if head != NULL:
                tail = head
                while tail.done_next != NULL:
                    tail = tail.done_next
                pthread_mutex_lock(&_done.lock)
                tail.done_next = _done.head
                _done.head = head
                if _done.tail == NULL:
                    _done.tail = tail
                pthread_mutex_unlock(&_done.lock)
                write(_done.done_fd, &one, sizeof(one))
            raise


cdef void _watch_completions(loop) except *:
    """Make `loop` the one that receives completions (tests run many loops in turn)."""
    global _drain_loop
    if _drain_loop is loop:
        return
    old = _drain_loop
    if old is not None and not old.is_closed() and not old.is_running():
        old.remove_reader(_done.done_fd)
    loop.add_reader(_done.done_fd, _drain_completions)
    _drain_loop = loop


cdef void _wake_plane(plane_t *p) noexcept nogil:
    cdef unsigned long long one = 1
    write(p.wake_fd, &one, sizeof(one))


cdef class Splice:
    """Moves bytes between a client fd and an established TLSConnection.

    The connection is handed to the data-plane thread by ``start``; from then
    on Python sees it again exactly once, when ``on_done(kind, message)`` runs
    on the loop after both fds are closed.

    End of stream: when the client stops sending, its last bytes are
    written, then close_notify and a TCP half-close go to the instance, and
    the instance's remaining bytes still reach the client for up to
    ``linger`` seconds (0: not at all; at most MAX_LINGER). When the instance
    stops, its last bytes are flushed to the client and both sides are
    closed (ERROR_READ_INSTANCE "unexpected EOF" if it stopped without
    close_notify). Any error closes both at once.
    """

    def __cinit__(self, int client_fd, TLSConnection conn not None, on_done, double linger=30.0):
        cdef int one = 1
        self.c = NULL
        if conn.closed:
            close(client_fd)
            raise ValueError("TLS connection is closed")
        if not (0.0 <= linger <= MAX_LINGER):  # NaN fails both
            close(client_fd)
            conn._close()
            raise ValueError(f"linger must be between 0 and {MAX_LINGER:g} seconds, not {linger!r}")
        self.c = <conn_t *>calloc(1, sizeof(conn_t))
        if self.c == NULL:
            close(client_fd)
            conn._close()
            raise MemoryError()
        _set_nonblocking(client_fd)
        # The connection's fd and SSL* move here; the TLSConnection is spent.
        # From now on __dealloc__ closes them if the splice never starts.
        self.c.cfd = client_fd
        self.c.sfd = conn.fd
        self.c.ssl = conn.ssl
        conn.ssl = NULL
        conn.closed = True
        self.c.linger_ns = <long long>(linger * 1e9)
        _attach_bio(self.c.ssl, self.c)
        # Urgent data stays in the stream (and recv() stops short at its mark:
        # see c_urgent), rather than being dropped from it.
        setsockopt(self.c.cfd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof(one))
        setsockopt(self.c.sfd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof(one))
        cdef int domain = 0
        cdef unsigned int size = sizeof(domain)
        getsockopt(self.c.cfd, SOL_SOCKET, SO_DOMAIN, &domain, &size)
        self.c.client_tcp = domain == AF_INET or domain == AF_INET6
        # Anything decrypted or buffered before start is found by the first pump.
        self.c.c_readable = self.c.c_writable = True
        self.c.s_readable = self.c.s_writable = True
        self.on_done = on_done

    def start(self, loop):
        """Hand the connection to the data-plane thread; on_done runs on ``loop``."""
        global _active, _total
        if self.started:
            raise RuntimeError("splice already started")
        cdef plane_t *p = _plane_for_new_connection()
        _watch_completions(loop)
        self.started = True
        self.loop = loop
        self.pid = getpid()
        _active += 1
        _total += 1
        Py_INCREF(self)  # the thread's reference, given back in _drain_completions
        self.c.owner = <void *>self
        self.c.plane = p
        p.active += 1
        pthread_mutex_lock(&p.lock)
        self.c.start_next = p.starts
        p.starts = self.c
        pthread_mutex_unlock(&p.lock)
        _wake_plane(p)

    def abort(self):
        """Tear down soon; on_done still runs once, on the loop, with ABORTED."""
        if not self.started or self.delivered or self.pid != getpid():
            return  # (in a forked child the connection is the parent's)
        cdef plane_t *p = self.c.plane
        pthread_mutex_lock(&p.lock)
        if not self.c.abort_pending:
            self.c.abort_pending = True
            self.c.abort_next = p.aborts
            p.aborts = self.c
        pthread_mutex_unlock(&p.lock)
        _wake_plane(p)

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
        self.c.plane.active -= 1
        self.final_c2s = self.c.bytes_c2s
        self.final_s2c = self.c.bytes_s2c
        self._release()
        on_done, self.on_done = self.on_done, None
        if on_done is None:
            return
        try:
            on_done(kind, message)
        except Exception as exc:
            self.loop.call_exception_handler({
                "message": "exception in splice on_done callback",
                "exception": exc,
            })

    cdef void _release(self) noexcept:
        """Free the struct, or leave that to the thread if an abort is in flight."""
        cdef conn_t *c = self.c
        if c == NULL or self.pid != getpid():
            return
        self.c = NULL
        cdef plane_t *p = c.plane
        pthread_mutex_lock(&p.lock)
        if c.abort_pending:
            c.orphaned = True
            c = NULL
        pthread_mutex_unlock(&p.lock)
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
