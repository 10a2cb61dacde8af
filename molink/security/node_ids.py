"""A node's short public id, derived from its public key (no hivemind import: cheap to import)."""

from __future__ import annotations

import hashlib
import re

_NODE_ID_RE = re.compile(r"[0-9a-f]{32}")


def node_id(public_key: str) -> str:
    """A node's short public id: the first 32 hex digits of SHA-256 of its public key."""
    return hashlib.sha256(public_key.encode()).hexdigest()[:32]


def is_node_id(text: str) -> bool:
    """Whether ``text`` has the form of a :func:`node_id`."""
    return _NODE_ID_RE.fullmatch(text) is not None
