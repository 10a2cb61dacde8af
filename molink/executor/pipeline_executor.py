"""The head's vLLM executor: stage 0 in-process, the other stages over gRPC.

vLLM runs with ``pipeline_parallel_size = 2`` (the head's layers, and the rest of the chain, however
many hops it has now or after a loss), so its scheduler and batch queue do the bookkeeping:
EngineCore keeps several batches in flight (``--max_micro_batches``) and calls ``execute_model``
then ``sample_tokens`` for each. This executor:

* builds the local stage-0 worker and asks every remote stage to build its own (``InitStage``),
  so vLLM plans the KV cache at the minimum block count over all stages;
* pushes each scheduler output into stage 0; stage 0 streams activations to stage 1, and so on;
  the last stage streams sampled tokens straight back here (``Results``);
* records how long each stage computed each step and how long the rest of the round trip took,
  for the scheduler's micro-batching policy (:mod:`molink.core.micro_batching`);
* never raises from a step: when a stage is lost (a broken stream, an error, or no answer within
  ``--step-timeout``), every pending step is answered with a
  :class:`~molink.core.pipeline_state.StageLostOutput` and the failure epoch is bumped (the
  scheduler then preempts the affected requests to recompute them); its :class:`ChainKeeper`
  builds the next chain from the swarm and the pipeline serves again.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
from vllm.logger import init_logger
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from molink.comm import codec
from molink.comm.chain import ChainError
from molink.comm.links import NextHopLink, timings_from_proto
from molink.core.head_session import HeadSession
from molink.core.micro_batching import StageTiming
from molink.core.pipeline_state import PIPELINE_STATE, epoch_of, lost_output
from molink.core.rebalance import RebalancePolicy
from molink.core.request_snapshot import snapshots_of
from molink.core.step import StageOutput, StepWork
from molink.engine.head_config import HeadConfig
from molink.engine.stage_config import head_engine_overrides
from molink.engine.stage_engine import StageEngine
from molink.executor.chain_keeper import ChainKeeper, StageRefused
from molink.executor.outages import OutageRecord
from molink.executor.remote_stage import RemoteStage
from molink.stage_spec import StageConfig, StagePlacement
from molink.telemetry import metrics
from molink.telemetry.engine_metrics import PIPELINE_SNAPSHOT_RPC, export_metrics
from molink.telemetry.step_trace import TRACE_ATTR
from molink.vllm_compat.engine_config import install_batch_queue_bound
from molink.vllm_compat.executor import ExecutorHooks
from molink.vllm_compat.kv_cache import plan_kv_cache_with_blocks
from molink.worker.stage_worker import create_stage_worker

logger = init_logger(__name__)


@dataclass
class _PendingStep:
    scheduler_output: SchedulerOutput
    future: Future
    grammar: Future
    epoch: int
    submitted_at: float
    encode_s: float = 0.0


def _done(result: Any) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _trace(
    step_id: int, pending: _PendingStep, timings: list[StageTiming], round_trip_s: float
) -> dict[str, Any]:
    """The executor's part of a step's trace record (:mod:`molink.telemetry.step_trace`)."""
    return {
        "step": step_id,
        "tokens": pending.scheduler_output.total_num_scheduled_tokens,
        "encode_ms": pending.encode_s * 1e3,
        "stages": [
            {
                "arrived": t.arrived_unix,
                "done": t.done_unix,
                "decode_ms": t.decode_s * 1e3,
                "wait_ms": t.wait_s * 1e3,
                "compute_ms": t.compute_s * 1e3,
            }
            for t in timings
        ],
        "result": time.time(),
        "round_trip_ms": round_trip_s * 1e3,
    }


def _changes_stage_state(scheduler_output: SchedulerOutput) -> bool:
    """Whether a step without tokens still changes what stages hold (requests to drop, ...)."""
    so = scheduler_output
    return bool(
        so.finished_req_ids
        or so.preempted_req_ids
        or so.scheduled_new_reqs
        or so.scheduled_cached_reqs.req_ids
        or so.free_encoder_mm_hashes
        or so.kv_connector_metadata is not None
        or so.ec_connector_metadata is not None
    )


class _LocalResults:
    """Sink of a single-stage pipeline: the head's stage 0 is also the last stage."""

    def __init__(self, executor: PipelineExecutor) -> None:
        self.executor = executor

    def emit(self, work: StepWork, output: StageOutput) -> None:
        if work.sample:
            self.executor._resolve(work.step_id, work.epoch, output, work.timings)

    def fail(self, work: StepWork, error: str) -> None:
        self.executor._on_failure(error, work.epoch, stage=self.executor.engine.name)


