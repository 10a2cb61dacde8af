"""The vLLM classes a step payload may name: the vLLM part of the wire codec's allowlist.

A step between nodes carries vLLM dataclasses (the scheduler output, the grammar output, the KV
cache plan, the model runner output), pickled; the receiving node's restricted unpickler
(:mod:`molink.comm.codec`) builds only the classes listed here (and MoLink's own). Every entry must
be a plain data holder (a dataclass, an enum, a named tuple or a msgspec struct): building one
runs no code the sender chooses.

The list is explicit, not derived from vLLM's type hints, so a new vLLM can't widen it silently:
``tests/test_vllm_compat.py`` checks that every entry still imports and is a data holder, and
that every ``KVCacheSpec`` subclass vLLM defines is listed (with its field types) and round-trips
through the codec.
"""

from __future__ import annotations

#: vLLM classes allowed in a step payload, by module.
VLLM_WIRE_CLASSES: dict[str, tuple[str, ...]] = {
    # scheduler side
    "vllm.v1.core.sched.output": (
        "SchedulerOutput",
        "NewRequestData",
        "CachedRequestData",
        "GrammarOutput",
        "ScheduledEncoderInputStats",
    ),
    "vllm.sampling_params": (
        "SamplingParams",
        "SamplingType",
        "RequestOutputKind",
        "StructuredOutputsParams",
        "RepetitionDetectionParams",
    ),
    "vllm.pooling_params": ("PoolingParams", "LateInteractionParams"),
    "vllm.lora.request": ("LoRARequest",),
    # SchedulerOutput.kv_cache_block_copies (hybrid models aligning Mamba state)
    "vllm.v1.core.kv_cache_utils": ("KVCacheBlockCopy",),
    "vllm.config.ec_manager_config": ("EncoderCacheManagerMetadata",),
    # model runner side
    "vllm.v1.outputs": (
        "ModelRunnerOutput",
        "LogprobsLists",
        "LogprobsTensors",
        "SamplingMaskLists",
        "KVConnectorOutput",
        "ECConnectorOutput",
        "DraftTokenIds",
    ),
    # KV cache planning: every KVCacheSpec subclass of vLLM 0.32, and their field types
    "vllm.v1.kv_cache_interface": (
        "KVQuantMode",
        "KVCacheSpecKind",
        "SparseCacheRole",
        "KVCacheSpec",
        "AttentionSpec",
        "FullAttentionSpec",
        "MLAAttentionSpec",
        "HiddenStateCacheSpec",
        "RSWASpec",
        "ChunkedLocalAttentionSpec",
        "SlidingWindowSpec",
        "SlidingWindowMLASpec",
        "CircularBufferSpec",
        "MambaSpec",
        "EncoderOnlyAttentionSpec",
        "CrossAttentionSpec",
        "SinkFullAttentionSpec",
        "HiSparseHotSpec",
        "HiSparseResidentSpec",
        "UniformTypeKVCacheSpecs",
        "KVCacheTensor",
        "KVCacheGroupRole",
        "KVCacheGroupSpec",
        "KVCacheConfig",
    ),
    # KVCacheSpec.block_stride_alignment (MLA backends set it), MambaSpec.mamba_type
    "vllm.v1.attention.backend": ("MultipleOf",),
    "vllm.v1.attention.backends.registry": ("MambaAttentionBackendEnum",),
}
