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
    """The layers ``start_layer..end_layer`` (inclusive) of a ``num_layers``-layer model.

    A stage's worker depends only on its own span (and on being first or last), never on how the
    rest of the chain is split, so a surviving stage keeps its worker when other hops change.
    vLLM builds it as pipeline rank :attr:`rank` of the layer split :attr:`partition`.
    """

    start_layer: int
    end_layer: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer <= self.end_layer < self.num_layers:
            raise ValueError(
                f"invalid layers {self.start_layer}-{self.end_layer} of {self.num_layers}"
            )

    @property
    def partition(self) -> tuple[int, ...]:
        """Layer counts: [before this stage,] this stage[, after it]."""
        counts = (
            self.start_layer,
            self.end_layer - self.start_layer + 1,
            self.num_layers - 1 - self.end_layer,
        )
        return tuple(n for n in counts if n > 0)

    @property
    def rank(self) -> int:
        return 0 if self.start_layer == 0 else 1


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
            placement=placement_from_dict(placement),
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
        additional_config={ADDITIONAL_CONFIG_KEY: {"placement": placement_dict(stage.placement)}},
    )
    return args.create_engine_config()


def placement_dict(placement: StagePlacement) -> dict[str, Any]:
    return dataclasses.asdict(placement)


def placement_from_dict(raw: Any) -> StagePlacement:
    """Parse and validate a placement (raises ValueError, KeyError or TypeError)."""
    if not isinstance(raw, dict):
        raise ValueError("placement must be a JSON object")
    return StagePlacement(
        start_layer=int(raw["start_layer"]),
        end_layer=int(raw["end_layer"]),
        num_layers=int(raw["num_layers"]),
    )


def stage_placement(vllm_config: VllmConfig) -> StagePlacement:
    """This process's placement, from ``additional_config`` (a single stage if absent)."""
    num_layers = vllm_config.model_config.get_total_num_hidden_layers()
    extra = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if not extra:
        return StagePlacement(0, num_layers - 1, num_layers)
    return placement_from_dict(extra["placement"])
