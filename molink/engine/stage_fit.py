"""Whether what a head asks of a shared stage fits what the stage was built for.

A follower builds one worker (one span, one set of engine limits) and one KV cache for every
head it serves. These checks say whether another head's request can use that worker, what
differs when it can't (for the refusal), and whether a head's KV plan maps onto the stage's KV
cache.
"""

from __future__ import annotations

from vllm.v1.kv_cache_interface import KVCacheConfig

from molink.stage_spec import StageConfig


def same_worker(built: StageConfig | None, asked: StageConfig) -> bool:
    """Whether a worker built for ``built`` serves ``asked`` (wire settings are per head)."""
    return built is not None and (built.placement, built.model_hash, built.engine_overrides) == (
        asked.placement,
        asked.model_hash,
        asked.engine_overrides,
    )


def difference(built: StageConfig, asked: StageConfig) -> str:
    """What differs between two heads' requests, for the refusal."""
    if built.placement != asked.placement:
        return f"another span (asked {asked.placement.start_layer}-{asked.placement.end_layer})"
    keys = sorted(
        k
        for k in {*built.engine_overrides, *asked.engine_overrides}
        if built.engine_overrides.get(k) != asked.engine_overrides.get(k)
    )
    return "other limits: " + ", ".join(
        f"{k} {built.engine_overrides.get(k)} here, {asked.engine_overrides.get(k)} asked"
        for k in keys
    )


def kv_plan_misfit(head: KVCacheConfig, own: KVCacheConfig | None) -> str | None:
    """Why a head's KV plan for this stage can't map onto the stage's own KV cache, if so."""
    if own is None:
        return "the stage has no KV cache"
    if head.num_blocks < 1:
        return f"{head.num_blocks} blocks"
    if head.kv_cache_layout != own.kv_cache_layout:
        return f"layout {head.kv_cache_layout}, this stage's is {own.kv_cache_layout}"
    # Layers and block size must agree (block ids name the same tokens); the spec's dtype may
    # not: a stage computing in another dtype keeps its own pages.
    mine = [(g.layer_names, g.kv_cache_spec.block_size) for g in own.kv_cache_groups]
    theirs = [(g.layer_names, g.kv_cache_spec.block_size) for g in head.kv_cache_groups]
    if mine != theirs:
        return f"its KV cache groups (layers, block size) {theirs} differ from this stage's {mine}"
    return None
