"""KV cache plans for stages vLLM's EngineCore never sees.

EngineCore plans every stage's KV cache once, at start-up. A MoLink stage that joins later (a
replacement after a loss) must get the head's block count exactly, and a follower plans its own
cache; both go through vLLM's planner, and both get the layout EngineCore would have stamped.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.config import VllmConfig
from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec


def stamp_kv_cache_layout(config: KVCacheConfig, layout: str | None) -> KVCacheConfig:
    """Set ``config``'s KV cache layout, as EngineCore sets it on every worker's plan.

    Needs from vLLM: ``EngineCore._initialize_kv_caches`` sets each ``KVCacheConfig.
    kv_cache_layout`` from ``cache_config.kv_cache_layout`` (copied here for stages it never
    sees).
    """
    config.kv_cache_layout = layout
    return config


def plan_kv_cache_with_blocks(
    vllm_config: VllmConfig, specs: list[dict[str, KVCacheSpec]], num_blocks: int
) -> KVCacheConfig:
    """The KV cache plan of the last of ``specs`` (one per stage) at exactly ``num_blocks``,
    with the engine's layout.

    Needs from vLLM: ``get_kv_cache_configs(vllm_config, specs, available_memory)`` plans
    ``cache_config.num_gpu_blocks_override`` blocks when it is set (it is set for this call
    only, with the planner's per-stage log line silenced).
    """
    cache = vllm_config.cache_config
    saved = cache.num_gpu_blocks_override
    cache.num_gpu_blocks_override = num_blocks
    quiet = logging.getLogger(get_kv_cache_configs.__module__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs the override once per stage, every time
    try:
        config = get_kv_cache_configs(vllm_config, specs, [1 << 62] * len(specs))[-1]
    finally:
        cache.num_gpu_blocks_override = saved
        quiet.setLevel(level)
    return stamp_kv_cache_layout(config, cache.kv_cache_layout)


def plan_stage_kv_cache(
    vllm_config: VllmConfig, spec: dict[str, Any], available_bytes: int, layout: str | None
) -> KVCacheConfig:
    """A follower's own KV cache plan: all of ``available_bytes``, in ``layout`` (the one its
    first head's engine resolved)."""
    own = get_kv_cache_configs(vllm_config, [spec], [available_bytes])[0]
    return stamp_kv_cache_layout(own, layout)
