"""The process's one RSA-2048 key, for every client certificate it asks for.

Generating it takes 30-130 ms here, and OpenSSL does it without the GIL, so
the CLI starts it on a thread before importing the rest of the proxy: by the
time the listeners are open it is usually done, and start-up does not wait.
The cryptography package (about 20 ms to import) is imported on that thread
too, not on the main thread's path to the ready line (on the native plane;
the portable one imports it anyway). (Making the key with
the native core's OpenSSL instead was measured and dropped: Debian 12's
OpenSSL 3.0 took 140 ms per key, median of 20, against 37 ms for the
OpenSSL that cryptography ships.)
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes  # PKCS#8, kept in memory only
    public_pem: str  # PKCS#1 "RSA PUBLIC KEY", as the Go connector sends

    @classmethod
    def generate(cls) -> KeyPair:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        )
        return cls(private, public.decode("ascii"))


def generate_in_background() -> concurrent.futures.Future[KeyPair]:
    """Start generating on a one-job thread; await the result with asyncio.wrap_future."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rsa-keygen")
    future = pool.submit(KeyPair.generate)
    pool.shutdown(wait=False)  # the thread ends after this one job
    return future
