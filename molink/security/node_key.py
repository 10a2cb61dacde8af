"""A node's own identity: an RSA key that signs its DHT announcements and proves who answers.

The swarm key says "a member of this swarm"; the node key says "this particular node". Its
public half travels in the node's announcement (and, as hivemind's owner marker, in the DHT
subkey the announcement is stored under, so only this key can change that entry). A head that
dials an announced address asks the process there to sign a fresh nonce with the announced key
(:func:`verify_proof`), so traffic never goes to an address that some other process took over.

``--node-key-file`` keeps the identity across restarts (needed for an allowlist of nodes);
without it a node makes a new key at every start.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from molink.security.node_ids import node_id

_PROOF_CONTEXT = b"molink-node-proof\0"
#: Longest public key accepted from a peer (an OpenSSH RSA-4096 key is ~740 bytes).
MAX_PUBLIC_KEY_CHARS = 1024


class NodeKeyError(ValueError):
    """A node key file is missing, malformed or readable by others."""


class NodeKey:
    """A node's private signing key (hivemind's RSA key, so the DHT validator can use it)."""

    def __init__(self, private_key: RSAPrivateKey) -> None:
        self.private_key = private_key
        self.public_key: str = private_key.get_public_key().to_bytes().decode()

    @property
    def node_id(self) -> str:
        return node_id(self.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(RSAPrivateKey())

    @classmethod
    def load_or_create(cls, path: str | Path) -> NodeKey:
        """The key in ``path``; a new one is written there (mode 0600) if the file is absent."""
        path = Path(path)
        if not path.exists():
            key = cls.generate()
            pem = key.private_key._private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            return key
        if path.stat().st_mode & 0o077:
            raise NodeKeyError(f"node key file {path} is accessible by other users; chmod 600 it")
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise NodeKeyError(f"can't read node key {path}: {e}") from None
        der = loaded.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)
        try:
            private_key.__setstate__({"_private_key": der})  # hivemind's own restore path
        except (ValueError, TypeError) as e:
            raise NodeKeyError(f"{path} is not an RSA private key: {e}") from None
        return cls(private_key)

    def prove(self, nonce: bytes) -> bytes:
        """A signature of ``nonce`` that :func:`verify_proof` checks against the public key."""
        return self.private_key.sign(_PROOF_CONTEXT + nonce)


def verify_proof(public_key: str, nonce: bytes, proof: bytes) -> bool:
    """Whether ``proof`` is the holder of ``public_key`` signing ``nonce``."""
    if not public_key or len(public_key) > MAX_PUBLIC_KEY_CHARS or len(proof) > 4096:
        return False
    try:
        key = RSAPublicKey.from_bytes(public_key.encode())
    except (ValueError, TypeError):
        return False
    return key.verify(_PROOF_CONTEXT + nonce, proof)
