"""Mutual TLS for gRPC, from a certificate every swarm-key holder derives the same way.

The swarm key yields (HKDF) a P-256 private key and, from it, a self-signed certificate with fixed
fields and a deterministic ECDSA signature: byte-identical on every node, so it serves as the
node's certificate *and* the only trusted root. A server demands a client certificate; a peer
without the key fails the handshake (``UNAVAILABLE``) before any method runs.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from molink.security.swarm_key import SwarmKey

#: The name in the swarm certificate; clients check it instead of the host they dial.
TLS_NAME = "molink-swarm"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass(frozen=True)
class TlsIdentity:
    """PEM private key and certificate derived from a swarm key."""

    key_pem: bytes
    cert_pem: bytes

    @classmethod
    def derive(cls, swarm_key: SwarmKey) -> TlsIdentity:
        seed = int.from_bytes(swarm_key.derive("molink/grpc-tls-key", 48), "big")
        private_key = ec.derive_private_key(seed % (_P256_ORDER - 1) + 1, ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
        valid_from = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(int.from_bytes(swarm_key.derive("molink/grpc-tls-serial", 16)) >> 1)
            .not_valid_before(valid_from)
            .not_valid_after(valid_from + datetime.timedelta(days=365 * 100))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(private_key, hashes.SHA256(), ecdsa_deterministic=True)
        )
        key_pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(key_pem=key_pem, cert_pem=cert.public_bytes(serialization.Encoding.PEM))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side: present the swarm certificate and require it from every client."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.cert_pem,
            require_client_auth=True,
        )

    def secure_channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        """Client side: a channel that trusts only the swarm certificate and presents it."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.cert_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )
        return grpc.secure_channel(
            address, credentials, options=[*options, ("grpc.ssl_target_name_override", TLS_NAME)]
        )
