# C declarations: libc, Linux and OpenSSL, everything the core calls.
# (Included first by _splice.pyx; no code here.)

from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport strerror
from libc.errno cimport errno, EAGAIN, EINTR

cdef extern from "errno.h":
    enum: EWOULDBLOCK


cdef extern from "unistd.h" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int close(int fd)

cdef extern from "fcntl.h" nogil:
    int fcntl(int fd, int cmd, ...)
    enum: F_GETFL, F_SETFL, O_NONBLOCK


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
    enum: EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL
    enum: EPOLLIN, EPOLLOUT, EPOLLPRI, EPOLLRDHUP, EPOLLERR, EPOLLHUP
    unsigned int EPOLLET

cdef extern from "sys/eventfd.h" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_CLOEXEC, EFD_NONBLOCK

cdef extern from "pthread.h" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *thread, void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_detach(pthread_t thread)
    int pthread_setname_np(pthread_t thread, const char *name)
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "signal.h" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t *s)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)
    enum: SIG_BLOCK, SIG_SETMASK

cdef extern from "time.h" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum: CLOCK_MONOTONIC

cdef extern from "sys/socket.h" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void *val, unsigned int len)
    int getsockopt(int fd, int level, int name, void *val, unsigned int *len)
    enum: MSG_NOSIGNAL, MSG_DONTWAIT, SOL_SOCKET, SO_OOBINLINE, SO_DOMAIN, AF_INET, AF_INET6

cdef extern from "unistd.h" nogil:
    int getpid()

cdef extern from "sys/ioctl.h" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "linux/sockios.h" nogil:
    enum: SIOCOUTQ

cdef extern from "string.h" nogil:
    void *memcpy(void *dst, const void *src, size_t n)
    char *strncpy(char *dst, const char *src, size_t n)

cdef extern from "openssl/ssl.h" nogil:
    int SSL_has_pending(const SSL *s)
    int SSL_get_shutdown(const SSL *s)
    enum: SSL_RECEIVED_SHUTDOWN


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
