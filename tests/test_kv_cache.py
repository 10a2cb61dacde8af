"""A follower plans its own KV cache in its head's cache groups (``vllm_compat.kv_cache``).

vLLM groups the layers of a hybrid model (here: sliding-window layers on the head, full
attention on the follower) over the whole model, so a follower's plan has a group for layers it
doesn't hold; planned alone, it would have one group fewer and the head's block ids (one list
per group) would not fit it.
"""

from __future__ import annotations

import pytest
import torch
from vllm.config import CacheConfig, ModelConfig, VllmConfig
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

from molink.engine.stage_fit import kv_plan_misfit
from molink.vllm_compat.kv_cache import (
    align_mamba_block_size,
    kv_cache_bytes,
    plan_kv_cache_with_blocks,
    plan_stage_kv_cache,
)

BLOCK = 16
HEAD_LAYERS = ["layers.0.attn", "layers.1.attn"]  # sliding window
STAGE_LAYERS = ["layers.2.attn", "layers.3.attn"]  # full attention


def sliding(dtype: torch.dtype = torch.float32) -> SlidingWindowSpec:
    return SlidingWindowSpec(
        block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=dtype, sliding_window=32
    )


def full(dtype: torch.dtype = torch.float32) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=dtype)


@pytest.fixture(scope="module")
def vllm_config(qwen3_model: str) -> VllmConfig:
    cache = CacheConfig(block_size=BLOCK)
    cache.kv_cache_layout = "LBHNC"  # what EngineCore resolves before anyone plans
    return VllmConfig(
        model_config=ModelConfig(model=qwen3_model, dtype="float32", max_model_len=512),
        cache_config=cache,
    )


def head_plan_for_stage(vllm_config: VllmConfig, blocks: int = 200):
    """What the head sends the follower: its stage's plan beside the head's own layers."""
    head = dict.fromkeys(HEAD_LAYERS, sliding())
    stage = dict.fromkeys(STAGE_LAYERS, full())
    return plan_kv_cache_with_blocks(vllm_config, [head, stage], blocks)


def test_the_head_plans_a_group_the_follower_holds_no_layer_of(vllm_config):
    plan = head_plan_for_stage(vllm_config)
    assert [g.layer_names for g in plan.kv_cache_groups] == [[], STAGE_LAYERS]


def test_the_followers_own_plan_has_its_heads_groups(vllm_config):
    plan = head_plan_for_stage(vllm_config)
    page = full().page_size_bytes
    own = plan_stage_kv_cache(
        vllm_config, dict.fromkeys(STAGE_LAYERS, full()), 100 * 2 * page + 5, plan
    )
    assert kv_plan_misfit(plan, own) is None
    assert own.num_blocks == 100  # all of the memory, two layers' pages a block
    assert kv_cache_bytes(own) == 100 * 2 * page  # one allocation, not one per tensor
    assert own.kv_cache_layout == plan.kv_cache_layout


def test_a_follower_in_another_dtype_keeps_its_own_pages(vllm_config):
    plan = head_plan_for_stage(vllm_config)
    bf16 = dict.fromkeys(STAGE_LAYERS, full(torch.bfloat16))
    own = plan_stage_kv_cache(vllm_config, bf16, 100 * 2 * full().page_size_bytes, plan)
    assert kv_plan_misfit(plan, own) is None
    assert own.kv_cache_groups[1].kv_cache_spec.dtype == torch.bfloat16
    assert own.num_blocks == 200  # bf16 pages are half the size


def test_a_plan_for_other_layers_is_refused(vllm_config):
    plan = head_plan_for_stage(vllm_config)
    with pytest.raises(ValueError, match="plan is for layers"):
        plan_stage_kv_cache(vllm_config, {"layers.5.attn": full()}, 1 << 20, plan)


def test_mamba_blocks_match_the_attention_block_in_align_mode() -> None:
    """A hybrid model's head resolved its block size after vLLM set the Mamba block size (16
    against 128 here, on the head of an LFM2 whose stages held the other Mamba layers): every
    stage's Mamba layers must take the attention block size, as in one vLLM process."""
    from types import SimpleNamespace

    late = SimpleNamespace(
        cache_config=CacheConfig(block_size=128, mamba_cache_mode="align", mamba_block_size=16)
    )
    align_mamba_block_size(late)  # type: ignore[arg-type]
    assert late.cache_config.mamba_block_size == 128
    without_prefix_caching = SimpleNamespace(
        cache_config=CacheConfig(block_size=128, mamba_cache_mode="none", mamba_block_size=512)
    )
    align_mamba_block_size(without_prefix_caching)  # type: ignore[arg-type]
    assert without_prefix_caching.cache_config.mamba_block_size == 512
