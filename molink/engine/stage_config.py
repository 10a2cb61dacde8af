"""What a stage needs to know about its place in the pipeline, and how the head tells it.

The head owns the scheduler, so its limits (max_num_batched_tokens, max_num_seqs, block size,
max_model_len, dtype, ...) must be the limits of every stage: the model runner sizes its buffers
from them. :class:`StageConfig` carries them to a remote stage as JSON; the stage applies them on
top of its own command-line engine arguments.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from vllm.config import VllmConfig
from vllm.engine.arg_utils import EngineArgs

from molink.comm.codec import WireFormat

ADDITIONAL_CONFIG_KEY = "molink"

# EngineArgs fields whose head value every stage must use.
HEAD_ENGINE_FIELDS = (
    "max_model_len",
    "max_num_batched_tokens",
    "max_num_seqs",
    "block_size",
    "enable_chunked_prefill",
    "dtype",
    "seed",
    "enforce_eager",
    "kv_cache_dtype",
    "max_logprobs",
    "logprobs_mode",
    "enable_prefix_caching",
)


@dataclass(frozen=True)
class StagePlacement:
    """Pipeline rank of this process and the layer count of every stage."""

    rank: int
    partition: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.partition or any(n <= 0 for n in self.partition):
            raise ValueError(f"invalid layer partition {self.partition}")
        if not 0 <= self.rank < len(self.partition):
            raise ValueError(f"stage rank {self.rank} outside {len(self.partition)} stages")


@dataclass(frozen=True)
class StageConfig:
    """Sent by the head in ``InitStage``: placement, model identity and the head's limits."""

    placement: StagePlacement
    model_hash: str
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    wire_dtype: str | None = None
    wire_compression: str | None = None

    @property
    def wire_format(self) -> WireFormat:
        return WireFormat.from_names(self.wire_dtype, self.wire_compression)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StageConfig:
        """Parse and validate a config received from the network."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("stage config must be a JSON object")
        placement = raw.get("placement") or {}
        overrides = raw.get("engine_overrides") or {}
        if not isinstance(overrides, dict) or set(overrides) - set(HEAD_ENGINE_FIELDS):
            raise ValueError(f"unexpected engine overrides {sorted(set(overrides))}")
        for key, value in overrides.items():
            if not isinstance(value, (int, float, str, bool, type(None))):
                raise ValueError(f"engine override {key} has a non-scalar value")
        wire_dtype, wire_compression = raw.get("wire_dtype"), raw.get("wire_compression")
        WireFormat.from_names(wire_dtype, wire_compression)  # validates both
        return cls(
            placement=StagePlacement(
                rank=int(placement["rank"]),
                partition=tuple(int(n) for n in placement["partition"]),
            ),
            model_hash=str(raw["model_hash"]),
            engine_overrides=overrides,
            wire_dtype=wire_dtype,
            wire_compression=wire_compression,
        )


def head_engine_overrides(vllm_config: VllmConfig) -> dict[str, Any]:
    """The head's resolved limits, as EngineArgs values for the stages."""
    model, sched, cache = (
        vllm_config.model_config,
        vllm_config.scheduler_config,
        vllm_config.cache_config,
    )
    return {
        "max_model_len": model.max_model_len,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "max_num_seqs": sched.max_num_seqs,
        "block_size": cache.block_size,
        "enable_chunked_prefill": sched.enable_chunked_prefill,
        "dtype": str(model.dtype).removeprefix("torch."),
        "seed": model.seed,
        "enforce_eager": model.enforce_eager,
        "kv_cache_dtype": cache.cache_dtype,
        "max_logprobs": model.max_logprobs,
        "logprobs_mode": model.logprobs_mode,
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
    }


def stage_engine_config(
    engine_args: EngineArgs, stage: StageConfig, executor_cls: type
) -> VllmConfig:
    """The VllmConfig of a remote stage: its own engine args with the head's limits on top."""
    args = dataclasses.replace(
        engine_args,
        **stage.engine_overrides,
        pipeline_parallel_size=len(stage.placement.partition),
        distributed_executor_backend=executor_cls,
        additional_config={ADDITIONAL_CONFIG_KEY: placement_dict(stage.placement)},
    )
    return args.create_engine_config()


def placement_dict(placement: StagePlacement) -> dict[str, Any]:
    return {"rank": placement.rank, "partition": list(placement.partition)}


def stage_placement(vllm_config: VllmConfig) -> StagePlacement:
    """This process's placement, from ``additional_config`` (a single stage if absent)."""
    extra = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if not extra:
        num_layers = vllm_config.model_config.get_total_num_hidden_layers()
        return StagePlacement(rank=0, partition=(num_layers,))
    return StagePlacement(rank=int(extra["rank"]), partition=tuple(extra["partition"]))
