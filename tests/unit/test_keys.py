"""The process key: RSA-2048, PKCS#8 private PEM and PKCS#1 public PEM (what the
Admin API is sent), made off the main thread's start-up path."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy import dataplane
from proxy.keys import KeyPair


def test_a_key_pair_is_rsa_2048_and_its_halves_match():
    pair = KeyPair.generate()
    assert pair.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    assert pair.public_pem.startswith("-----BEGIN RSA PUBLIC KEY-----\n")  # PKCS#1
    private = serialization.load_pem_private_key(pair.private_pem, None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert private.public_key().public_numbers().e == 65537
    public = serialization.load_pem_public_key(pair.public_pem.encode())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert KeyPair.generate().private_pem != pair.private_pem


@pytest.mark.skipif(dataplane.NAME != "native", reason="the portable plane uses cryptography")
def test_the_start_up_path_imports_neither_cryptography_nor_requests():
    """The CLI's imports up to the supervisor leave cryptography to the key's
    thread and requests to the first Admin API call (native plane)."""
    code = (
        "import sys; import proxy.cli, proxy.eventloop, proxy.supervisor, proxy.keys;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'requests')))"
    )
    env = {**os.environ, "ALLOYDB_AUTH_PROXY_DATA_PLANE": "native"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"


def test_the_key_is_made_on_its_own_thread(monkeypatch):
    from proxy import keys

    made_on: list[str] = []
    original = KeyPair.generate.__func__

    def generate(cls):
        made_on.append(threading.current_thread().name)
        return original(cls)

    monkeypatch.setattr(KeyPair, "generate", classmethod(generate))
    pair = keys.generate_in_background().result(timeout=30)
    assert pair.public_pem.startswith("-----BEGIN RSA PUBLIC KEY-----\n")
    assert len(made_on) == 1 and made_on[0].startswith("rsa-keygen")
