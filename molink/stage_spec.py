"""What the head tells a stage: its layers, the model, and the head's engine limits.

The head owns the scheduler, so its limits (max_num_batched_tokens, max_num_seqs, block size,
max_model_len, ...) must be the limits of every stage: the model runner sizes its buffers from
them. Its dtype applies to stages that don't set their own. :class:`StageConfig` carries them to a
remote stage as JSON; the stage applies them on top of its own command-line engine arguments
(``molink.engine.stage_config``). Plain data, validated when it comes from the network.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from molink.config import WIRE_COMPRESSIONS, WIRE_DTYPE_NAMES

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


#: The most host memory a head may ask a stage to keep for its replay log.
MAX_REPLAY_LOG_BYTES = 64 << 30


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
    replay_log_bytes: int = 0  # log what the stage sends on, for a recovery by replay (0: don't)

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
        if wire_dtype is not None and wire_dtype not in WIRE_DTYPE_NAMES:
            raise ValueError(f"unsupported wire dtype {wire_dtype!r}")
        if wire_compression is not None and wire_compression not in WIRE_COMPRESSIONS:
            raise ValueError(f"unsupported wire compression {wire_compression!r}")
        replay_log_bytes = raw.get("replay_log_bytes", 0)
        if type(replay_log_bytes) is not int or not 0 <= replay_log_bytes <= MAX_REPLAY_LOG_BYTES:
            raise ValueError(f"replay_log_bytes must be an integer in 0-{MAX_REPLAY_LOG_BYTES}")
        return cls(
            placement=placement_from_dict(placement),
            model_hash=str(raw["model_hash"]),
            engine_overrides=overrides,
            wire_dtype=wire_dtype,
            wire_compression=wire_compression,
            replay_log_bytes=replay_log_bytes,
        )


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
