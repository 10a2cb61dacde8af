"""One head's use of a stage that several heads share: its KV region, epoch, sink and links.

A follower keeps one :class:`HeadSession` per head that uses it, keyed by a secret id the head
makes at start and sends with every call and step. Steps of every session run on the stage's
one model runner and persistent batch, several heads' steps in one pass when they wait together
(:mod:`molink.engine.stage_engine`); a head can't name another head's requests
(:mod:`molink.core.request_owners`). Before a step runs, :meth:`HeadSession.admit` checks
that every block id is inside the head's plan (``0 .. region.blocks-1``) and maps it to the
head's region of the stage's KV cache (``region.ids[i]``), so a head can't reach another's KV
blocks either.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput

from molink.core.hot_standby import KVValidity
from molink.core.kv_regions import Region
from molink.stage_spec import StageConfig


class StepRefused(ValueError):
    """A step names KV blocks outside its head's plan, or its head claimed none."""


@dataclass
class HeadSession:
    """What a stage keeps for one head."""

    id: str
    label: str = ""  # what the head says it is (its peer id), for display only
    # The head's own stage (stage 0 on the head): its block ids as they are, every request.
    owns_all: bool = False
    config: StageConfig | None = None  # what the head asked for in InitStage
    region: Region | None = None  # the KV blocks it claimed (StartStage)
    epoch: int = 0
    sink: Any = None  # molink.core.step.StepSink: where this head's step outputs go
    results: Any = None  # molink.comm.links.ResultStream the head listens to
    next_link: Any = None  # molink.comm.links.NextHopLink to the next stage of its chain
    listening: bool = False  # the head subscribed to ``results``
    # Set while this stage is the head's hot standby (molink.core.hot_standby) and after, until
    # the head takes it into its chain: what its KV blocks hold.
    hot: KVValidity | None = None
    claimed_at: float = field(default_factory=time.monotonic)

    def admit(self, so: SchedulerOutput) -> None:
        """Check ``so`` (a step of this head) and map its block ids into the head's region.

        Changes ``so`` in place; on :class:`StepRefused` the step must not run (it may be half
        moved).
        """
        if self.owns_all:
            return
        if self.region is None:
            raise StepRefused("this head holds no KV blocks on this stage (no StartStage)")
        for req in so.scheduled_new_reqs:
            req.block_ids = self._move(req.block_ids)
        cached = so.scheduled_cached_reqs
        cached.new_block_ids = [
            None if ids is None else self._move(ids) for ids in cached.new_block_ids
        ]
        if so.new_block_ids_to_zero:
            so.new_block_ids_to_zero = self._move((so.new_block_ids_to_zero,))[0]
        if so.kv_cache_block_copies:  # (src, dst) block pairs to copy, e.g. Mamba state
            if not all(type(c).__name__ == "KVCacheBlockCopy" for c in so.kv_cache_block_copies):
                raise StepRefused("kv_cache_block_copies holds something else than block copies")
            so.kv_cache_block_copies = [
                copy._replace(src_block_id=src, dst_block_id=dst)
                for copy, (src, dst) in zip(
                    so.kv_cache_block_copies,
                    self._move((c.src_block_id, c.dst_block_id) for c in so.kv_cache_block_copies),
                    strict=True,
                )
            ]

    def _move(self, groups: Iterable[Iterable[int]]) -> tuple[list[int], ...]:
        """Block ids per KV cache group, from the head's numbering to the stage's."""
        assert self.region is not None
        region = self.region.ids
        blocks = len(region)
        moved = []
        for ids in groups:
            out = []
            for b in ids:
                if type(b) is not int or not 0 <= b < blocks:
                    raise StepRefused(f"block id {b!r} is outside this head's {blocks} blocks")
                out.append(region[b])
            moved.append(out)
        return tuple(moved)
