"""vLLM glue for :mod:`molink.stage_spec`: the head's limits out of its engine config, and a
stage's engine config from them (the worker reads its placement back out of
``additional_config``: :func:`molink.worker.stage_worker.stage_placement`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.config import VllmConfig
from vllm.engine.arg_utils import EngineArgs

from molink.stage_spec import ADDITIONAL_CONFIG_KEY, StageConfig, placement_dict
from molink.worker.platform_worker import stage_enforce_eager


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
    """The VllmConfig of a remote stage: its own engine args with the head's limits on top.

    The head's ``dtype`` applies only to a stage started without ``--dtype``: a node may compute
    in another dtype (bfloat16 on a GPU next to a float32 CPU head); activations are cast on
    arrival and the head plans the KV cache per stage. CUDA graphs follow the platform's rule
    (:func:`~molink.worker.platform_worker.stage_enforce_eager`).
    """
    overrides = dict(stage.engine_overrides)
    if engine_args.dtype != "auto":
        overrides.pop("dtype", None)
    overrides["enforce_eager"] = stage_enforce_eager(overrides.get("enforce_eager", False))
    args = dataclasses.replace(
        engine_args,
        **overrides,
        pipeline_parallel_size=len(stage.placement.partition),
        distributed_executor_backend=executor_cls,
        additional_config={ADDITIONAL_CONFIG_KEY: {"placement": placement_dict(stage.placement)}},
    )
    return args.create_engine_config()
