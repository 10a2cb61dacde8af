"""What a node tells the swarm about itself: :class:`NodeAnnouncement` and its checks.

Announcements come from untrusted peers, so construction validates every field (types, lengths,
ranges) and :meth:`NodeAnnouncement.from_dict` accepts only well-formed dicts; anything else
raises :class:`InvalidAnnouncement` (a ``ValueError``). :mod:`molink.comm.membership` publishes
and reads them over the DHT.

This module imports neither hivemind nor vLLM: importing it stays cheap.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from molink.security.node_ids import node_id

#: Allowed values of :attr:`NodeAnnouncement.state`.
NODE_STATES = frozenset({"joining", "online", "leaving"})

_MAX_STR_LEN = 1024
_MAX_LAYERS = 1 << 20
_BASE58_RE = re.compile(r"[1-9A-HJ-NP-Za-km-z]{1,128}")
_MAX_HEAD_IDS = 256


class InvalidAnnouncement(ValueError):
    """An announcement (or a field of one) is malformed."""


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6]:port"``) into ``(host, port)``.

    Raises ``ValueError`` unless the host is non-empty and the port is a decimal integer in
    1..65535.
    """
    if not isinstance(address, str):
        raise InvalidAnnouncement(f"address must be a string, got {type(address).__name__}")
    host, sep, port_str = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {address!r} is not of the form host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"address {address!r} has an empty host")
    elif ":" in host:
        raise ValueError(f"address {address!r}: IPv6 hosts must be written as [host]:port")
    if not (port_str.isascii() and port_str.isdigit()):
        raise ValueError(f"address {address!r} has a non-numeric port")
    port = int(port_str)
    if not 1 <= port <= 65535:
        raise ValueError(f"address {address!r} has a port outside 1..65535")
    if any(c.isspace() or c in "/@" for c in host):  # "@" makes a route (molink.comm.tunnels)
        raise ValueError(f"address {address!r} has an invalid host")
    return host, port


def is_peer_id(text: str) -> bool:
    """Whether ``text`` looks like a hivemind PeerID (base58)."""
    return _BASE58_RE.fullmatch(text) is not None


