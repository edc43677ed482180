"""The process key: RSA-2048, PKCS#8 private PEM and PKCS#1 public PEM (what the
Admin API is sent), from the native core and from the cryptography package alike."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy import dataplane
from proxy.keys import KeyPair


@pytest.fixture(params=["native", "portable"])
def plane_name(request, monkeypatch):
    if request.param == "native" and dataplane.NAME != "native":
        pytest.skip("the native core is not installed")
    monkeypatch.setattr(dataplane, "NAME", request.param)
    return request.param


def test_a_key_pair_is_rsa_2048_and_its_halves_match(plane_name):
    pair = KeyPair.generate()
    assert pair.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    assert pair.public_pem.startswith("-----BEGIN RSA PUBLIC KEY-----\n")  # PKCS#1
    private = serialization.load_pem_private_key(pair.private_pem, None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert private.public_key().public_numbers().e == 65537
    public = serialization.load_pem_public_key(pair.public_pem.encode())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert KeyPair.generate().private_pem != pair.private_pem


@pytest.mark.skipif(dataplane.NAME != "native", reason="the native core is not installed")
def test_a_plain_start_does_not_import_cryptography():
    """The CLI's start-up imports (up to the supervisor) and the key need no cryptography."""
    code = (
        "import sys; import proxy.cli, proxy.eventloop, proxy.supervisor;"
        "from proxy.keys import generate_in_background;"
        "generate_in_background().result();"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'requests')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
