"""Let the head keep more batches in flight than it has stages (MoLink's one vLLM patch).

vLLM sizes EngineCore's batch queue from ``VllmConfig.max_concurrent_batches``, which is
``pipeline_parallel_size``. That is right when stages sit on one fast interconnect; over real
links, hiding latency takes more micro-batches in flight than stages, and turning micro-batching
off takes fewer. Neither the executor, nor the worker, nor the scheduler class can set the queue
size (EngineCore reads the property while it builds itself), so this module overrides the
property, only for a head whose ``additional_config`` carries MoLink's ``max_micro_batches``.
"""

from __future__ import annotations

from vllm.config import VllmConfig

from molink.stage_spec import ADDITIONAL_CONFIG_KEY

_VLLM_MAX_CONCURRENT_BATCHES = VllmConfig.max_concurrent_batches


def _max_concurrent_batches(self: VllmConfig) -> int:
    molink = (self.additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {}
    bound = molink.get("max_micro_batches")
    if isinstance(bound, int) and bound >= 1:
        return bound
    return _VLLM_MAX_CONCURRENT_BATCHES.fget(self)


def install() -> None:
    """Apply the override in this process (idempotent)."""
    VllmConfig.max_concurrent_batches = property(  # type: ignore[method-assign]
        _max_concurrent_batches, doc=_VLLM_MAX_CONCURRENT_BATCHES.__doc__
    )
