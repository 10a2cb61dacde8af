"""The head's batch queue bound: MoLink's one patch of vLLM's engine config.

vLLM sizes EngineCore's batch queue from ``VllmConfig.max_concurrent_batches``, which is
``pipeline_parallel_size`` (+1 with async scheduling). That is right when stages sit on one fast
interconnect; over real links, hiding latency takes more micro-batches in flight than stages,
and turning micro-batching off takes fewer. Neither the executor, nor the worker, nor the
scheduler class can set the queue size (EngineCore reads the property while it builds itself),
so :func:`install_batch_queue_bound` overrides the property, only for a head whose
``additional_config`` carries MoLink's ``max_micro_batches``.
"""

from __future__ import annotations

from vllm.config import VllmConfig

from molink.stage_spec import ADDITIONAL_CONFIG_KEY

_VLLM_MAX_CONCURRENT_BATCHES = VllmConfig.max_concurrent_batches


def batch_queue_bound(vllm_config: VllmConfig) -> int:
    """The batch queue depth of ``vllm_config``: MoLink's ``max_micro_batches`` if the config
    carries one, else vLLM's own ``max_concurrent_batches``."""
    molink = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {}
    bound = molink.get("max_micro_batches")
    if isinstance(bound, int) and bound >= 1:
        return bound
    return _VLLM_MAX_CONCURRENT_BATCHES.fget(vllm_config)


def install_batch_queue_bound() -> None:
    """Make ``VllmConfig.max_concurrent_batches`` return :func:`batch_queue_bound` in this
    process (idempotent). Call it before EngineCore sizes its batch queue (the executor's
    set-up runs early enough).

    Needs from vLLM: ``VllmConfig.max_concurrent_batches`` is a property, replaceable on the
    class, that ``EngineCore.__init__`` reads.
    """
    VllmConfig.max_concurrent_batches = property(  # type: ignore[method-assign]
        batch_queue_bound, doc=_VLLM_MAX_CONCURRENT_BATCHES.__doc__
    )