class PipelineExecutor(ExecutorHooks):
    """vLLM executor that drives a chain of MoLink stages."""

    supports_pp = True

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return False

    # ---------------------------------------------------------------- set-up
    def init_executor(self) -> None:
        # Before EngineCore sizes its batch queue (after building this executor).
        install_batch_queue_bound()
        self.head = HeadConfig.from_vllm_config(self.vllm_config)
        self.state = PIPELINE_STATE
        self.state.outage_timeout = self.head.outage_timeout
        self.wire = codec.WireFormat.from_names(self.head.wire_dtype, self.head.wire_compression)
        self.num_layers = self.head.placement.num_layers
        # This head's secret id on every stage it uses (stages may serve several heads).
        self.session = HeadSession(secrets.token_hex(16), owns_all=True)
        self.chain = ChainKeeper(self.head, self._stage_config, self._plan_kv, self.session.id)
        self._lock = threading.RLock()
        self._pending: dict[int, _PendingStep] = {}
        self._awaiting_sample: deque[tuple[Future, Future]] = deque()
        self._next_step_id = 1
        self._serving_epoch = 0
        self._link: NextHopLink | None = None
        self._local_kv_spec: dict[str, KVCacheSpec] | None = None
        self._num_blocks = 0
        self._stopped = False
        self._wakeup = threading.Event()
        self.outages = OutageRecord()
        self.rebalance = RebalancePolicy(self.head.rebalance_after)

        logger.info(
            "MoLink pipeline: head serves layers 0-%d of %d; remote stages %s",
            self.head.placement.end_layer,
            self.num_layers,
            [str(r) for r in self.chain.remotes],
        )
        # Remote stages load their weights while the head loads its own.
        self._init_error: Exception | None = None
        init = threading.Thread(target=self._init_remotes, name="molink-init", daemon=True)
        init.start()
        self.worker = create_stage_worker(self.vllm_config, 0)
        init.join()
        if self._init_error is not None:
            raise self._init_error
        self.engine = StageEngine(self.worker, (0, self.head.placement.end_layer))
        self._watchdog = threading.Thread(target=self._watch, name="molink-watchdog", daemon=True)
        self._maintainer = threading.Thread(target=self._maintain, name="molink-chain", daemon=True)

    def _init_remotes(self) -> None:
        try:
            self.chain.init_stages()
        except Exception as e:  # raised on the engine thread
            self._init_error = e

    def _stage_config(self, remote: RemoteStage) -> StageConfig:
        start, end = remote.span
        return StageConfig(
            placement=StagePlacement(start, end, self.num_layers),
            model_hash=self.head.model_hash,
            engine_overrides=head_engine_overrides(self.vllm_config),
            wire_dtype=self.head.wire_dtype,
            wire_compression=self.head.wire_compression,
        )

    def _plan_kv(self, remote: RemoteStage, chain: list[RemoteStage]) -> KVCacheConfig:
        """The KV cache of a stage joining a running pipeline: the head's block count, its layers.

        vLLM planned every stage at the same number of blocks when the engine started; a new
        stage must hold exactly that many, or the head's block ids would not fit.
        """
        config = self._kv_plan(remote, chain)
        needed = sum(t.size for t in config.kv_cache_tensors)
        if config.num_blocks != self._num_blocks or needed > remote.available_kv_bytes:
            raise StageRefused(
                f"{remote} has room for {remote.available_kv_bytes} bytes of KV cache; this "
                f"head's plan of {self._num_blocks} blocks needs {needed}"
            )
        return config

    def _kv_plan(self, remote: RemoteStage, chain: list[RemoteStage]) -> KVCacheConfig:
        """``remote``'s KV cache plan at the head's block count (beside the stages of ``chain``)."""
        assert self._local_kv_spec is not None and remote.kv_cache_spec is not None
        others = [r for r in chain if r is not remote and r.kv_cache_spec is not None]
        specs = [self._local_kv_spec, *(r.kv_cache_spec for r in others), remote.kv_cache_spec]
        return plan_kv_cache_with_blocks(self.vllm_config, specs, self._num_blocks)

    def get_kv_cache_specs(self) -> list[dict[str, KVCacheSpec]]:
        self._local_kv_spec = self.worker.get_kv_cache_spec()
        return [self._local_kv_spec] + [r.kv_cache_spec for r in self.chain.remotes]

    def determine_available_memory(self) -> list[int]:
        """KV bytes per stage: vLLM plans every stage at the same block count, the minimum.

        A remote stage offers what other heads left free on it, or this head's fair share of it
        (the heads holding more then shrink when this head claims its blocks); one that can't
        hold a single request of ``max_model_len`` is refused here, with the reason, before
        vLLM's own check.
        """
        local = self.worker.determine_available_memory()
        for remote in self.chain.remotes:
            assert remote.kv_cache_spec is not None
            needed = sum(
                spec.max_memory_usage_bytes(self.vllm_config)
                for spec in remote.kv_cache_spec.values()
            )
            if remote.available_kv_bytes < needed:
                raise StageRefused(
                    f"{remote} has no room for this head's KV cache: {remote.available_kv_bytes} "
                    f"bytes free, and neither they nor a fair share beside the heads it serves "
                    f"hold one request of --max-model-len "
                    f"{self.vllm_config.model_config.max_model_len} ({needed} bytes)"
                )
        return [local] + [r.available_kv_bytes for r in self.chain.remotes]

    def initialize_from_config(self, kv_cache_configs: list[KVCacheConfig]) -> None:
        self.worker.initialize_from_config(kv_cache_configs)
        for remote, config in zip(self.chain.remotes, kv_cache_configs[1:], strict=True):
            remote.kv_cache_config = config
        self._num_blocks = kv_cache_configs[0].num_blocks
        logger.info("KV cache: %d blocks on every stage", self._num_blocks)
        self._start_epoch(0)
        self.outages.restored(0, self.describe_chain(), len(self.chain.remotes) + 1)
        self._watchdog.start()
        self._maintainer.start()

    # ---------------------------------------------------------------- wiring
    def _start_epoch(self, epoch: int) -> None:
        """(Re)start every stage for ``epoch``: reset, allocate KV, wire hops, subscribe."""
        remotes = self.chain.remotes
        if self._link is not None:
            self._link.close()
            self._link = None
        for i in reversed(range(len(remotes))):  # last stage first: its successor must exist
            nxt = remotes[i + 1].address if i + 1 < len(remotes) else ""
            try:
                remotes[i].start(epoch, nxt, self.head.stage_init_timeout)
            except grpc.RpcError as e:
                self.chain.exclude(remotes[i].peer_id, f"StartStage failed: {e.code().name}")
                raise
        for rank, remote in enumerate(remotes, 1):
            call = remote.subscribe(epoch)
            threading.Thread(
                target=self._read_results,
                args=(remote, call, epoch, rank == len(remotes)),
                name=f"molink-results{rank}",
                daemon=True,
            ).start()
        if remotes:
            first = remotes[0]
            sink: Any = NextHopLink(
                first.address,
                self.wire,
                on_broken=lambda reason: self._on_failure(
                    f"the link to it broke ({reason})", epoch, stage=str(first)
                ),
                security=self.chain.security,
            )
            self._link = sink
        else:
            sink = _LocalResults(self)
        self.engine.start_epoch(self.session, epoch, sink)
        self.state.costs.reset(
            [self.head.head_host] + [r.address.rpartition(":")[0] for r in remotes]
        )
        self._serving_epoch = epoch
        self.rebalance.wired(time.monotonic())
        self.state.mark_ready(epoch)

    def _read_results(self, remote: RemoteStage, call: Any, epoch: int, is_last: bool) -> None:
        received = metrics.BYTES_RECEIVED.labels("results")
        try:
            for result in call:
                received.inc(result.ByteSize())
                if result.leaving:
                    logger.info("Stage %s says it is leaving", remote)
                    self.chain.mark_leaving(remote.peer_id)
                    self._wakeup.set()
                    continue
                if result.shrink_kv_blocks:
                    self._shrink_kv(result.shrink_kv_blocks, remote)
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

    # ---------------------------------------------------------------- steps
    def execute_model(  # type: ignore[override]
        self, scheduler_output: SchedulerOutput, non_block: bool = False
    ) -> Any:
        """Queue one scheduler output into stage 0; its tokens come from ``sample_tokens``."""
        epoch = epoch_of(scheduler_output)
        has_tokens = scheduler_output.total_num_scheduled_tokens > 0
        if not has_tokens and not _changes_stage_state(scheduler_output):
            # Nothing for any stage to do or learn (vLLM fills its batch queue with these).
            return _done(EMPTY_MODEL_RUNNER_OUTPUT) if non_block else EMPTY_MODEL_RUNNER_OUTPUT
        # Encoded now, on the engine thread: the scheduler may reuse the object after we return.
        snapshots = snapshots_of(scheduler_output)
        encode_started = time.monotonic()
        encoded = codec.dumps_step(scheduler_output, snapshots) if self.chain.remotes else b""
        encode_s = time.monotonic() - encode_started
        with self._lock:
            live = epoch == self.state.failed_epoch and self.state.chain_ready
            step_id = self._next_step_id
            self._next_step_id += 1
            future: Future = Future()
            grammar: Future = Future()
            if has_tokens:
                self._awaiting_sample.append((future, grammar))
                if live:
                    self._pending[step_id] = _PendingStep(
                        scheduler_output, future, grammar, epoch, time.monotonic(), encode_s
                    )
                else:  # a batch of a broken chain: answer at once, run nowhere
                    future.set_result(
                        lost_output(
                            scheduler_output, self.state.failed_epoch, self.state.last_error
                        )
                    )
            if live:
                self.engine.submit(
                    StepWork(
                        step_id=step_id,
                        epoch=epoch,
                        scheduler_output=scheduler_output,
                        scheduler_output_bytes=encoded,
                        snapshots=snapshots,
                        sample=has_tokens,
                        grammar=grammar.result,
                        session=self.session.id,
                    )
                )
        # With tokens scheduled, EngineCore takes the output from sample_tokens().
        result = None if has_tokens else EMPTY_MODEL_RUNNER_OUTPUT
        return _done(result) if non_block else result

    def sample_tokens(  # type: ignore[override]
        self, grammar_output: GrammarOutput | None, non_block: bool = False
    ) -> Any:
        """The sampled tokens of the oldest step that scheduled tokens (FIFO with execute)."""
        with self._lock:
            future, grammar = self._awaiting_sample.popleft()
        if not grammar.done():
            grammar.set_result(grammar_output)
        return future if non_block else future.result()

    def _resolve(
        self,
        step_id: int,
        epoch: int,
        output: ModelRunnerOutput | Any,
        timings: list[StageTiming],
    ) -> None:
        with self._lock:
            pending = self._pending.pop(step_id, None)
        if pending is None or pending.epoch != epoch:
            return
        round_trip = time.monotonic() - pending.submitted_at
        if self.head.step_trace and output is not None:
            setattr(output, TRACE_ATTR, _trace(step_id, pending, timings, round_trip))
        if not pending.future.done():
            pending.future.set_result(output)
        self.state.costs.observe_step(
            pending.scheduler_output.total_num_scheduled_tokens, timings, round_trip
        )

    # ---------------------------------------------------------------- failures
    def _on_failure(self, reason: str, epoch: int, stage: str = "", cause: str = "lost") -> None:
        """A stage (``stage``, if known) or link failed while serving ``epoch``: answer every
        pending step and start recovery. ``cause`` is ``lost``, ``timeout`` or ``leaving``."""
        with self._lock:
            if self._stopped or epoch != self.state.failed_epoch or not self.state.chain_ready:
                return
            # What clients and /ready are told, e.g. "lost stage 10.0.0.2:50051 [15-29]: ...".
            full_reason = f"lost stage {stage}: {reason}" if stage else reason
            new_epoch = self.state.interrupt(full_reason, epoch)
            oldest = min((p.submitted_at for p in self._pending.values()), default=None)
            self.outages.lost(stage, reason, cause, new_epoch, oldest)
            self._answer_pending(new_epoch, full_reason)
        self._wakeup.set()

    def _shrink_kv(self, blocks: int, asking: RemoteStage) -> None:
        """``asking`` needs room for another head: use at most ``blocks`` KV blocks from now on.

        Every stage is planned again at that size and the chain is rewired like after a loss
        (the scheduler retires the blocks above ``blocks`` and its requests recompute), but it
        counts as no loss. The head never grows back.
        """
        with self._lock:
            if self._stopped or blocks >= self._num_blocks:
                return
            reason = (
                f"{asking} needs room for another head: this head's KV cache shrinks from "
                f"{self._num_blocks} to {blocks} blocks"
            )
            self._num_blocks = self.state.kv_blocks_limit = blocks
            for remote in self.chain.held():
                remote.kv_cache_config = self._kv_plan(remote, self.chain.remotes)
            self._rewire(reason, "kv_resize")

    def _rewire(self, reason: str, cause: str) -> None:
        """Interrupt the chain without a loss (``cause``: ``kv_resize`` or ``rebalance``): the
        requests recompute and the maintenance thread wires the next chain."""
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
                else:
                    self.chain.prepare_standbys(self._serving_epoch)
                    self._rebalance()
            except Exception:  # this thread must outlive any single failure
                logger.exception("chain maintenance failed")

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
                remotes, _ = self.chain.prepare_next_chain()
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
            self.outages.restored(epoch, self.describe_chain(), len(self.chain.remotes) + 1)

    # ---------------------------------------------------------------- reporting
    def describe_chain(self) -> str:
        """The chain in use, e.g. ``head [0-5] -> 10.0.0.2:50052 [6-11]``."""
        head = f"head [0-{self.head.placement.end_layer}]"
        return " -> ".join([head, *(str(r) for r in self.chain.remotes)])

    def pipeline_snapshot(self) -> dict[str, Any]:
        """What the head's API server reports about this pipeline (``/swarm``, ``/ready``,
        ``/metrics``): plain data, as it crosses from the engine process."""
        with self._lock:
            ready = self.state.chain_ready
            in_flight = len(self._pending)
        step_s = self.state.costs.mean_compute_s()
        chain = [
            {
                "peer_id": self.chain.head_node.peer_id,
                "address": self.chain.head_node.grpc_address,
                "layers": [0, self.head.placement.end_layer],
            },
            *self.chain.describe_remotes(),
        ]
        for hop, seconds in zip(chain, step_s, strict=False):
            hop["step_s"] = seconds
        return {
            "ready": ready,
            "cause": None if ready else self.state.outage_cause(),
            "epoch": self.state.failed_epoch,
            "steps_in_flight": in_flight,
            "chain": chain,
            "standbys": self.chain.describe_standbys(),
            "excluded": self.chain.describe_exclusions(),
            "rtt_s": self.chain.view_rtt_s(),
            "events": self.outages.recent(),
            "costs": costs.to_dict() if (costs := self.state.costs.costs()) else None,
            "max_micro_batches": self.head.max_micro_batches,
            "metrics": export_metrics(),
        }

    # ---------------------------------------------------------------- misc
    def collective_rpc(  # type: ignore[override]
        self,
        method: str | Callable,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        non_block: bool = False,
    ) -> Any:
        """Runs on the local stage only; remote stages are driven through their own RPCs.

        ``PIPELINE_SNAPSHOT_RPC`` is answered by the executor itself (:meth:`pipeline_snapshot`):
        it is how the API server process learns the pipeline's state.
        """
        kwargs = kwargs or {}
        if method == PIPELINE_SNAPSHOT_RPC:
            result = self.pipeline_snapshot()
        elif isinstance(method, str):
            result = getattr(self.worker, method)(*args, **kwargs)
        else:
            result = method(self.worker.worker, *args, **kwargs)
        return _done([result]) if non_block else [result]

    def check_health(self) -> None:
        return

    def shutdown(self) -> None:
        self._stopped = True
        if getattr(self, "_wakeup", None) is not None:
            self._wakeup.set()
        if getattr(self, "_link", None) is not None:
            self._link.close()
        if getattr(self, "chain", None) is not None:
            self.chain.shutdown()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
        if getattr(self, "worker", None) is not None:
            self.worker.shutdown()
