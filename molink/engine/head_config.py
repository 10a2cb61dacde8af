"""What the head's engine process needs to know about the pipeline it drives.

The API-server process assembles the chain from DHT announcements, then starts vLLM's engine;
the chain reaches the executor (in the EngineCore process) through vLLM's ``additional_config``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vllm.config import VllmConfig

from molink.engine.stage_config import ADDITIONAL_CONFIG_KEY


@dataclass(frozen=True)
class RemoteStageSpec:
    """One remote stage of the chain."""

    address: str
    peer_id: str
    start_layer: int
    end_layer: int


@dataclass(frozen=True)
class HeadConfig:
    """The pipeline as the head's executor and scheduler see it."""

    partition: tuple[int, ...]
    stages: tuple[RemoteStageSpec, ...]
    model_hash: str
    dht_maddrs: tuple[str, ...] = ()
    head_host: str = ""  # where stage 0 runs: stages on one host share its cores
    wire_dtype: str | None = None
    wire_compression: str | None = None
    max_micro_batches: int = 1
    step_timeout: float = 120.0
    stage_init_timeout: float = 600.0
    outage_timeout: float = 120.0
    recovery_poll_interval: float = 2.0

    def to_additional_config(self) -> dict[str, Any]:
        """The ``additional_config`` entry for vLLM (plain JSON types)."""
        d = asdict(self)
        d["rank"] = 0
        d["partition"] = list(self.partition)
        d["stages"] = [asdict(s) for s in self.stages]
        d["dht_maddrs"] = list(self.dht_maddrs)
        return {ADDITIONAL_CONFIG_KEY: d}

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> HeadConfig:
        raw = dict((vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {})
        if not raw:  # plain single-node use: the head serves every layer
            layers = vllm_config.model_config.get_total_num_hidden_layers()
            return cls(partition=(layers,), stages=(), model_hash="")
        raw.pop("rank", None)
        raw["partition"] = tuple(raw["partition"])
        raw["stages"] = tuple(RemoteStageSpec(**s) for s in raw["stages"])
        raw["dht_maddrs"] = tuple(raw.get("dht_maddrs", ()))
        return cls(**raw)
