"""A throwaway PKI and a threaded TLS 1.3 server (Python ssl) as the instance side."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable

import pytest

from proxy.dataplane import plane as _splice
from proxy.emulator.pki import ClusterCA, key_pem, new_key, pem


@pytest.fixture(scope="session")
def pki():
    ca = ClusterCA("projects/p/locations/r/clusters/c")
    server_cert, server_key = ca.server_certificate(["127.0.0.1"], ["db.example.test"], "uid")
    client_key = new_key()
    leaf = ca.client_certificate(client_key.public_key(), __import__("datetime").timedelta(hours=1))
    other = ClusterCA("projects/p/locations/r/clusters/other")
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, data in {
            "server.pem": pem(server_cert).encode() + ca.root_pem.encode(),
            "server.key": key_pem(server_key),
            "root.pem": ca.root_pem.encode(),
        }.items():
            path = os.path.join(tmp, name)
            with open(path, "wb") as fh:
                fh.write(data)
            files[name] = path
        yield {
            "ca": ca,
            "other": other,
            "files": files,
            "chain": "".join(ca.chain_pems(leaf)).encode(),
            "key": key_pem(client_key),
        }


def server_context(pki, *, tls12_only: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(pki["files"]["server.pem"], pki["files"]["server.key"])
    ctx.load_verify_locations(pki["files"]["root.pem"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TLSServer:
    """Accepts TLS connections on 127.0.0.1 and runs handler(ssl_socket) in a thread each."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        handler: Callable[[ssl.SSLSocket], None],
        *,
        strict: bool = False,
    ):
        self.ctx = ctx
        self.handler = handler
        # Strict: a ragged EOF (a FIN without close_notify) is an error, and the
        # fixture fails the test if the server saw any error at all.
        self.strict = strict
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.errors: list[BaseException] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        try:
            with self.ctx.wrap_socket(
                raw, server_side=True, suppress_ragged_eofs=not self.strict
            ) as tls:
                self.handler(tls)
                close_notify(tls)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)

    def close(self):
        self._stop = True
        self.sock.close()


def close_notify(tls: ssl.SSLSocket) -> None:
    """End the stream as a TLS server should: close_notify before the TCP FIN.

    Non-blocking, so that it does not wait for the peer's close_notify.
    (A handler that returns after a reset has nothing left to send.)
    """
    try:
        tls.setblocking(False)
        tls.unwrap()
    except (ssl.SSLError, OSError, ValueError):
        pass


def echo(tls: ssl.SSLSocket) -> None:
    while data := tls.recv(65536):
        tls.sendall(data)


@pytest.fixture
def tls_server(pki):
    servers = []

    def start(handler=echo, strict=False, **kwargs):
        server = TLSServer(server_context(pki, **kwargs), handler, strict=strict)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
    for server in servers:
        if server.strict:
            assert server.errors == [], f"the TLS test server saw errors: {server.errors!r}"


@pytest.fixture(params=[1, 4], ids=["1-thread", "4-threads"])
def plane_threads(request):
    """Run the test with this many data-plane threads (the portable plane ignores it)."""
    before = _splice.threads()
    _splice.set_threads(request.param)
    yield request.param
    _splice.set_threads(before)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request):
    return request.param


@pytest.fixture
def run(loop_kind):
    """Run a coroutine function on the chosen event loop."""

    def runner(coro_fn, *args):
        if loop_kind == "uvloop":
            import uvloop

            return uvloop.run(coro_fn(*args))
        return asyncio.run(coro_fn(*args))

    # uvloop keeps two process-wide fds after its first loop; open them now
    # so the fd-leak checks in the tests compare like with like.
    runner(asyncio.sleep, 0)
    return runner


@pytest.fixture
def client_context(pki):
    return _splice.TLSClientContext(pki["chain"], pki["key"], pki["ca"].root_pem.encode())
