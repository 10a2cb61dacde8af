"""The stage worker: what it changes around vLLM's model runner."""

from __future__ import annotations

from types import SimpleNamespace


def test_a_stage_without_mamba_layers_steps_without_mamba_alignment() -> None:
    """A hybrid model's stage holding only attention layers runs its steps with Mamba state
    alignment off (vLLM's runner would assert it holds a Mamba layer), then turns it back on
    for the block tables of the next batch; a stage holding a Mamba layer keeps it on."""
    import torch
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        MambaSpec,
    )

    from molink.vllm_compat.model_runner import mamba_alignment_where_held

    mamba = MambaSpec(block_size=16, shapes=((4, 8),), dtypes=(torch.float32,))
    attention = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32)
    for mamba_layers, during in ((["layers.0.conv"], "align"), ([], "none")):
        groups = [KVCacheGroupSpec(mamba_layers, mamba), KVCacheGroupSpec(["l.2"], attention)]
        runner = SimpleNamespace(
            cache_config=SimpleNamespace(mamba_cache_mode="align"),
            kv_cache_config=KVCacheConfig(8, [], groups),
        )
        with mamba_alignment_where_held(runner):
            assert runner.cache_config.mamba_cache_mode == during
        assert runner.cache_config.mamba_cache_mode == "align"
