"""Per-cluster certificate authority of the emulator.

Shape, as the connectors expect it: a self-signed cluster root (returned as
``caCert``) signs each instance's server certificate and an intermediate
"client CA", and the intermediate signs the ephemeral client certificates.
Server certificates carry an IP SAN per address and the PSC DNS name without
its trailing dot (the only form both Go and OpenSSL match).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_SKEW = dt.timedelta(minutes=5)


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AlloyDB emulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, key_encipherment: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    """digitalSignature always; keyEncipherment for servers; certSign/crlSign for CAs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_cert(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: rsa.RSAPrivateKey,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def load_public_key(text: str) -> rsa.RSAPublicKey:
    """Accept PKCS#1 (``RSA PUBLIC KEY``, Go) and SPKI (``PUBLIC KEY``, Python)."""
    data = text.encode("ascii")
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("public key must be RSA")
    return key


@dataclass
class ClusterCA:
    name: str  # projects/P/locations/R/clusters/C
    root_key: rsa.RSAPrivateKey = field(default_factory=new_key)
    client_ca_key: rsa.RSAPrivateKey = field(default_factory=new_key)

    def __post_init__(self) -> None:
        # CNs are limited to 64 characters; a digest keeps each cluster's root distinct.
        digest = hashlib.sha256(self.name.encode()).hexdigest()[:16]
        self.root = _ca_cert(f"alloydb-root-{digest}", self.root_key, None, self.root_key)
        self.client_ca = _ca_cert("client.alloydb", self.client_ca_key, self.root, self.root_key)

    @property
    def root_pem(self) -> str:
        return pem(self.root)

    def server_certificate(
        self,
        ips: list[str],
        dns_names: list[str],
        uid: str,
        *,
        key: rsa.RSAPrivateKey | None = None,
        signer: ClusterCA | None = None,
        not_after: dt.datetime | None = None,
    ) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        """A server certificate; ``signer`` lets a fault sign it with another CA,
        ``not_after`` (in the past) lets a test present an expired one."""
        key = key or new_key()
        signer = signer or self
        now = dt.datetime.now(dt.timezone.utc)
        if not_after is None:
            not_after = now + dt.timedelta(days=365)
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        sans += [x509.DNSName(name.rstrip(".")) for name in dns_names]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{uid}.server.alloydb"))
            .issuer_name(signer.root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(min(now, not_after) - _SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(key_encipherment=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(signer.root_key, hashes.SHA256())
        )
        return cert, key

    def client_certificate(
        self, public_key: rsa.RSAPublicKey, lifetime: dt.timedelta
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(_name("alloydb-client"))
            .issuer_name(self.client_ca.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.client_ca_key, hashes.SHA256())
        )

    def sign_public_key_pem(self, public_key_pem: str, lifetime: dt.timedelta) -> list[str]:
        """``pemCertificateChain`` for a PKCS#1 or SPKI public key PEM."""
        return self.chain_pems(self.client_certificate(load_public_key(public_key_pem), lifetime))

    def chain_pems(self, leaf: x509.Certificate) -> list[str]:
        """``pemCertificateChain``: leaf, intermediate, root; each ends with a newline."""
        return [pem(leaf), pem(self.client_ca), pem(self.root)]
