"""Make one process look like "pipeline rank r of N" to vLLM, without any peer process.

MoLink stages never use torch.distributed between stages (activations travel over gRPC), so
each stage gets a private one-process world (gloo, size 1) for vLLM's TP/PP/DP bookkeeping, and then
the PP group is replaced by :class:`~molink.vllm_compat.parallel_state.StagePipelineGroup`, which
only *describes* membership (:mod:`molink.vllm_compat.parallel_state`). Any PP collective
(send/recv/broadcast) fails loudly instead of hanging.
"""

from __future__ import annotations

import os
import tempfile

from vllm.distributed import parallel_state
from vllm.logger import init_logger

from molink.vllm_compat.parallel_state import StagePipelineGroup, replace_pp_group

logger = init_logger(__name__)


def init_stage_parallel_state(pp_rank: int, pp_world_size: int, local_rank: int = 0) -> None:
    """Initialize vLLM's distributed state as a one-process world, then describe PP membership.

    Call inside ``set_current_vllm_config`` (the worker's ``init_device`` runs there).
    """
    if not parallel_state.model_parallel_is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="molink_dist_"), "store")
        parallel_state.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"file://{store}",
            local_rank=local_rank,
            backend="gloo",
        )
        parallel_state.ensure_model_parallel_initialized(1, 1)
    replace_pp_group(StagePipelineGroup(pp_rank, pp_world_size))
    logger.info("Stage parallel state: pipeline rank %d of %d", pp_rank, pp_world_size)
