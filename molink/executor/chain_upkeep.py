"""How the head's executor keeps a chain serving: losses, rewirings it chooses, and upkeep.

:class:`ChainUpkeep` is the part of :class:`~molink.executor.pipeline_executor.PipelineExecutor`
that reacts when the chain stops serving a failure epoch, and the two threads that watch it:

* a **loss** (a broken stream, an error, or no answer within ``--step-timeout``, seen by the
  watchdog): every pending step is answered as lost, the failure epoch is bumped (the scheduler
  preempts its requests to recompute them) and the maintenance thread wires the next chain;
* a **rewiring the head chooses**, which counts as no loss: a KV resize (a follower needs room
  for another head, so every stage is planned again at fewer blocks; or a head left one, and
  every stage of the chain has room for more, up to what the head's own KV cache holds) or a
  rebalance (a replica would make the chain much cheaper, :mod:`molink.core.rebalance`);
* the **result streams** of the remote stages, which carry the last stage's sampled tokens and
  every stage's notices (leaving, KV shrink and growth offers, replay acknowledgements, errors);
* the **maintenance thread** restores a chain after either, moves off nodes that announce they
  are leaving, takes growth offers, and keeps standbys ready;
* after a loss, the new chain's lost span is **refilled by replay** when it can be
  (:mod:`molink.executor.span_replay`); else every request recomputes.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import grpc
from vllm.logger import init_logger

from molink.comm import codec
from molink.comm.chain import ChainError
from molink.comm.links import timings_from_proto
from molink.core.pipeline_state import KEEPS_KV_CAUSES, lost_output
from molink.executor.span_replay import ReplayFailed
from molink.telemetry import metrics

if TYPE_CHECKING:
    from molink.core.pipeline_state import PipelineState
    from molink.core.rebalance import RebalancePolicy
    from molink.engine.head_config import HeadConfig
    from molink.executor.chain_keeper import ChainKeeper
    from molink.executor.hot_standbys import HotStandbys
    from molink.executor.kv_plan import HeadKVPlan
    from molink.executor.outages import OutageRecord
    from molink.executor.remote_stage import RemoteStage
    from molink.executor.span_replay import SpanReplay

logger = init_logger(__name__)


class ChainUpkeep:
    """Losses, chosen rewirings and the watchdog and maintenance threads of the head's
    executor (a base class of ``PipelineExecutor``, which owns the attributes below)."""

    head: HeadConfig
    state: PipelineState
    chain: ChainKeeper
    outages: OutageRecord
    kv: HeadKVPlan
    rebalance: RebalancePolicy
    _lock: threading.RLock
    _wakeup: threading.Event
    _pending: dict[int, Any]
    _serving_epoch: int
    _growth_offer: int
    _stopped: bool
    replay: SpanReplay | None
    recovery_mode: str
    hot: HotStandbys

    _wired: list[RemoteStage]
    _wired_blocks: int
    _link: Any
    session: Any

    def _start_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def _new_step_id(self) -> int:
        raise NotImplementedError

    def _resolve(self, step_id: int, epoch: int, output: Any, timings: list[Any]) -> None:
        raise NotImplementedError

    def describe_chain(self) -> str:
        raise NotImplementedError

    # ---------------------------------------------------------------- result streams
    def _read_results(self, remote: RemoteStage, call: Any, epoch: int, is_last: bool) -> None:
        """Read one remote stage's result stream until it ends: sampled tokens (the last
        stage), replay acknowledgements, leave notices, KV shrink and growth offers, errors."""
        received = metrics.BYTES_RECEIVED.labels("results")
        try:
            for result in call:
                received.inc(result.ByteSize())
                if result.replayed:
                    if self.replay is not None:
                        self.replay.acknowledged(result.step_id, result.error)
                    continue
                if result.leaving:
                    logger.info("Stage %s says it is leaving", remote)
                    self.chain.mark_leaving(remote.peer_id)
                    self._wakeup.set()
                    continue
                if result.shrink_kv_blocks:
                    self._shrink_kv(result.shrink_kv_blocks, remote)
                    continue
                if result.grow_kv_blocks:
                    self._offer_growth(result.grow_kv_blocks, remote)
                    continue
                if result.error:
                    self._on_failure(result.error, epoch, stage=str(remote))
                    return
                if is_last:
                    output = codec.loads(result.model_runner_output)
                    timings = timings_from_proto(result.timings)
                    self._resolve(result.step_id, result.epoch, output, timings)
            reason = "it closed its result stream"
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and (
                epoch != self._serving_epoch or self._stopped
            ):
                return  # we cancelled it while rewiring
            reason = f"its result stream broke ({e.code().name})"
        except Exception as e:
            reason = f"it sent a bad result: {type(e).__name__}: {e}"
        if not self._stopped:
            self._on_failure(reason, epoch, stage=str(remote))

    # ---------------------------------------------------------------- interruptions
    def _on_failure(self, reason: str, epoch: int, stage: str = "", cause: str = "lost") -> None:
        """A stage (``stage``, if known) or link failed while serving ``epoch``: answer every
        pending step and start recovery. ``cause`` is ``lost``, ``timeout`` or ``leaving``."""
        # What clients and /ready are told, e.g. "lost stage 10.0.0.2:50051 [15-29]: ...".
        full_reason = f"lost stage {stage}: {reason}" if stage else reason
        if self.replay is not None:  # a replay into the new chain of ``epoch`` stops
            self.replay.abort(epoch, full_reason)
        with self._lock:
            if self._stopped or epoch != self.state.failed_epoch or not self.state.chain_ready:
                return
            new_epoch = self.state.interrupt(full_reason, epoch)
            oldest = min((p.submitted_at for p in self._pending.values()), default=None)
            self.outages.lost(stage, reason, cause, new_epoch, oldest)
            self._answer_pending(new_epoch, full_reason)
        self._wakeup.set()

    def _shrink_kv(self, blocks: int, asking: RemoteStage) -> None:
        """``asking`` needs room for another head: use at most ``blocks`` KV blocks from now on.

        Every stage is planned again at that size and the chain is rewired like after a loss
        (the scheduler retires the blocks above ``blocks`` and its requests recompute), but it
        counts as no loss.
        """
        with self._lock:
            if self._stopped or blocks >= self.kv.num_blocks:
                return
            self._resize_kv(
                blocks,
                f"{asking} needs room for another head: this head's KV cache shrinks from "
                f"{self.kv.num_blocks} to {blocks} blocks",
            )

    def _offer_growth(self, blocks: int, offering: RemoteStage | None) -> None:
        """A head left ``offering``: this head may use up to ``blocks`` blocks there (None: a
        shrunk head wired a new chain, which may have room). The maintenance thread takes it
        when every stage of the chain has room too."""
        if offering is not None:
            logger.info("%s offers up to %d KV blocks (another head left)", offering, blocks)
        with self._lock:
            self._growth_offer = max(self._growth_offer, blocks)
        self._wakeup.set()

    def _grow_kv(self) -> None:
        """Take a growth offer: grow to the least that the offer, every stage of the chain and
        the head's own KV cache allow (the chain is rewired as for a shrink)."""
        with self._lock:
            offer, self._growth_offer = self._growth_offer, 0
        blocks = min(offer, self.kv.allocated_blocks)
        if blocks <= self.kv.num_blocks:
            return
        try:
            self.chain.refresh_offers()
        except Exception as e:  # noqa: BLE001  # a stage that fails now is handled as a loss
            logger.warning("Could not ask the chain's stages for room: %s", e)
            return
        blocks = min([blocks, *(self.kv.blocks_offered(r) for r in self.chain.remotes)])
        with self._lock:
            if self._stopped or blocks <= self.kv.num_blocks or not self.state.chain_ready:
                return
            self._resize_kv(
                blocks,
                f"every stage of the chain has room for more: this head's KV cache grows from "
                f"{self.kv.num_blocks} to {blocks} blocks",
            )
        self._restore()

    def _resize_kv(self, blocks: int, reason: str) -> None:
        """Plan every stage at ``blocks`` KV blocks and rewire (caller holds the lock)."""
        self.kv.num_blocks = self.state.kv_blocks_limit = blocks
        for remote in self.chain.held():
            remote.kv_cache_config = self.kv.for_stage(remote, self.chain.remotes)
        self._rewire(reason, "kv_resize")

    def _rewire(self, reason: str, cause: str) -> None:
        """Interrupt the chain without a loss (``cause``: ``kv_resize``, ``rebalance`` or
        ``hot_standby``): the requests recompute (for ``hot_standby``, they keep running and
        every stage keeps its KV cache) and the maintenance thread wires the next chain."""
        with self._lock:
            new_epoch = self.state.interrupt(reason, cause=cause)
            self.outages.rewiring(cause, reason, new_epoch)
            self._answer_pending(new_epoch, reason)
        self._wakeup.set()

    def _answer_pending(self, epoch: int, reason: str) -> None:
        """Answer every step in flight as lost to failure ``epoch`` (caller holds the lock)."""
        pending, self._pending = self._pending, {}
        for step_id in sorted(pending):
            p = pending[step_id]
            if not p.grammar.done():
                p.grammar.set_result(None)
            if not p.future.done():
                p.future.set_result(lost_output(p.scheduler_output, epoch, reason))

    def _refill(self, epoch: int) -> str:
        """After a loss: fill the lost span's new node by replay, if the scheduler kept blocks
        for it (:mod:`molink.executor.span_replay`). Returns how the requests recover, ``replay``
        or ``recompute``. Raises when the chain fails during the replay (restore tries again).
        """
        if epoch == 0 or self.replay is None:
            return "recompute"
        # The scheduler answers at its first sight of a loss; with no request running it may not
        # look (and there is nothing to replay); a rewiring the head chose never has a plan.
        busy = self.state.last_cause in KEEPS_KV_CAUSES and self.state.running_requests > 0
        _, plan = self.state.replay.take(epoch, 10.0 if busy else 0.0)
        if plan is None:
            return "recompute"
        index, reason = self.replay.new_node(self._wired, self.chain.remotes)
        if not reason and self._wired_blocks != self.kv.num_blocks:
            reason = "the KV cache was resized"
        if reason or not plan:
            if reason:
                logger.warning("Recovering by recompute, not replay: %s", reason)
            self.state.replay.finish(epoch, False)
            return "recompute"
        if index is None:  # no stage lost its KV cache
            self.state.replay.finish(epoch, True)
            return "replay"
        node = self.chain.remotes[index]
        plan = self.hot.skip_held(plan, node)
        started = time.monotonic()
        held = self.replay.log.positions
        logger.info(
            "Replaying the logged positions of %d request(s) into %s (the head's own log holds "
            "%d positions in %d bytes each)",
            len(plan),
            node,
            held,
            self.replay.log.nbytes // max(held, 1),
        )
        try:
            assert self._link is not None
            tokens, failed = self.replay.run(
                plan,
                epoch,
                (node.span[0], index == 0),
                self.session.id,
                self._new_step_id,
                self._link.emit,
                self.head.step_timeout,
            )
        except ReplayFailed as e:
            self.state.replay.finish(epoch, False)
            logger.warning("Replay into %s failed (%s): its requests recompute", node, e)
            if self.state.failed_epoch == epoch and not self.replay.aborted:
                return "recompute"
            raise
        self.state.replay.finish(epoch, True, failed)
        logger.info(
            "Replayed %d positions of %d request(s) into %s in %.2f s (%d request(s) recompute); "
            "every other stage kept its KV cache",
            tokens,
            len(plan) - len(failed),
            node,
            time.monotonic() - started,
            len(failed),
        )
        return "replay"

    def _watch(self) -> None:
        """Deadline on steps: a stage that stops answering counts as lost."""
        while not self._stopped:
            time.sleep(1.0)
            with self._lock:
                oldest = min((p.submitted_at for p in self._pending.values()), default=None)
                epoch = self.state.failed_epoch
            if oldest is not None and time.monotonic() - oldest > self.head.step_timeout:
                self._on_failure(
                    f"no result within {self.head.step_timeout:g} s (stage unresponsive)",
                    epoch,
                    cause="timeout",
                )

    def _maintain(self) -> None:
        """Keep a chain serving: restore it after a loss, move off leaving nodes, keep standbys."""
        while not self._stopped:
            self._wakeup.wait(timeout=self.head.swarm_refresh_interval)
            self._wakeup.clear()
            if self._stopped:
                return
            try:
                if not self.state.chain_ready:
                    self._restore()
                elif self.chain.leaving_in_chain():
                    self._move_off_leaving()
                elif self._growth_offer:
                    self._grow_kv()
                else:
                    self.chain.prepare_standbys(self._serving_epoch)
                    self._note_shared_stages()
                    self._heat_standbys()
                    self._rebalance()
            except Exception:  # this thread must outlive any single failure
                logger.exception("chain maintenance failed")

    def _note_shared_stages(self) -> None:
        """Tell the scheduler whether other heads run sequences on a stage of the chain (it then
        keeps one micro-batch in flight: see ``PipelineState.stages_shared``)."""
        shared = self.chain.shares_stages()
        if shared != self.state.stages_shared:
            logger.info(
                "%s",
                "Other heads share a stage of the chain: one micro-batch in flight (their steps "
                "fill its time between this head's)"
                if shared
                else "No other head runs sequences on the chain's stages: micro-batches as the "
                "costs say",
            )
        self.state.stages_shared = shared

    def _heat_standbys(self) -> None:
        """Rewire, keeping every KV cache, when a standby could be hot and isn't yet
        (``--hot-standby``: a standby becomes hot as an epoch starts)."""
        waiting = self.hot.waiting()
        if not waiting or not self.state.chain_ready:
            return
        self._rewire(f"{', '.join(str(s) for s in waiting)} becomes a hot standby", "hot_standby")
        self._restore()

    def _rebalance(self) -> None:
        """Move to less loaded replicas when the policy says so (:mod:`molink.core.rebalance`)."""
        if self.rebalance.after_s <= 0:
            return
        option = self.chain.rebalance_option()
        current, best = option if option is not None else (0.0, None)
        offered = best.cost if best is not None else None
        if not self.rebalance.should_move(current, offered, time.monotonic()) or best is None:
            return
        self._rewire(
            f"moving to less loaded replicas: {best} costs {best.cost * 1e3:.1f} ms per token, "
            f"this chain {current * 1e3:.1f} ms",
            "rebalance",
        )
        self._restore()

    def _move_off_leaving(self) -> None:
        """A node of the chain is leaving: switch to a chain without it, if the swarm has one."""
        leaving = self.chain.leaving_in_chain()
        try:
            self.chain.view.refresh()
            self.chain.plan()
        except ChainError as e:
            logger.warning(
                "%s is leaving, but no other chain exists yet (%s); keeping it while it stays",
                ", ".join(str(r) for r in leaving),
                e,
            )
            return
        self._on_failure(
            "it announced that it is leaving",
            self.state.failed_epoch,
            stage=", ".join(str(r) for r in leaving),
            cause="leaving",
        )
        self._restore()

    def _restore(self) -> None:
        """Build and wire the next chain; retry until one serves or the head stops."""
        last_message, next_log = "", 0.0
        while not self._stopped and not self.state.chain_ready:
            epoch = self.state.failed_epoch
            try:
                # A standby becoming hot changes nothing else (no replica swap to replay).
                keep = self.state.last_cause == "hot_standby"
                remotes, _ = self.chain.prepare_next_chain(keep)
                with self._lock:
                    self.chain.commit(remotes)
                    if epoch != self.state.failed_epoch:
                        continue  # failed again meanwhile: wire it for the newer epoch
                self._start_epoch(epoch)
            except Exception as e:
                message = str(e) or type(e).__name__
                self.state.waiting_for = message
                if message != last_message or time.monotonic() > next_log:
                    logger.warning("Pipeline not restored yet: %s", message)
                    last_message, next_log = message, time.monotonic() + 30
                self._wakeup.wait(timeout=self.head.recovery_poll_interval)
                self._wakeup.clear()
                continue
            self.state.waiting_for = ""
            self.outages.restored(
                epoch, self.describe_chain(), len(self.chain.remotes) + 1, self.recovery_mode
            )
            if self.kv.num_blocks < self.kv.allocated_blocks:  # the new chain may have room
                self._offer_growth(self.kv.allocated_blocks, None)
