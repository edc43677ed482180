# TLS 1.3 client contexts and connections, used from Python for the handshake
# and the metadata exchange. (Included by _splice.pyx.)

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


from proxy.servername import server_name_problem as _server_name_problem


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
