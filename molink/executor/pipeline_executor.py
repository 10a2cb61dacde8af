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
from molink.comm.links import NextHopLink
from molink.core.head_session import HeadSession
from molink.core.hot_standby import Hot
from molink.core.micro_batching import StageTiming
from molink.core.pipeline_state import PIPELINE_STATE, epoch_of, lost_output
from molink.core.rebalance import RebalancePolicy
from molink.core.request_snapshot import snapshots_of
from molink.core.step import StageOutput, StepWork, changes_stage_state
from molink.engine.head_config import HeadConfig
from molink.engine.stage_config import head_engine_overrides
from molink.engine.stage_engine import StageEngine
from molink.executor.chain_keeper import ChainKeeper
from molink.executor.chain_upkeep import ChainUpkeep
from molink.executor.hot_standbys import HotStandbys
from molink.executor.kv_plan import HeadKVPlan
from molink.executor.outages import OutageRecord
from molink.executor.remote_stage import RemoteStage
from molink.executor.span_replay import SpanReplay
from molink.stage_spec import StageConfig, StagePlacement
from molink.telemetry.engine_metrics import PIPELINE_SNAPSHOT_RPC, export_metrics
from molink.telemetry.step_trace import TRACE_ATTR, executor_trace
from molink.vllm_compat.engine_config import install_batch_queue_bound
from molink.vllm_compat.executor import ExecutorHooks
from molink.vllm_compat.scheduler import full_attention_only
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


class _LocalResults:
    """Sink of a single-stage pipeline: the head's stage 0 is also the last stage."""

    def __init__(self, executor: PipelineExecutor) -> None:
        self.executor = executor

    def emit(self, work: StepWork, output: StageOutput) -> None:
        if work.sample:
            self.executor._resolve(work.step_id, work.epoch, output, work.timings)

    def fail(self, work: StepWork, error: str) -> None:
        self.executor._on_failure(error, work.epoch, stage=self.executor.engine.name)


