"""The stage worker keeps one persistent batch per head on a shared stage."""

from __future__ import annotations

from types import SimpleNamespace

from molink.worker.stage_worker import StageHooks


def test_a_head_that_leaves_takes_no_other_heads_batch_with_it() -> None:
    """Head b used the stage last, then left: head a's next step gets a's own batch back, not
    the empty one b left in the runner (a would lose its requests: a stage loss)."""
    hooks = object.__new__(StageHooks)
    hooks.model_runner = runner = SimpleNamespace(input_batch="a's batch", requests={"a1": 1})
    hooks._batch_owner, hooks._other_batches = None, {"b": ("b's batch", {"b1": 1})}
    hooks.replay_logs = {"a": "a's replay log", "b": "b's replay log"}
    hooks.use_batch_of("a")
    hooks.use_batch_of("b")
    assert (runner.input_batch, runner.requests) == ("b's batch", {"b1": 1})
    runner.requests.clear()  # b left: reset_stage forgot its requests
    hooks.forget_batch_of("b")
    hooks.use_batch_of("a")
    assert (runner.input_batch, runner.requests) == ("a's batch", {"a1": 1})
    assert hooks._other_batches == {}
    assert hooks.replay_logs == {"a": "a's replay log"}  # b's log left with b
    hooks.forget_batch_of("a")
    hooks.use_batch_of("c")  # a head after every other left takes the runner's batch over
    assert runner.input_batch == "a's batch" and hooks._batch_owner == "c"


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
