"""What the head's engine process needs to know about the pipeline it drives.

The API-server process assembles the first chain from DHT announcements, then starts vLLM's
engine; the chain reaches the executor (in the EngineCore process) through vLLM's
``additional_config``. From then on the executor keeps its own view of the swarm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vllm.config import VllmConfig

from molink.comm.announcement import NodeAnnouncement
from molink.comm.chain import Hop
from molink.config import MoLinkConfig
from molink.security.settings import SecurityFiles
from molink.stage_spec import ADDITIONAL_CONFIG_KEY, StagePlacement, placement_dict
from molink.weight_digest import WeightDigests


@dataclass(frozen=True)
class RemoteStageSpec:
    """One remote stage of the chain: a node and the layers it serves for this head."""

    address: str
    peer_id: str
    start_layer: int
    end_layer: int
    node_key: str = ""  # the announced public key the node must prove it holds ("": no check)

    @classmethod
    def from_hop(cls, hop: Hop) -> RemoteStageSpec:
        """The stage a hop of an assembled chain asks for."""
        return cls(hop.grpc_address, hop.peer_id, hop.start_layer, hop.end_layer, hop.node.node_key)


@dataclass(frozen=True)
class HeadConfig:
    """The pipeline as the head's executor and scheduler see it."""

    head: dict[str, Any]  # the head's NodeAnnouncement, as a dict
    stages: tuple[RemoteStageSpec, ...]
    dht_maddrs: tuple[str, ...] = ()
    wire_dtype: str | None = None
    wire_compression: str | None = None
    max_micro_batches: int = 1
    min_micro_batches: int = 1
    step_trace: str | None = None  # write a step trace here (scheduler + executor)
    step_timeout: float = MoLinkConfig.step_timeout  # --step-timeout's default
    stage_init_timeout: float = 600.0
    chain_timeout: float = MoLinkConfig.chain_timeout  # --chain-timeout's default
    outage_timeout: float = MoLinkConfig.outage_timeout  # --outage-timeout's default
    rebalance_after: float = MoLinkConfig.rebalance_after  # --rebalance-after's default
    recovery: str = MoLinkConfig.recovery  # --recovery's default
    replay_log_mb: float = MoLinkConfig.replay_log_mb  # --replay-log-mb's default
    hot_standby: bool = MoLinkConfig.hot_standby  # --hot-standby's default

    @property
    def replay_log_bytes(self) -> int:
        """The replay log's cap on each stage (0: no log, ``--recovery recompute``)."""
        return int(self.replay_log_mb * 2**20) if self.recovery == "replay" else 0

    recovery_poll_interval: float = 1.0
    swarm_refresh_interval: float = 2.0
    security: SecurityFiles = SecurityFiles()  # key file paths (never the keys themselves)
    weights: dict[str, Any] | None = None  # the head's WeightDigests, as a dict (None: unknown)

    @property
    def head_node(self) -> NodeAnnouncement:
        return NodeAnnouncement.from_dict(self.head)

    @property
    def weight_digests(self) -> WeightDigests | None:
        """The head's checkpoint digests, which nodes' announced digests must match."""
        return WeightDigests.from_dict(self.weights) if self.weights else None

    @property
    def model_hash(self) -> str:
        return str(self.head.get("model_hash", ""))

    @property
    def head_host(self) -> str:
        """Where stage 0 runs: stages on one host share its cores."""
        return str(self.head.get("grpc_address", "")).rpartition(":")[0]

    @property
    def placement(self) -> StagePlacement:
        """The head's own stage (stage 0)."""
        return StagePlacement(0, int(self.head["end_layer"]), int(self.head["num_layers"]))

    def to_additional_config(self) -> dict[str, Any]:
        """The ``additional_config`` entry for vLLM (plain JSON types)."""
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        d["dht_maddrs"] = list(self.dht_maddrs)
        d["placement"] = placement_dict(self.placement)
        return {ADDITIONAL_CONFIG_KEY: d}

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> HeadConfig:
        """The head's pipeline, as :meth:`to_additional_config` put it into the engine config."""
        raw = dict((vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {})
        if "head" not in raw:
            raise ValueError("the engine was not started by a MoLink head (no pipeline config)")
        raw.pop("placement", None)
        raw["stages"] = tuple(RemoteStageSpec(**s) for s in raw["stages"])
        raw["dht_maddrs"] = tuple(raw.get("dht_maddrs", ()))
        raw["security"] = SecurityFiles(**raw.get("security", {}))
        return cls(**raw)