class PipelineExecutor(ChainUpkeep, ExecutorHooks):
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
        self.kv = HeadKVPlan(self.vllm_config)
        self.chain = ChainKeeper(
            self.head, self._stage_config, self.kv.for_joining_stage, self.session.id
        )
        self._lock = threading.RLock()
        self._pending: dict[int, _PendingStep] = {}
        self._awaiting_sample: deque[tuple[Future, Future]] = deque()
        self._next_step_id = 1
        self._serving_epoch = 0
        self._growth_offer = 0  # KV blocks a stage offered after another head left (0: none)
        self._link: Any = None  # to stage 1 (a NextHopLink, or a StandbyMirror around one)
        self._drain = (0, 0)  # the last epoch that served, and the last step sent to stage 1
        self._wired: list[RemoteStage] = []  # the chain of the last epoch wired
        self._wired_blocks = 0  # and its KV blocks
        self.recovery_mode = "recompute"  # how the last wiring recovered: replay or recompute
        self._stopped = False
        self._wakeup = threading.Event()
        self.outages = OutageRecord()
        self.rebalance = RebalancePolicy(self.head.rebalance_after)
        self.hot = HotStandbys(
            self.head.hot_standby,
            self.chain,
            self.wire,
            self.vllm_config.cache_config.block_size,
            self.head.stage_init_timeout,
        )

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
        self.replay = None
        if self.head.recovery == "replay":  # stage 0 logs what it sends to stage 1
            self.replay = SpanReplay.for_head(self.worker, self.session.id, self.vllm_config)
            self.state.replay_log = self.replay.log
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
            replay_log_bytes=self.head.replay_log_bytes,
        )

    def get_kv_cache_specs(self) -> list[dict[str, KVCacheSpec]]:
        self.kv.local_spec = self.worker.get_kv_cache_spec()
        return [self.kv.local_spec] + [r.kv_cache_spec for r in self.chain.remotes]

    def determine_available_memory(self) -> list[int]:
        """KV bytes per stage: vLLM plans every stage at the same block count, the minimum.

        A remote stage offers what other heads left free on it, or this head's fair share of it;
        one that can't hold a single request of ``max_model_len`` is refused here, with the
        reason (:meth:`HeadKVPlan.check_offers`).
        """
        local = self.worker.determine_available_memory()
        self.kv.check_offers(self.chain.remotes)
        return [local] + [r.available_kv_bytes for r in self.chain.remotes]

    def initialize_from_config(self, kv_cache_configs: list[KVCacheConfig]) -> None:
        self.worker.initialize_from_config(kv_cache_configs)
        for remote, config in zip(self.chain.remotes, kv_cache_configs[1:], strict=True):
            remote.kv_cache_config = config
        self.kv.num_blocks = self.kv.allocated_blocks = kv_cache_configs[0].num_blocks
        logger.info("KV cache: %d blocks on every stage", self.kv.num_blocks)
        if self.hot.enabled and not full_attention_only(kv_cache_configs[0]):
            logger.warning(
                "--hot-standby is off: this model's KV cache is not one group of full-attention "
                "layers, which a replay can't refill (a loss recomputes)"
            )
            self.hot.enabled = False
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
            # Hot standbys first run every step the head sent in the epoch they followed.
            self._drain = (self._serving_epoch, self._link.last_step)
            self._link = None
        drain, orphaned = self._drain, self.hot.orphaned(self._wired)
        self.hot.start(epoch, drain, orphaned)
        for i in reversed(range(len(remotes))):  # last stage first: its successor must exist
            nxt = remotes[i + 1].address if i + 1 < len(remotes) else ""
            hot = Hot(
                mirror_address=self.hot.mirror_address(i + 1),
                drain=drain,
                forget=id(remotes[i]) in orphaned,
            )
            try:
                held = remotes[i].start(epoch, nxt, self.head.stage_init_timeout, hot=hot)
            except grpc.RpcError as e:
                self.chain.exclude(remotes[i].peer_id, f"StartStage failed: {e.code().name}")
                raise
            self.hot.started(remotes[i], held)
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
            link = NextHopLink(
                first.address,
                self.wire,
                on_broken=lambda reason: self._on_failure(
                    f"the link to it broke ({reason})", epoch, stage=str(first)
                ),
                security=self.chain.security,
            )
            sink: Any = self.hot.head_sink(link, self.chain.security)
            self._link = sink
        else:
            sink = _LocalResults(self)
        self.engine.start_epoch(self.session, epoch, sink)
        self.state.costs.reset(
            [self.head.head_host] + [r.address.rpartition(":")[0] for r in remotes]
        )
        self.recovery_mode = self._refill(epoch)
        self._wired, self._wired_blocks = list(remotes), self.kv.num_blocks
        self._serving_epoch = epoch
        self.rebalance.wired(time.monotonic())
        self.state.mark_ready(epoch)

    def _new_step_id(self) -> int:
        with self._lock:
            step_id = self._next_step_id
            self._next_step_id += 1
            return step_id

    # ---------------------------------------------------------------- steps
    def execute_model(  # type: ignore[override]
        self, scheduler_output: SchedulerOutput, non_block: bool = False
    ) -> Any:
        """Queue one scheduler output into stage 0; its tokens come from ``sample_tokens``."""
        epoch = epoch_of(scheduler_output)
        has_tokens = scheduler_output.total_num_scheduled_tokens > 0
        if not has_tokens and not changes_stage_state(scheduler_output):
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
            setattr(
                output,
                TRACE_ATTR,
                executor_trace(
                    step_id,
                    pending.scheduler_output.total_num_scheduled_tokens,
                    pending.encode_s,
                    timings,
                    round_trip,
                ),
            )
        if not pending.future.done():
            pending.future.set_result(output)
        self.state.costs.observe_step(
            pending.scheduler_output.total_num_scheduled_tokens, timings, round_trip
        )

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
            "stages_shared": self.state.stages_shared,
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
