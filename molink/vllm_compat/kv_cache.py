"""KV cache plans for stages vLLM's EngineCore never sees.

EngineCore plans every stage's KV cache once, at start-up. A MoLink stage that joins later (a
replacement after a loss) must get the head's block count exactly, and a follower plans its own
cache; both go through vLLM's planner, and both get the layout EngineCore would have stamped.
"""

from __future__ import annotations

import dataclasses
import logging

from vllm.config import VllmConfig
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_configs
from vllm.v1.kv_cache_interface import (
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheSpec,
    UniformTypeKVCacheSpecs,
)


def align_mamba_block_size(vllm_config: VllmConfig) -> None:
    """In Mamba "align" mode (a hybrid model with prefix caching), make every Mamba layer's
    block as large as the attention block, as one vLLM process does.

    vLLM sets ``mamba_block_size`` to ``block_size`` twice: when the config is built (while a
    platform default block size may still be unresolved) and after the model loads, in
    ``Platform.update_block_size_for_backend``, which only reaches it when the worker holds an
    attention layer. A stage holding only Mamba layers, or a head whose block size was resolved
    late, would keep a smaller Mamba block than the other stages; the head's plan then holds Mamba
    groups of different block sizes, and ``mamba_utils.preprocess_mamba`` moves every group's
    state by the first group's block size (wrong states on the stages of the others).

    Needs from vLLM: ``CacheConfig.mamba_block_size`` is what a Mamba layer's ``MambaSpec``
    takes as its block size, and in "align" mode it equals ``block_size``.
    """
    cache = vllm_config.cache_config
    if cache.mamba_cache_mode == "align" and cache.mamba_block_size != cache.block_size:
        cache.mamba_block_size = cache.block_size


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


def kv_cache_bytes(config: KVCacheConfig) -> int:
    """The bytes a worker allocates for ``config``.

    Needs from vLLM: every ``KVCacheTensor`` of a plan places its layers in one backing
    allocation of ``size`` bytes (``vllm.v1.worker.utils.allocate_kv_cache``); the tensors of
    different cache groups alias it, so their sizes must not be added up.
    """
    return max((tensor.size for tensor in config.kv_cache_tensors), default=0)


def plan_stage_kv_cache(
    vllm_config: VllmConfig,
    spec: dict[str, KVCacheSpec],
    available_bytes: int,
    head_plan: KVCacheConfig,
) -> KVCacheConfig:
    """A follower's own KV cache plan: all of ``available_bytes``, in the cache groups and
    layout of its first head's plan for it.

    The groups come from the head because vLLM groups the layers of the whole model (a hybrid
    model's sliding-window and full-attention layers, or its Mamba and attention layers, each
    get groups of the same size): a follower planning its own span alone would group them
    otherwise, and a head's block ids name one list per group. This is what vLLM does for its
    own pipeline stages: ``get_kv_cache_configs`` plans every worker with the global groups
    projected onto the worker's layers (some may be empty), through
    ``get_kv_cache_config_from_groups(vllm_config, groups, available_memory)``.

    Raises ``ValueError`` when the head's groups don't hold exactly the layers of ``spec``.
    """
    planned = {name for group in head_plan.kv_cache_groups for name in group.layer_names}
    if planned != set(spec):
        raise ValueError(
            f"the head's KV cache plan is for layers {sorted(planned)}, this stage serves "
            f"{sorted(spec)}"
        )
    groups = [_in_stage_dtypes(group, spec) for group in head_plan.kv_cache_groups]
    own = get_kv_cache_config_from_groups(vllm_config, groups, available_bytes)
    own.kv_tp_replicas = head_plan.kv_tp_replicas
    return stamp_kv_cache_layout(own, head_plan.kv_cache_layout)


def _in_stage_dtypes(group: KVCacheGroupSpec, spec: dict[str, KVCacheSpec]) -> KVCacheGroupSpec:
    """The head's ``group``, with each layer's KV in the dtype(s) this stage keeps it in
    (``spec``): a follower may compute in another dtype than its head, and then keeps its own
    pages. Everything else (block size, sliding window, ...) is the head's."""

    def own(head_spec: KVCacheSpec, mine: KVCacheSpec) -> KVCacheSpec:
        changes = {
            name: getattr(mine, name)
            for name in ("dtype", "dtypes")
            if hasattr(head_spec, name) and getattr(head_spec, name) != getattr(mine, name, None)
        }
        return dataclasses.replace(head_spec, **changes) if changes else head_spec

    if not group.layer_names:
        return group
    head_spec = group.kv_cache_spec
    if isinstance(head_spec, UniformTypeKVCacheSpecs):
        layer_specs = {n: own(s, spec[n]) for n, s in head_spec.kv_cache_specs.items()}
        stage_spec: KVCacheSpec = UniformTypeKVCacheSpecs(
            block_size=head_spec.block_size, kv_cache_specs=layer_specs
        )
    else:
        stage_spec = own(head_spec, spec[group.layer_names[0]])
    return dataclasses.replace(group, kv_cache_spec=stage_spec)
