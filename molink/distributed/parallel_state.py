"""Make one process look like "pipeline rank r of N" to vLLM, without any peer process.

vLLM's model code asks ``get_pp_group()`` which layers it owns and whether it is the first or last
rank. MoLink stages never use torch.distributed between stages (activations travel over gRPC), so
each stage gets a private one-process world (gloo, size 1) for vLLM's TP/PP/DP bookkeeping, and then
the PP group is replaced by :class:`StagePipelineGroup`, which only *describes* membership. Any PP
collective (send/recv/broadcast) fails loudly instead of hanging.
"""

from __future__ import annotations

import os
import tempfile

from vllm.distributed import parallel_state
from vllm.logger import init_logger

logger = init_logger(__name__)


class StagePipelineGroup:
    """A pipeline-parallel group description with no process group behind it."""

    def __init__(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"pipeline rank {rank} outside world of {world_size}")
        self.rank = rank
        self.ranks = list(range(world_size))
        self.world_size = world_size
        self.rank_in_group = rank
        self.local_rank = 0
        self.unique_name = f"molink_pp:{rank}"

    @property
    def first_rank(self) -> int:
        return self.ranks[0]

    @property
    def last_rank(self) -> int:
        return self.ranks[-1]

    @property
    def is_first_rank(self) -> bool:
        return self.rank == self.first_rank

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.last_rank

    @property
    def next_rank(self) -> int:
        return self.ranks[(self.rank + 1) % self.world_size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.rank - 1) % self.world_size]

    def destroy(self) -> None:
        """Nothing to release (called by vLLM's teardown)."""

    def __getattr__(self, name: str):
        raise RuntimeError(
            f"MoLink stage {self.rank}: pipeline collective '{name}' is not available; "
            "activations travel between stages over gRPC"
        )


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
    parallel_state._PP = StagePipelineGroup(pp_rank, pp_world_size)  # type: ignore[assignment]
    logger.info("Stage parallel state: pipeline rank %d of %d", pp_rank, pp_world_size)
