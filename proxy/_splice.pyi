"""Type stubs for the Cython core (proxy/_splice.pyx)."""

from asyncio import AbstractEventLoop
from collections.abc import Callable

CLIENT_CLOSED: int
INSTANCE_CLOSED: int
ERROR_READ_CLIENT: int
ERROR_WRITE_INSTANCE: int
ERROR_READ_INSTANCE: int
ERROR_WRITE_CLIENT: int
ABORTED: int
WANT_READ: int
WANT_WRITE: int

class TLSError(Exception): ...

def stats() -> dict[str, int]: ...

class TLSClientContext:
    def __init__(self, cert_chain_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None: ...

class TLSConnection:
    context: TLSClientContext
    server_name: str
    def __init__(self, context: TLSClientContext, fd: int, server_name: str) -> None: ...
    def fileno(self) -> int: ...
    def do_handshake(self) -> int: ...
    def write(self, data: bytes) -> int: ...
    def read(self, n: int) -> bytes | int: ...
    def close(self) -> None: ...
    @property
    def version(self) -> str: ...
    @property
    def cipher(self) -> str: ...
    @property
    def peer_certificate_der(self) -> bytes: ...

class Splice:
    bytes_client_to_server: int
    bytes_server_to_client: int
    def __init__(
        self,
        client_fd: int,
        conn: TLSConnection,
        on_done: Callable[[int, str], None],
        linger: float = ...,
    ) -> None: ...
    def start(self, loop: AbstractEventLoop) -> None: ...
    def abort(self) -> None: ...
