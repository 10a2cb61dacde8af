"""vLLM's pipeline-parallel group, replaced by a description of "pipeline rank r of N".

vLLM's model code asks ``get_pp_group()`` which layers it owns and whether it is the first or last
rank. MoLink stages never use torch.distributed between stages (activations travel over gRPC), so
the PP group is replaced by :class:`StagePipelineGroup`, which only *describes* membership. Any
PP collective (send/recv/broadcast) fails loudly instead of hanging.
"""

from __future__ import annotations

import os

from vllm.distributed import parallel_state


class StagePipelineGroup:
    """A pipeline-parallel group description with no process group behind it.

    Needs from vLLM: the model code reads only these members of the PP ``GroupCoordinator``
    (``rank``, ``ranks``, ``world_size``, ``rank_in_group``, ``local_rank``, ``unique_name``,
    ``first_rank``, ``last_rank``, ``is_first_rank``, ``is_last_rank``, ``next_rank``,
    ``prev_rank``) and calls ``destroy`` at teardown.
    """

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


#: The members of vLLM's ``GroupCoordinator`` that :class:`StagePipelineGroup` stands in for.
PP_GROUP_MEMBERS = (
    "rank",
    "ranks",
    "world_size",
    "rank_in_group",
    "local_rank",
    "unique_name",
    "first_rank",
    "last_rank",
    "is_first_rank",
    "is_last_rank",
    "next_rank",
    "prev_rank",
    "destroy",
)


def replace_pp_group(group: StagePipelineGroup) -> None:
    """Make ``get_pp_group()`` return ``group`` in this process.

    Needs from vLLM: ``vllm.distributed.parallel_state._PP`` is the module global
    ``get_pp_group()`` returns.
    """
    parallel_state._PP = group  # type: ignore[assignment]


def set_pp_layer_partition(partition: list[int] | tuple[int, ...]) -> None:
    """Tell vLLM how many layers each pipeline rank holds (read when the model is built).

    Needs from vLLM: ``get_pp_indices`` reads the split from ``VLLM_PP_LAYER_PARTITION``, a
    comma list with one layer count per rank.
    """
    os.environ["VLLM_PP_LAYER_PARTITION"] = ",".join(map(str, partition))
