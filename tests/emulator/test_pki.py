"""The per-cluster CA, without any server."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.emulator.emulator import foreign_ca

from .clients import client_key, public_pem


@pytest.mark.parametrize(
    "fmt", [serialization.PublicFormat.PKCS1, serialization.PublicFormat.SubjectPublicKeyInfo]
)
def test_sign_public_key_pem(fmt):
    ca = foreign_ca()
    chain = ca.sign_public_key_pem(public_pem(fmt), dt.timedelta(seconds=600))
    assert len(chain) == 3 and all(p.endswith("-----END CERTIFICATE-----\n") for p in chain)
    leaf, intermediate, root = (x509.load_pem_x509_certificate(p.encode()) for p in chain)
    assert leaf.public_key().public_numbers() == client_key().public_key().public_numbers()
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    remaining = leaf.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert 590 <= remaining.total_seconds() <= 600
    assert leaf.signature_hash_algorithm.name == "sha256"
    assert leaf.public_key().key_size == root.public_key().key_size == 2048


def test_server_certificate_dns_san_has_no_trailing_dot():
    ca = foreign_ca()
    cert, _ = ca.server_certificate(["127.0.0.9"], ["abc.p.r.alloydb.goog."], "uid")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["abc.p.r.alloydb.goog"]


def test_rejects_non_rsa_and_garbage():
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    for bad in (ec_pem, "not a key"):
        with pytest.raises(ValueError):
            foreign_ca().sign_public_key_pem(bad, dt.timedelta(hours=1))
