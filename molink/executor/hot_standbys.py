"""The head's hot standbys (``--hot-standby``, see :mod:`molink.core.hot_standby`): which standbys
compute beside the chain, how each epoch wires them, and what a former one holds when it takes
over a lost span.

A standby is made hot at the start of an epoch, before the stage ahead of its span starts to
mirror to it, so it sees every step of the epoch from the first. When its standbys change, the
head rewires without a loss (cause ``hot_standby``: every stage keeps its KV cache and the
requests keep running); the standby then holds what the requests compute from there on.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc
from vllm.logger import init_logger

from molink.comm import codec
from molink.comm.links import NextHopLink, standby_link
from molink.core.hot_standby import Hot, StandbyMirror, held_positions, valid_prefix
from molink.core.replay_plan import ReplayPlan

if TYPE_CHECKING:
    from molink.executor.chain_keeper import ChainKeeper
    from molink.executor.remote_stage import RemoteStage
    from molink.security.swarm_security import SwarmSecurity

logger = init_logger(__name__)

#: Seconds a standby that could not be made hot is left cold.
REFUSED_S = 300.0


class HotStandbys:
    """The hot standbys of one head's chain."""

    def __init__(
        self,
        enabled: bool,
        chain: ChainKeeper,
        wire: codec.WireFormat,
        block_size: int,
        timeout: float,
    ) -> None:
        """``timeout``: seconds a standby's ``StartStage`` may take."""
        self.enabled = enabled
        self.chain = chain
        self.wire = wire
        self.block_size = block_size
        self.timeout = timeout
        self.by_index: dict[int, RemoteStage] = {}  # of the epoch last wired, by chain stage
        self._held: dict[int, list[int]] = {}  # id(remote) -> what it held as it took a span
        self._refused: dict[str, float] = {}  # peer id -> until when it is not asked again

    def _wanted(self) -> dict[int, RemoteStage]:
        if not self.enabled:
            return {}
        now = time.monotonic()
        left_out = self.chain.describe_exclusions()  # dead, refused or leaving
        return {
            index: standby
            for index, standby in self.chain.hot_standbys().items()
            if self._refused.get(standby.peer_id, 0.0) < now and standby.peer_id not in left_out
        }

    def waiting(self) -> list[RemoteStage]:
        """Standbys that could be hot and are not (a rewiring makes them hot)."""
        return [s for s in self._wanted().values() if not s.hot]

    def orphaned(self, wired: list[RemoteStage]) -> set[int]:
        """The hot standbys of the chain ``wired`` last (by ``id``) whose stage before (a node of
        that chain) is not in the chain now: lost, so they may have missed steps it sent."""
        now = {id(r) for r in self.chain.remotes}
        return {
            id(standby)
            for index, standby in self.by_index.items()
            if index > 0 and index - 1 < len(wired) and id(wired[index - 1]) not in now
        }

    def start(self, epoch: int, drain: tuple[int, int], orphaned: set[int]) -> None:
        """Before the chain's stages start for ``epoch``: start its hot standbys for it, and let
        go of those no longer wanted. ``drain``: the epoch they followed and the last step the
        head sent in it (they run every step up to it first); ``orphaned``: see
        :meth:`orphaned` (they forget what they hold)."""
        wanted = self._wanted()
        for standby in self.chain.standbys():
            if standby.hot and standby not in wanted.values():
                standby.release()
                standby.hot = False
        self.by_index = {}
        for index, standby in wanted.items():
            try:
                hot = Hot(True, drain=drain, forget=id(standby) in orphaned)
                standby.start(epoch, "", self.timeout, standby=True, hot=hot)
                call = standby.subscribe(epoch)
            except grpc.RpcError as e:
                logger.warning(
                    "Could not make %s a hot standby (%s: %s); not asking again for %.0f s",
                    standby,
                    e.code().name,
                    e.details(),
                    REFUSED_S,
                )
                self._refused[standby.peer_id] = time.monotonic() + REFUSED_S
                standby.release()
                standby.hot = False
                continue
            threading.Thread(
                target=self._watch_results, args=(standby, call), name="molink-hot", daemon=True
            ).start()
            self.by_index[index] = standby

    def mirror_address(self, index: int) -> str:
        """Where stage ``index - 1`` of the chain mirrors its steps ("" when nowhere)."""
        standby = self.by_index.get(index)
        return standby.address if standby is not None else ""

    def started(self, remote: RemoteStage, held: list[int]) -> None:
        """``remote`` started as a stage of the chain; ``held``: what its KV cache holds, when
        it was a hot standby (see :meth:`skip_held`)."""
        remote.hot = False
        if held:
            self._held[id(remote)] = held
        else:
            self._held.pop(id(remote), None)

    def head_sink(self, link: NextHopLink, security: SwarmSecurity) -> Any:
        """The head's link to stage 1, mirrored to stage 1's hot standby if it has one."""
        standby = self.by_index.get(0)
        if standby is None:
            return link
        return StandbyMirror(link, standby_link(standby.address, self.wire, security))

    def _watch_results(self, standby: RemoteStage, call: Any) -> None:
        """Read a hot standby's result stream (it keeps the standby's claim alive) until the
        head lets go of the standby or takes it into the chain: its errors are logged; when it
        says it is leaving, the head lets go of it at once (so that it may exit)."""
        try:
            for result in call:
                if result.error:
                    logger.warning("Hot standby %s: %s", standby, result.error)
                if result.leaving:
                    logger.info("Hot standby %s is leaving: letting go of it", standby)
                    self.chain.mark_leaving(standby.peer_id)
                    standby.release()
                    standby.hot = False
                    return
        except grpc.RpcError:
            pass

    def skip_held(self, plan: ReplayPlan, node: RemoteStage) -> ReplayPlan:
        """``plan`` less the positions ``node``, the lost span's new node, holds already as a
        former hot standby: each request is replayed from the first position it lacks."""
        held = self._held.pop(id(node), None)
        if not held:
            return plan
        held_at = held_positions(held)
        left: ReplayPlan = {}
        total = kept = 0
        for req_id, item in plan.items():
            start = min(valid_prefix(item.block_ids, held_at, self.block_size), item.num_tokens)
            total += item.num_tokens
            kept += start
            if start < item.num_tokens:
                left[req_id] = dataclasses.replace(item, start=start)
        logger.info(
            "%s was the hot standby: its KV cache holds %d of the %d positions to refill "
            "(%d request(s) complete); replaying the other %d",
            node,
            kept,
            total,
            len(plan) - len(left),
            total - kept,
        )
        return left
