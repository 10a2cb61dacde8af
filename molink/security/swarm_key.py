"""The swarm key: one random secret shared by every node of a swarm.

``molink keygen PATH`` writes a new one. Nodes never use it directly: each use gets its own
key derived with HKDF-SHA256 under a fixed label, so a leak of one derived key (say, the DHT
token key) does not give the others away. Only :attr:`SwarmKey.fingerprint` may be logged.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Bytes of entropy in a new swarm key.
SWARM_KEY_BYTES = 32
_HEADER = "molink-swarm-key-v1"


class SwarmKeyError(ValueError):
    """A swarm key file is missing, malformed or readable by others."""


@dataclass(frozen=True)
class SwarmKey:
    """A swarm's shared secret (never printed: ``repr`` shows only the fingerprint)."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < SWARM_KEY_BYTES:
            raise SwarmKeyError(f"a swarm key needs at least {SWARM_KEY_BYTES} bytes of secret")

    @property
    def fingerprint(self) -> str:
        """A short public id of this key (safe to log; tells keys apart)."""
        return hashlib.sha256(b"molink-swarm-key-id" + self.secret).hexdigest()[:16]

    def derive(self, label: str, length: int = 32) -> bytes:
        """A key for one use (``label``), independent of the keys derived for other labels."""
        return HKDF(
            algorithm=hashes.SHA256(), length=length, salt=None, info=label.encode()
        ).derive(self.secret)

    def __repr__(self) -> str:
        return f"SwarmKey(fingerprint={self.fingerprint})"


def generate_swarm_key(path: str | Path) -> SwarmKey:
    """Write a new random swarm key to ``path`` (mode 0600; refuses to overwrite a file)."""
    key = SwarmKey(secrets.token_bytes(SWARM_KEY_BYTES))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{_HEADER}\n{key.secret.hex()}\n")
    return key


def load_swarm_key(path: str | Path) -> SwarmKey:
    """Read a swarm key written by :func:`generate_swarm_key`.

    Refuses a file that other users may read or write (like ssh does with private keys).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as e:
        raise SwarmKeyError(f"can't read swarm key file {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SwarmKeyError(
            f"swarm key file {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    lines = text.split()
    if len(lines) != 2 or lines[0] != _HEADER:
        raise SwarmKeyError(
            f"{path} is not a MoLink swarm key (make one with `molink keygen PATH`)"
        )
    try:
        secret = bytes.fromhex(lines[1])
    except ValueError:
        raise SwarmKeyError(f"{path}: the key is not hexadecimal") from None
    return SwarmKey(secret)
