# -- The instance socket's BIO ------------------------------------------------
# After the handshake, the SSL* talks to the instance through this BIO instead
# of OpenSSL's socket BIO, for two reasons:
#  * writes are gathered: every record one SSL_write (or SSL_shutdown, or a
#    KeyUpdate reply inside SSL_read) produces lands in the thread's out
#    buffer and leaves in one send() (_flush);
#  * reads know when the socket is drained: a short recv() clears
#    s_readable, so OpenSSL's next read returns "retry" without a syscall.
#    (Not after urgent data: recv() stops short at the urgent mark.)

# (Included by _splice.pyx, after _decls.pxi; conn_t is in _splice.pxd.)

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
        if n < size and not c.s_hup and not c.s_urgent:
            c.s_readable = False  # drained; more data (or the FIN) is a new edge
        return <int>n
    if n < 0 and _transient(errno):
        c.s_readable = False
        BIO_set_retry_read(b)
    return <int>n  # 0 is EOF; -1 with errno is SSL_ERROR_SYSCALL


cdef int _bio_write(BIO *b, const char *data, int size) noexcept nogil:
    # Always accepted: the caller flushes after each SSL_* call, and keeps
    # what the socket refuses as the connection's pending ciphertext.
    cdef plane_t *p = (<conn_t *>BIO_get_data(b)).plane
    cdef size_t need = p.out_len + size
    cdef char *grown
    if need > p.out_cap:
        grown = <char *>realloc(p.out, need)
        if grown == NULL:
            return -1
        p.out = grown
        p.out_cap = need
    memcpy(p.out + p.out_len, data, size)
    p.out_len += size
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
