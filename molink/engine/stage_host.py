"""A follower node's stage: built on a head's request, fed by the previous stage, shared by every
head that uses the node.

Each head drives its use of the stage in two calls (see ``molink.comm.stage_service``), each naming
the head's secret session id (:mod:`molink.core.head_session`):

* ``InitStage`` builds the worker for a span of the layers this node holds, with the head's
  limits: it loads only that span's weights and allocates the KV cache for all the memory the
  node has. It reports the KV cache spec and the KV bytes this head can claim: the free blocks,
  or its fair share when other heads hold more (:mod:`molink.core.kv_regions`). While other
  heads use the stage, a head must ask for the same span and limits: the node holds one set of
  weights.
* ``StartStage`` claims the head's region of the KV cache (the blocks it planned), forgets the
  head's requests, and wires its output to the next stage (or to the head's result stream).
  When the blocks aren't free, heads over their fair share are asked to shrink, and the claim
  waits up to :data:`SHRINK_WAIT_S` (:mod:`molink.engine.kv_claims`). After a failure the head
  calls it again with a new epoch. A *standby* ``StartStage`` claims nothing; a *hot* one
  claims the blocks and computes the steps the stage before mirrors to it, sending nothing on
  (:mod:`molink.core.hot_standby`).

Steps of every head run in arrival order on the one worker. A head's claim ends when it stops
listening to its result stream (it moved off, left or died), or after ``CLAIM_LEASE_S`` if it
never listened; either frees its region, and heads left below the new fair share may grow to it.
A node that is shutting down tells every head on its stream first.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from vllm.engine.arg_utils import EngineArgs
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import KVCacheConfig

from molink.comm import codec
from molink.comm.links import ResultStream, decode_step
from molink.comm.proto import molink_pb2
from molink.comm.stage_service import StageNotReady
from molink.core.head_session import HeadSession
from molink.core.hot_standby import Hot
from molink.core.kv_regions import KVRegions, Region
from molink.engine.kv_claims import claim_with_shrinks
from molink.engine.session_wiring import close_links, describe, stand_by_hot, wire_next_hop
from molink.engine.stage_config import stage_engine_config
from molink.engine.stage_engine import StageEngine
from molink.engine.stage_fit import difference, kv_plan_misfit, same_worker
from molink.security.swarm_security import SwarmSecurity
from molink.stage_spec import StageConfig
from molink.vllm_compat.kv_cache import kv_cache_bytes, plan_stage_kv_cache

logger = init_logger(__name__)

#: Seconds a head's KV claim lasts before it listens to its result stream.
CLAIM_LEASE_S = 60.0
#: Seconds a claim waits for other heads to shrink to their fair share.
SHRINK_WAIT_S = 60.0
#: Seconds a hot standby may take to run the steps mirrored to it before it changes epoch.
HOT_DRAIN_S = 10.0


class StageHost:
    """The stage a follower serves, for every head that uses it."""

    def __init__(
        self,
        engine_args: EngineArgs,
        model_hash: str,
        layers: tuple[int, int],
        security: SwarmSecurity,
        executor_cls: type,
        join_wait: float = 0.0,
    ) -> None:
        """``layers``: the (start, end) span this node holds; it serves any part of it.
        ``join_wait``: see :class:`~molink.engine.stage_engine.StageEngine`.

        ``executor_cls``: the executor class the stage's vLLM config names (the head's
        :class:`~molink.executor.pipeline_executor.PipelineExecutor`, handed in by the node):
        vLLM's pipeline-parallel check reads its ``supports_pp``; the stage never runs it.
        """
        self.engine_args = engine_args
        self.executor_cls = executor_cls
        self.join_wait = join_wait
        self.model_hash = model_hash
        self.layers = layers
        self.security = security
        self.config: StageConfig | None = None  # what the worker was built for
        self.worker: Any = None
        self.engine: StageEngine | None = None
        # The stage's own KV cache (all its KV memory), allocated at the first StartStage.
        self.kv_cache_config: KVCacheConfig | None = None
        self.regions = KVRegions(0)
        self.block_bytes = 0  # KV bytes of one block, over this stage's layers
        self.kv_capacity_bytes = 0  # measured by the worker once built
        self.sessions: dict[str, HeadSession] = {}
        self.model_dtype: torch.dtype | None = None
        self.pin_activations = False  # decode arriving activations into pinned memory (GPUs)
        self._spec_payload = b""
        self._vllm_config: Any = None
        self._kv_spec: dict[str, Any] = {}
        self._kv_available = 0
        self._lock = threading.RLock()
        self._room_freed = threading.Condition(self._lock)  # a head gave back KV blocks

    @property
    def state(self) -> str:
        """ "idle" (no head yet), "loaded" (built, on standby, hot or not, or between heads) or
        "serving"."""
        if self.engine is None:
            return "idle"
        return "serving" if any(s.hot is None for s in self._serving()) else "loaded"

    @property
    def serving_span(self) -> tuple[int, int] | None:
        """The layers this node's worker is built for (None before a head asked)."""
        if self.config is None:
            return None
        return self.config.placement.start_layer, self.config.placement.end_layer

    @property
    def kv_free_bytes(self) -> int:
        """KV cache bytes no head holds (0 before a head had the stage built)."""
        return self.regions.free_blocks() * self.block_bytes

    def heads(self) -> list[dict[str, Any]]:
        """The heads this stage serves, as ``/status`` lists them (no session secrets).

        Read without the lock (a build holds it for long); a head ending meanwhile is skipped.
        """
        found = (describe(s, self.engine, self.block_bytes) for s in self._serving())
        return [head for head in found if head is not None]

    def init_stage(
        self, config: StageConfig, session_id: str, label: str = ""
    ) -> tuple[bytes, int]:
        """Build the worker (once per span and limits); return (KV spec, KV bytes to claim)."""
        if not session_id:
            raise ValueError("InitStage without a session id (the head runs an older MoLink)")
        if config.model_hash != self.model_hash:
            raise ValueError(f"head serves model {config.model_hash}, this node {self.model_hash}")
        placement = config.placement
        if not self.layers[0] <= placement.start_layer <= placement.end_layer <= self.layers[1]:
            raise ValueError(
                f"asked for layers {placement.start_layer}-{placement.end_layer}; this node "
                f"holds {self.layers[0]}-{self.layers[1]}"
            )
        with self._lock:
            self.expire_claims()
            if not same_worker(self.config, config):
                others = [s for s in self._serving() if s.id != session_id]
                if others:
                    assert self.config is not None
                    raise ValueError(
                        f"this node serves layers {self.config.placement.start_layer}-"
                        f"{self.config.placement.end_layer} for {len(others)} other head(s) with "
                        f"{difference(self.config, config)}; heads sharing a node must ask for "
                        "the same layers and limits"
                    )
                self._build(config)
            session = self.sessions.setdefault(session_id, HeadSession(session_id))
            session.label = label[:64]
            session.config = config
            if config.replay_log_bytes:
                wire = codec.WireFormat.from_names(config.wire_dtype, config.wire_compression)
                self.worker.keep_replay_log(session_id, config.replay_log_bytes, wire.dtype)
            return self._spec_payload, self.regions.offer(
                session_id, self._min_blocks()
            ) * self.block_bytes

    def _min_blocks(self) -> int:
        """Blocks one request of the heads' ``--max-model-len`` needs on this stage (with
        vLLM's reserved null block)."""
        config = self._vllm_config
        needed = sum(spec.max_memory_usage_bytes(config) for spec in self._kv_spec.values())
        return -(-needed // max(self.block_bytes, 1)) + 1

    def _build(self, config: StageConfig) -> None:
        """(Re)build the worker for ``config``; its KV cache comes with the first StartStage
        (caller holds the lock)."""
        from molink.worker.stage_worker import create_stage_worker

        for session in list(self.sessions.values()):
            self._end(session)
        self._shutdown_worker()
        vllm_config = stage_engine_config(self.engine_args, config, self.executor_cls)
        placement = config.placement
        logger.info(
            "Building the stage for layers %d-%d in %s (limits from the head: %s)",
            placement.start_layer,
            placement.end_layer,
            vllm_config.model_config.dtype,
            config.engine_overrides,
        )
        worker = create_stage_worker(vllm_config, placement.rank)
        try:
            spec = worker.get_kv_cache_spec()
            available = int(worker.determine_available_memory())
        except Exception:
            worker.shutdown()
            raise
        self.worker = worker
        self._vllm_config = vllm_config
        self._kv_spec = spec
        self._kv_available = available
        # Until the first head's engine resolves the KV layout, the block count is estimated as
        # vLLM counts it for a uniform model: the memory over every layer's page of a block
        # (or this node's --num-gpu-blocks-override).
        self.block_bytes = sum(s.page_size_bytes for s in spec.values())
        blocks = vllm_config.cache_config.num_gpu_blocks_override
        self.regions = KVRegions(blocks or available // max(self.block_bytes, 1))
        self.kv_capacity_bytes = self.regions.total_blocks * self.block_bytes
        self.kv_cache_config = None
        self._spec_payload = codec.dumps(spec)
        self.model_dtype = vllm_config.model_config.dtype
        self.pin_activations = worker.staging.pin_memory
        self.engine = StageEngine(
            worker, (placement.start_layer, placement.end_layer), join_wait=self.join_wait
        )
        self.config = config

    def _allocate_kv(self, head_plan: KVCacheConfig) -> None:
        """Allocate the KV cache for every head, in the groups and layout of the first head's
        plan (caller holds the lock; no head holds blocks yet)."""
        if head_plan.kv_cache_layout is not None:  # the planner reads it
            self.worker.set_kv_cache_layout(head_plan.kv_cache_layout)
        own = plan_stage_kv_cache(self._vllm_config, self._kv_spec, self._kv_available, head_plan)
        try:
            self.worker.initialize_from_config([own])
            self.worker.compile_or_warm_up_model()
        except Exception:
            assert self.config is not None
            self._build(self.config)  # a half-initialized worker can't be retried
            raise
        self.kv_cache_config = own
        self.regions = KVRegions(own.num_blocks)
        self.block_bytes = kv_cache_bytes(own) // max(own.num_blocks, 1)
        self.kv_capacity_bytes = own.num_blocks * self.block_bytes
        logger.info(
            "KV cache: %d blocks (%.2f GiB) for the heads this node serves",
            own.num_blocks,
            self.kv_capacity_bytes / 2**30,
        )

    def start_stage(
        self,
        session_id: str,
        kv_cache_config: KVCacheConfig,
        next_address: str,
        epoch: int,
        standby: bool = False,
        hot: Hot | None = None,
    ) -> list[int]:
        """Claim the head's KV blocks; unless ``standby``, reset and wire the head's ``epoch``.

        With ``hot``, a standby claims its blocks too and computes the head's steps that the
        stage before it mirrors (``hot.standby``); a serving stage mirrors its steps to
        ``hot.mirror_address``. A hot standby first runs the mirrored steps of the epoch it
        followed (``hot.drain``), and returns what its KV blocks hold (see
        :class:`~molink.core.hot_standby.KVValidity`); others return [].

        Raises ``ValueError`` (:class:`~molink.core.kv_regions.NoRoom`) when the head's plan
        doesn't fit.
        """
        hot = hot or Hot()
        with self._lock:
            self.expire_claims()
            session = self.sessions.get(session_id)
            if self.engine is None or session is None or session.config is None:
                raise StageNotReady("StartStage before InitStage")
            if not same_worker(self.config, session.config):
                raise StageNotReady("this node was rebuilt for another head since InitStage")
            if self.kv_cache_config is None:
                self._allocate_kv(kv_cache_config)
            why = kv_plan_misfit(kv_cache_config, self.kv_cache_config)
            if why:
                raise ValueError(f"the head's KV cache plan doesn't fit this stage: {why}")
            if standby and not hot.standby:
                logger.info("Standing by for layers %d-%d", *self.serving_span)  # type: ignore[str-format]
                return []
            session.region = self._claim(session, kv_cache_config.num_blocks)
            close_links(session)
            if session.hot is not None and hot.forget:  # a hot standby changing epoch
                session.hot.clear("the stage before it was lost")
            elif session.hot is not None:
                session.hot.drain(*hot.drain, HOT_DRAIN_S)
            session.results = results = ResultStream(epoch)
            session.listening = False
            session.claimed_at = time.monotonic()
            if standby:
                block_size = self._vllm_config.cache_config.block_size
                stand_by_hot(self.engine, session, epoch, self.serving_span, block_size)  # type: ignore[arg-type]
                return []
            sink = wire_next_hop(session, results, next_address, hot.mirror_address, self.security)
            held = self.engine.start_epoch(session, epoch, sink)
            session.hot = None
            logger.info(
                "Serving layers %d-%d for head %s, epoch %d -> %s (%d KV blocks: %s)",
                *self.serving_span,  # type: ignore[misc]
                session.label or "?",
                epoch,
                next_address or "the head (last stage)",
                session.region.blocks,
                ", ".join(f"{a}-{a + n - 1}" for a, n in session.region.runs()),
            )
            if held:
                logger.info(
                    "This node was the head's hot standby: its KV cache holds %d positions",
                    sum(held),
                )
            return held

    def steps_broken(self, session_ids: set[str]) -> None:
        """A stream of steps for these heads broke off: a hot standby among them may have missed
        steps, so what its KV cache holds is forgotten."""
        for session_id in session_ids:
            session = self.sessions.get(session_id)
            if session is not None and session.hot is not None:
                session.hot.clear("its step stream broke")

    def _claim(self, session: HeadSession, blocks: int) -> Region:
        """Claim ``blocks`` for ``session``, asking heads over their share to shrink."""

        def ask(owner: str, share: int) -> None:
            other = self.sessions[owner]
            if other.results is None:
                return
            logger.info(
                "Asking head %s to shrink to %d KV blocks: head %s needs room",
                other.label or "?",
                share,
                session.label or "?",
            )
            other.results.ask_to_shrink(share)

        return claim_with_shrinks(
            self.regions, session.id, blocks, ask, self._room_freed, SHRINK_WAIT_S
        )

    def submit(self, msg: molink_pb2.Step) -> None:
        """Decode a step from the previous stage and queue it for compute."""
        engine = self.engine
        if engine is None:
            raise StageNotReady("steps before InitStage")
        engine.submit(decode_step(msg, self.model_dtype, self.pin_activations))

    def result_stream(self, session_id: str, epoch: int) -> ResultStream:
        session = self.sessions.get(session_id)
        results = session.results if session else None
        if session is None or results is None or results.epoch != epoch:
            raise StageNotReady(f"no result stream for epoch {epoch} of this head")
        session.listening = True
        return results

    def release(self, session_id: str, results: ResultStream) -> None:
        """The head stopped listening to ``results``: stop serving it and free its KV blocks."""
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None or session.results is not results:
                return
            self._end(session)
            logger.info("Head %s released this stage", session.label or "?")
            self._offer_growth()

    def announce_leaving(self) -> bool:
        """Tell every head this node is leaving; False if no head is using it."""
        serving = self._serving()
        for session in serving:
            session.results.report_leaving()
        return bool(serving)

    def wait_released(self, timeout: float) -> bool:
        """Wait until no head uses this stage; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._serving():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def shutdown(self) -> None:
        """Close every head's links and stop the compute thread, as the process ends. vLLM's
        worker teardown is skipped (it collects the whole heap: seconds of CPU)."""
        with self._lock:
            for session in list(self.sessions.values()):
                close_links(session)
            if self.engine is not None:
                self.engine.shutdown()

    def _serving(self) -> list[HeadSession]:
        return [s for s in list(self.sessions.values()) if s.results is not None]

    def expire_claims(self) -> None:
        """End claims whose head never listened to its result stream within CLAIM_LEASE_S."""
        with self._lock:
            now = time.monotonic()
            for session in self._serving():
                if not session.listening and now - session.claimed_at > CLAIM_LEASE_S:
                    logger.info("Head %s never came for its results: freeing its KV", session.label)
                    self._end(session)
                    self._offer_growth()

    def _end(self, session: HeadSession) -> None:
        """Stop serving ``session``: links closed, requests forgotten, KV blocks freed."""
        close_links(session)
        if self.engine is not None and session.id in self.engine.sessions:
            self.engine.end_session(session)
        self.regions.release(session.id)
        session.region = None
        session.hot = None  # its blocks may go to another head
        self._room_freed.notify_all()

    def _offer_growth(self) -> None:
        """A head left: offer the heads below the new fair share to grow to it (under lock)."""
        for owner, share in self.regions.growth_offers().items():
            if (other := self.sessions.get(owner)) and other.results is not None:
                logger.info("Offering head %s up to %d KV blocks", other.label or "?", share)
                other.results.offer_growth(share)

    def _shutdown_worker(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.worker is not None:
            try:
                self.worker.shutdown()
            except Exception:
                logger.exception("worker shutdown failed")
            self.worker = None
        self.config = None
        self.kv_cache_config = None
        self.regions = KVRegions(0)
