"""The head's vLLM executor: stage 0 in-process, the other stages over gRPC.

vLLM runs with ``pipeline_parallel_size = number of stages``, so its scheduler and batch queue do
the bookkeeping: EngineCore keeps up to N batches in flight and calls ``execute_model`` then
``sample_tokens`` for each. This executor:

* builds the local stage-0 worker and asks every remote stage to build its own (``InitStage``),
  so vLLM plans the KV cache at the minimum block count over all stages;
* pushes each scheduler output into stage 0; stage 0 streams activations to stage 1, and so on;
  the last stage streams sampled tokens straight back here (``Results``);
* records how long each stage computed each step and how long the rest of the round trip took,
  for the scheduler's micro-batching policy (:mod:`molink.core.micro_batching`);
* never raises from a step: when a stage is lost, every pending step is answered with a
  :class:`~molink.core.pipeline_state.StageLostOutput`, the failure epoch is bumped (the
  scheduler then fails the affected requests) and a recovery thread rebuilds the chain, waiting
  for a node serving the missing layers to come back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from vllm.logger import init_logger
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from molink.comm import codec
from molink.comm.links import NextHopLink, connect, timings_from_proto
from molink.comm.proto import molink_pb2
from molink.core.micro_batching import StageTiming
from molink.core.pipeline_state import PIPELINE_STATE, epoch_of, lost_output
from molink.engine import batch_queue_bound
from molink.engine.head_config import HeadConfig, RemoteStageSpec
from molink.engine.stage_config import (
    StageConfig,
    StagePlacement,
    head_engine_overrides,
)
from molink.engine.stage_engine import StageEngine, StageOutput, StepWork
from molink.worker.stage_worker import create_stage_worker

logger = init_logger(__name__)


@dataclass
class _PendingStep:
    scheduler_output: SchedulerOutput
    future: Future
    grammar: Future
    epoch: int
    submitted_at: float


def _done(result: Any) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


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


class RemoteStage:
    """The head's handle on one remote stage."""

    def __init__(self, spec: RemoteStageSpec, rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.address = spec.address
        self.kv_cache_spec: dict[str, KVCacheSpec] | None = None
        self.available_kv_bytes = 0
        self.results_call: Any = None
        self._channel, self.stub = connect(self.address)

    def retarget(self, address: str, peer_id: str) -> None:
        """Point this handle at a replacement node serving the same layers."""
        self._channel.close()
        self.address = address
        self.spec = RemoteStageSpec(
            address=address,
            peer_id=peer_id,
            start_layer=self.spec.start_layer,
            end_layer=self.spec.end_layer,
        )
        self._channel, self.stub = connect(address)

    def init(self, config: StageConfig, timeout: float) -> None:
        reply = self.stub.InitStage(
            molink_pb2.InitStageRequest(stage_config_json=config.to_json()), timeout=timeout
        )
        self.kv_cache_spec = codec.loads(reply.kv_cache_spec)
        self.available_kv_bytes = reply.available_kv_bytes

    def close(self) -> None:
        if self.results_call is not None:
            self.results_call.cancel()
        self._channel.close()


class _LocalResults:
    """Sink of a single-stage pipeline: the head's stage 0 is also the last stage."""

    def __init__(self, executor: PipelineExecutor) -> None:
        self.executor = executor

    def emit(self, work: StepWork, output: StageOutput) -> None:
        if work.sample:
            self.executor._resolve(work.step_id, work.epoch, output, work.timings)

    def fail(self, work: StepWork, error: str) -> None:
        self.executor._on_failure(error, work.epoch)


class PipelineExecutor(Executor):
    """vLLM executor that drives a chain of MoLink stages."""

    supports_pp = True

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return False

    # ---------------------------------------------------------------- set-up
    def _init_executor(self) -> None:
        # Before EngineCore sizes its batch queue (after building this executor).
        batch_queue_bound.install()
        self.head = HeadConfig.from_vllm_config(self.vllm_config)
        self.state = PIPELINE_STATE
        self.wire = codec.WireFormat.from_names(self.head.wire_dtype, self.head.wire_compression)
        self.partition = tuple(self.head.partition)
        self.remotes = [RemoteStage(spec, rank) for rank, spec in enumerate(self.head.stages, 1)]
        self._lock = threading.RLock()
        self._pending: dict[int, _PendingStep] = {}
        self._awaiting_sample: deque[tuple[Future, Future]] = deque()
        self._next_step_id = 1
        self._serving_epoch = 0
        self._link: NextHopLink | None = None
        self._kv_cache_configs: list[KVCacheConfig] | None = None
        self._stopped = False
        self._recovery_wakeup = threading.Event()
        self._membership: Any = None

        logger.info(
            "MoLink pipeline: %d stages, layer split %s, remote stages %s",
            len(self.partition),
            list(self.partition),
            [r.address for r in self.remotes],
        )
        # Remote stages load their weights while the head loads its own.
        with ThreadPoolExecutor(max_workers=max(1, len(self.remotes))) as pool:
            inits = [pool.submit(self._init_remote, r) for r in self.remotes]
            self.worker = create_stage_worker(self.vllm_config, 0)
            for f in inits:
                f.result()
        self.engine = StageEngine(self.worker, "stage0")
        self._watchdog = threading.Thread(target=self._watch, name="molink-watchdog", daemon=True)
        self._recovery = threading.Thread(
            target=self._recover_loop, name="molink-recovery", daemon=True
        )

    def _stage_config(self, rank: int) -> StageConfig:
        return StageConfig(
            placement=StagePlacement(rank=rank, partition=self.partition),
            model_hash=self.head.model_hash,
            engine_overrides=head_engine_overrides(self.vllm_config),
            wire_dtype=self.head.wire_dtype,
            wire_compression=self.head.wire_compression,
        )

    def _init_remote(self, remote: RemoteStage) -> None:
        logger.info("Initializing stage %d at %s", remote.rank, remote.address)
        remote.init(self._stage_config(remote.rank), timeout=self.head.stage_init_timeout)

    def get_kv_cache_specs(self) -> list[dict[str, KVCacheSpec]]:
        return [self.worker.get_kv_cache_spec()] + [r.kv_cache_spec for r in self.remotes]

    def determine_available_memory(self) -> list[int]:
        local = self.worker.determine_available_memory()
        return [local] + [r.available_kv_bytes for r in self.remotes]

    def initialize_from_config(self, kv_cache_configs: list[KVCacheConfig]) -> None:
        self._kv_cache_configs = list(kv_cache_configs)
        self.worker.initialize_from_config(kv_cache_configs)
        blocks = [c.num_blocks for c in kv_cache_configs]
        logger.info("KV cache: %s blocks per stage", blocks)
        self._start_epoch(0)
        self._watchdog.start()
        self._recovery.start()

    # ---------------------------------------------------------------- wiring
    def _start_epoch(self, epoch: int) -> None:
        """(Re)start every stage for ``epoch``: reset, allocate KV, wire hops, subscribe."""
        assert self._kv_cache_configs is not None
        if self._link is not None:
            self._link.close()
            self._link = None
        for remote in reversed(self.remotes):  # last stage first: its successor must exist
            nxt = self.remotes[remote.rank].address if remote.rank < len(self.remotes) else ""
            remote.stub.StartStage(
                molink_pb2.StartStageRequest(
                    kv_cache_config=codec.dumps(self._kv_cache_configs[remote.rank]),
                    next_address=nxt,
                    epoch=epoch,
                ),
                timeout=self.head.stage_init_timeout,
            )
        for remote in self.remotes:
            if remote.results_call is not None:
                remote.results_call.cancel()
            call = remote.stub.Results(molink_pb2.ResultsRequest(epoch=epoch))
            remote.results_call = call
            threading.Thread(
                target=self._read_results,
                args=(remote, call, epoch),
                name=f"molink-results{remote.rank}",
                daemon=True,
            ).start()
        if self.remotes:
            sink: Any = NextHopLink(
                self.remotes[0].address,
                self.wire,
                on_broken=lambda reason: self._on_failure(reason, epoch),
            )
            self._link = sink
        else:
            sink = _LocalResults(self)
        self.engine.start_epoch(epoch, sink)
        self.state.costs.reset(
            [self.head.head_host] + [r.address.rpartition(":")[0] for r in self.remotes]
        )
        self._serving_epoch = epoch
        self.state.mark_ready(epoch)

    def _read_results(self, remote: RemoteStage, call: Any, epoch: int) -> None:
        is_last = remote.rank == len(self.remotes)
        try:
            for result in call:
                if result.error:
                    self._on_failure(
                        f"stage {remote.rank} ({remote.address}): {result.error}", epoch
                    )
                    return
                if is_last:
                    output = codec.loads(result.model_runner_output)
                    timings = timings_from_proto(result.timings)
                    self._resolve(result.step_id, result.epoch, output, timings)
            reason = f"stage {remote.rank} ({remote.address}) closed its result stream"
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and epoch != self._serving_epoch:
                return  # we cancelled it while rewiring
            reason = f"lost stage {remote.rank} ({remote.address}): {e.code().name}"
        except Exception as e:
            reason = f"bad result from stage {remote.rank}: {type(e).__name__}: {e}"
        if not self._stopped:
            self._on_failure(reason, epoch)

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
        encoded = codec.dumps_step_data(scheduler_output) if self.remotes else b""
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
                        scheduler_output, future, grammar, epoch, time.monotonic()
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
                        sample=has_tokens,
                        grammar=grammar.result,
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
        if not pending.future.done():
            pending.future.set_result(output)
        self.state.costs.observe_step(
            pending.scheduler_output.total_num_scheduled_tokens,
            timings,
            time.monotonic() - pending.submitted_at,
        )

    # ---------------------------------------------------------------- failures
    def _on_failure(self, reason: str, epoch: int) -> None:
        """A stage or link failed while serving ``epoch``: answer everything, start recovery."""
        with self._lock:
            if self._stopped or epoch != self.state.failed_epoch or not self.state.chain_ready:
                return
            new_epoch = self.state.mark_lost(reason, epoch)
            logger.error("Pipeline failure (epoch %d -> %d): %s", epoch, new_epoch, reason)
            pending, self._pending = self._pending, {}
            for step_id in sorted(pending):
                p = pending[step_id]
                if not p.grammar.done():
                    p.grammar.set_result(None)
                if not p.future.done():
                    p.future.set_result(lost_output(p.scheduler_output, new_epoch, reason))
        self._recovery_wakeup.set()

    def _watch(self) -> None:
        """Deadline on steps: a stage that stops answering counts as lost."""
        while not self._stopped:
            time.sleep(1.0)
            with self._lock:
                oldest = min((p.submitted_at for p in self._pending.values()), default=None)
                epoch = self.state.failed_epoch
            if oldest is not None and time.monotonic() - oldest > self.head.step_timeout:
                self._on_failure(
                    f"no result within {self.head.step_timeout:.0f} s (stage unresponsive)", epoch
                )

    def _recover_loop(self) -> None:
        while not self._stopped:
            self._recovery_wakeup.wait()
            self._recovery_wakeup.clear()
            last_message, next_log = "", 0.0
            while not self._stopped and not self.state.chain_ready:
                epoch = self.state.failed_epoch
                try:
                    self._rebuild(epoch)
                    logger.info("Pipeline restored (epoch %d)", epoch)
                except Exception as e:
                    message = str(e) or type(e).__name__
                    if message != last_message or time.monotonic() > next_log:
                        logger.warning("Pipeline not restored yet: %s", message)
                        last_message, next_log = message, time.monotonic() + 30
                    time.sleep(self.head.recovery_poll_interval)

    def _rebuild(self, epoch: int) -> None:
        """Replace dead stages (same layers, from the DHT), then restart every stage."""
        for remote in self.remotes:
            if self._alive(remote):
                continue
            replacement = self._find_replacement(remote)
            if replacement is None:
                raise RuntimeError(
                    f"waiting for a node serving layers {remote.spec.start_layer}-"
                    f"{remote.spec.end_layer}"
                )
            logger.info("Replacing stage %d with %s", remote.rank, replacement.grpc_address)
            remote.retarget(replacement.grpc_address, replacement.peer_id)
            remote.init(self._stage_config(remote.rank), timeout=self.head.stage_init_timeout)
        with self._lock:
            if epoch != self.state.failed_epoch:
                return
        self._start_epoch(epoch)

    def _alive(self, remote: RemoteStage) -> bool:
        try:
            info = remote.stub.GetNodeInfo(molink_pb2.Empty(), timeout=3.0)
        except grpc.RpcError:
            return False
        return info.peer_id == remote.spec.peer_id

    def _find_replacement(self, remote: RemoteStage) -> Any:
        from molink.comm.dht import Membership

        if self._membership is None:
            self._membership = Membership(
                initial_peers=self.head.dht_maddrs, host="127.0.0.1", client_mode=True
            )
        for node in self._membership.nodes():
            if (
                node.model_hash == self.head.model_hash
                and node.start_layer == remote.spec.start_layer
                and node.end_layer == remote.spec.end_layer
                and node.state == "online"
                and not node.is_head
                and node.peer_id != remote.spec.peer_id
            ):
                return node
        return None

    # ---------------------------------------------------------------- misc
    def collective_rpc(  # type: ignore[override]
        self,
        method: str | Callable,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        non_block: bool = False,
    ) -> Any:
        """Runs on the local stage only; remote stages are driven through their own RPCs."""
        kwargs = kwargs or {}
        if isinstance(method, str):
            result = getattr(self.worker, method)(*args, **kwargs)
        else:
            result = method(self.worker.worker, *args, **kwargs)
        return _done([result]) if non_block else [result]

    def check_health(self) -> None:
        return

    def shutdown(self) -> None:
        self._stopped = True
        self._recovery_wakeup.set()
        if getattr(self, "_link", None) is not None:
            self._link.close()
        for remote in getattr(self, "remotes", []):
            remote.close()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
        if self._membership is not None:
            self._membership.shutdown()
        if getattr(self, "worker", None) is not None:
            self.worker.shutdown()
