"""The head's KV cache plan for its remote stages: one block count on every stage.

vLLM's EngineCore plans every stage at the same number of blocks when the head starts (the
minimum over the stages' offers). A stage that joins later must hold exactly that many, or the
head's block ids would not fit; and when the head shrinks its KV cache for another head on a
shared follower, or grows it back once one left, every stage is planned again at the new count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.config import VllmConfig
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec

from molink.vllm_compat.kv_cache import kv_cache_bytes, plan_kv_cache_with_blocks

if TYPE_CHECKING:
    from molink.executor.remote_stage import RemoteStage


class StageRefused(RuntimeError):
    """A node can't serve a span for this head (e.g. not enough memory for the KV plan)."""


class HeadKVPlan:
    """The block count the head's stages hold, and each remote stage's plan at that count."""

    def __init__(self, vllm_config: VllmConfig) -> None:
        self.vllm_config = vllm_config
        self.local_spec: dict[str, KVCacheSpec] | None = None  # the head's own stage 0
        self.num_blocks = 0  # set once EngineCore planned the first chain
        self.allocated_blocks = 0  # what the head's own KV cache holds: the most it can use

    def check_offers(self, remotes: list[RemoteStage]) -> None:
        """Refuse, with the reason, a stage whose offer can't hold one request of
        ``max_model_len`` (before vLLM's own check, which names no stage).

        A stage offers what other heads left free on it, or this head's fair share of it (the
        heads holding more then shrink when this head claims its blocks).
        """
        for remote in remotes:
            assert remote.kv_cache_spec is not None
            needed = sum(
                spec.max_memory_usage_bytes(self.vllm_config)
                for spec in remote.kv_cache_spec.values()
            )
            if remote.available_kv_bytes < needed:
                raise StageRefused(
                    f"{remote} has no room for this head's KV cache: {remote.available_kv_bytes} "
                    f"bytes free, and neither they nor a fair share beside the heads it serves "
                    f"hold one request of --max-model-len "
                    f"{self.vllm_config.model_config.max_model_len} ({needed} bytes)"
                )

    def for_stage(self, remote: RemoteStage, chain: list[RemoteStage]) -> KVCacheConfig:
        """``remote``'s plan at the head's block count (beside the stages of ``chain``)."""
        assert self.local_spec is not None and remote.kv_cache_spec is not None
        others = [r for r in chain if r is not remote and r.kv_cache_spec is not None]
        specs = [self.local_spec, *(r.kv_cache_spec for r in others), remote.kv_cache_spec]
        return plan_kv_cache_with_blocks(self.vllm_config, specs, self.num_blocks)

    def blocks_offered(self, remote: RemoteStage) -> int:
        """The blocks ``remote`` offered this head, at the size its plan gives a block."""
        config = remote.kv_cache_config
        assert config is not None
        block_bytes = kv_cache_bytes(config) // max(config.num_blocks, 1)
        return remote.available_kv_bytes // max(block_bytes, 1)

    def for_joining_stage(self, remote: RemoteStage, chain: list[RemoteStage]) -> KVCacheConfig:
        """The plan of a stage joining a running pipeline; :class:`StageRefused` when the stage
        didn't offer room for it."""
        config = self.for_stage(remote, chain)
        needed = kv_cache_bytes(config)
        if config.num_blocks != self.num_blocks or needed > remote.available_kv_bytes:
            raise StageRefused(
                f"{remote} has room for {remote.available_kv_bytes} bytes of KV cache; this "
                f"head's plan of {self.num_blocks} blocks needs {needed}"
            )
        return config
