"""The keys one node runs with, and the transports and checks built from them.

:class:`SwarmSecurity` hands out what the transports need: gRPC channels and ports (mutual TLS
when there is a swarm key), hivemind's DHT arguments (admission and signed records), and the
allowlist check for announced nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from molink.security.grpc_tls import TlsIdentity
from molink.security.node_key import NodeKey, node_id
from molink.security.settings import SecurityFiles, read_allowed_nodes
from molink.security.swarm_key import SwarmKey, load_swarm_key


class SwarmSecurity:
    """Loaded keys, and the transports and checks built from them."""

    def __init__(
        self,
        swarm_key: SwarmKey | None,
        node_key: NodeKey,
        allowed_nodes: frozenset[str] | None = None,
    ) -> None:
        self.swarm_key = swarm_key
        self.node_key = node_key
        self.allowed_nodes = allowed_nodes
        self.tls = TlsIdentity.derive(swarm_key) if swarm_key is not None else None

    @classmethod
    def from_files(cls, files: SecurityFiles) -> SwarmSecurity:
        """Load what ``files`` names (raises ValueError on a bad file); a new node key if none."""
        swarm_key = load_swarm_key(files.swarm_key_file) if files.swarm_key_file else None
        node_key = (
            NodeKey.load_or_create(files.node_key_file)
            if files.node_key_file
            else NodeKey.generate()
        )
        allowed = read_allowed_nodes(files.allowed_nodes_file) if files.allowed_nodes_file else None
        return cls(swarm_key, node_key, allowed)

    @classmethod
    def open(cls) -> SwarmSecurity:
        """No swarm key: plaintext gRPC, an open DHT (loopback demos and tests)."""
        return cls(None, NodeKey.generate())

    @property
    def secured(self) -> bool:
        return self.swarm_key is not None

    def describe(self) -> str:
        """One line for the start-up log (fingerprints only, never a secret)."""
        if self.swarm_key is None:
            return f"no swarm key (plaintext gRPC, open DHT); node id {self.node_key.node_id}"
        allow = f", {len(self.allowed_nodes)} allowed node(s)" if self.allowed_nodes else ""
        return (
            f"swarm key {self.swarm_key.fingerprint} (mutual TLS, DHT admission{allow}); "
            f"node id {self.node_key.node_id}"
        )

    # -- gRPC ---------------------------------------------------------------------------------
    def channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        """A channel to a node: mutual TLS with the swarm key, else plaintext."""
        if self.tls is None:
            return grpc.insecure_channel(address, options=list(options))
        return self.tls.secure_channel(address, options)

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Listen on ``address`` (TLS with client certificates when keyed); the bound port."""
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.server_credentials())

    # -- DHT ----------------------------------------------------------------------------------
    def dht_kwargs(self) -> dict[str, Any]:
        """``hivemind.DHT`` arguments: admission (when keyed) and signed records (always)."""
        from hivemind.dht.crypto import RSASignatureValidator

        kwargs: dict[str, Any] = {
            "record_validators": [RSASignatureValidator(self.node_key.private_key)]
        }
        if self.swarm_key is not None:
            from molink.security.dht_admission import SwarmTokenAuthorizer

            kwargs["authorizer"] = SwarmTokenAuthorizer(self.swarm_key, self.node_key.private_key)
        return kwargs

    def allows(self, public_key: str) -> bool:
        """Whether a node with this public key may serve in this node's chains."""
        return self.allowed_nodes is None or node_id(public_key) in self.allowed_nodes