def check_api_url(url: str) -> str:
    """``url`` if it is ``http(s)://host:port`` with nothing after the port; else raises."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise InvalidAnnouncement(f"api_url {url!r} is not an http(s) URL")
    try:
        split_host_port(rest)
    except ValueError as e:
        raise InvalidAnnouncement(f"api_url {url!r}: {e}") from None
    return url


@dataclass(frozen=True)
class NodeAnnouncement:
    """What a node tells the swarm about itself. Validated on construction (raises ValueError)."""

    peer_id: str  # hivemind PeerID (base58) of the announcing node
    model_name: str
    model_hash: str  # hash of the model config, nodes must match
    num_layers: int
    start_layer: int  # inclusive
    end_layer: int  # inclusive
    grpc_address: str  # "host:port" where its gRPC service listens
    state: str  # "joining" | "online" | "leaving" (draining before it exits)
    version: str  # molink version
    kv_capacity_bytes: int
    is_head: bool
    # Tokens per second this node computed through its span lately (0: not measured yet).
    throughput: float = 0.0
    # The node's public key (OpenSSH form); readers require it to be the record's signer.
    node_key: str = ""
    # Digest of the weights of its span (molink.weight_digest; empty: not computed).
    weights_digest: str = ""
    # What it computes on: "cpu", "cuda (NVIDIA H100 80GB HBM3)", ... (empty: not said).
    device: str = ""
    # KV cache bytes no head holds on it (of kv_capacity_bytes), and how many heads it serves.
    kv_free_bytes: int = 0
    heads: int = 0
    # Load: sequences it runs for all heads, and the busy share of its compute lately (0..1).
    sequences: int = 0
    busy: float = 0.0
    # A head's OpenAI API base URL ("http://host:port"; empty: not a head, or not serving yet).
    api_url: str = ""
    # The peer ids of the heads it serves, as they named themselves (a hint for rebalancing).
    head_ids: tuple[str, ...] = ()
    # Those of ``head_ids`` that have sequences running on it now (their steps take its time).
    running_head_ids: tuple[str, ...] = ()
    # False: behind NAT (or a firewall); others reach it through ``relay`` ("host:port" of a
    # reachable node it keeps a call open to), by the route ``peer_id@relay``.
    reachable: bool = True
    relay: str = ""

    def __post_init__(self) -> None:
        for name in (
            "peer_id",
            "model_name",
            "model_hash",
            "grpc_address",
            "state",
            "version",
            "node_key",
            "weights_digest",
            "device",
            "api_url",
            "relay",
        ):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidAnnouncement(f"{name} must be a string, got {type(value).__name__}")
            if len(value) > _MAX_STR_LEN:
                raise InvalidAnnouncement(f"{name} is longer than {_MAX_STR_LEN} characters")
        for name in ("model_name", "model_hash"):
            if not getattr(self, name):
                raise InvalidAnnouncement(f"{name} must not be empty")
        if not is_peer_id(self.peer_id):
            raise InvalidAnnouncement(f"peer_id {self.peer_id!r} is not a base58 PeerID")
        for name in (
            "num_layers",
            "start_layer",
            "end_layer",
            "kv_capacity_bytes",
            "kv_free_bytes",
            "heads",
            "sequences",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidAnnouncement(f"{name} must be an integer, got {type(value).__name__}")
            if value < 0:
                raise InvalidAnnouncement(f"{name}={value} is negative")
        if (
            isinstance(self.throughput, bool)
            or not isinstance(self.throughput, (int, float))
            or not 0 <= self.throughput < float("inf")
        ):
            raise InvalidAnnouncement(f"throughput={self.throughput!r} is not a finite rate >= 0")
        if (
            isinstance(self.busy, bool)
            or not isinstance(self.busy, (int, float))
            or not 0 <= self.busy <= 1
        ):
            raise InvalidAnnouncement(f"busy={self.busy!r} is not a share in 0..1")
        if self.api_url:
            check_api_url(self.api_url)
        for name in ("head_ids", "running_head_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple)) or len(ids) > _MAX_HEAD_IDS:
                raise InvalidAnnouncement(f"{name} must be a list of at most {_MAX_HEAD_IDS} ids")
            for head_id in ids:
                if not isinstance(head_id, str) or not is_peer_id(head_id):
                    raise InvalidAnnouncement(f"{name} has {head_id!r}, not a base58 PeerID")
            object.__setattr__(self, name, tuple(ids))  # msgpack gives a list
        if not isinstance(self.reachable, bool):
            raise InvalidAnnouncement("reachable must be a bool")
        if self.relay:
            split_host_port(self.relay)
        elif not self.reachable:
            raise InvalidAnnouncement("a node that can't be dialed must name its relay")
        if not self.reachable and not self.node_key:
            raise InvalidAnnouncement("a node that can't be dialed must announce its node key")
        if not isinstance(self.is_head, bool):
            raise InvalidAnnouncement(f"is_head must be a bool, got {type(self.is_head).__name__}")
        if not 1 <= self.num_layers <= _MAX_LAYERS:
            raise InvalidAnnouncement(f"num_layers={self.num_layers} is out of range")
        if not 0 <= self.start_layer <= self.end_layer < self.num_layers:
            raise InvalidAnnouncement(
                f"layers {self.start_layer}-{self.end_layer} are not a valid range of "
                f"{self.num_layers} layers (need 0 <= start <= end < num_layers)"
            )
        if self.state not in NODE_STATES:
            raise InvalidAnnouncement(f"state {self.state!r} is not one of {sorted(NODE_STATES)}")
        if self.is_head and self.start_layer != 0:
            raise InvalidAnnouncement(f"a head must start at layer 0, not {self.start_layer}")
        split_host_port(self.grpc_address)

    @property
    def dial_address(self) -> str:
        """Where to dial this node: its gRPC address, or the route through its relay."""
        if self.reachable:
            return self.grpc_address
        return f"{node_id(self.node_key)}@{self.relay}"  # a route (molink.comm.tunnels)

    @property
    def layers(self) -> range:
        """The layers this node serves, as a half-open ``range``."""
        return range(self.start_layer, self.end_layer + 1)

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-friendly dict (only str, int and bool values)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> NodeAnnouncement:
        """Build from a dict received from an (untrusted) peer.

        Every field without a default must be present, with the right type and a valid value;
        unknown keys are ignored so that newer versions may add fields. Raises ``ValueError`` on
        anything malformed.
        """
        if not isinstance(d, Mapping):
            raise InvalidAnnouncement(f"announcement must be a mapping, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise InvalidAnnouncement(f"announcement lacks fields: {', '.join(missing)}")
        return cls(**{f.name: d[f.name] for f in fields if f.name in d})
