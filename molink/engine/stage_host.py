"""A follower node's stage: built on the head's request, fed by the previous stage.

The head drives a remote stage in two calls (see ``molink.comm.stage_service``):
``InitStage`` builds the worker for a span of the layers this node holds, with the head's
limits, loading only that span's weights, and reports the KV cache spec and memory;
``StartStage`` allocates the KV cache the head planned, forgets all requests, and wires the
output to the next stage (or to the head's result stream). After a pipeline failure the head
calls ``StartStage`` again with a new epoch. A *standby* ``StartStage`` only allocates: the node
is kept ready to replace a stage. When the head stops listening to the result stream, the node
stops serving it; a node that is shutting down tells the head on that stream first.
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
from molink.comm.links import NextHopLink, ResultStream, timings_from_proto
from molink.comm.proto import molink_pb2
from molink.core.step import StepWork
from molink.engine.stage_config import stage_engine_config
from molink.engine.stage_engine import StageEngine
from molink.security.swarm_security import SwarmSecurity
from molink.stage_spec import StageConfig

logger = init_logger(__name__)


class StageNotReady(RuntimeError):
    """A call arrived in the wrong order (e.g. steps before ``StartStage``)."""


class StageHost:
    """The stage a follower serves for the current head."""

    def __init__(
        self,
        engine_args: EngineArgs,
        model_hash: str,
        layers: tuple[int, int],
        security: SwarmSecurity,
    ) -> None:
        """``layers``: the (start, end) span this node holds; it serves any part of it."""
        self.engine_args = engine_args
        self.model_hash = model_hash
        self.layers = layers
        self.security = security
        self.config: StageConfig | None = None
        self.worker: Any = None
        self.engine: StageEngine | None = None
        self.kv_cache_config: KVCacheConfig | None = None
        self.results: ResultStream | None = None
        self.next_link: NextHopLink | None = None
        self.model_dtype: torch.dtype | None = None
        self.pin_activations = False  # decode arriving activations into pinned memory (GPUs)
        self.kv_capacity_bytes = 0  # measured by the worker for the span a head asked for
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """ "idle" (no head yet), "loaded" (worker built, or on standby) or "serving"."""
        if self.engine is None:
            return "idle"
        return "serving" if self.results is not None else "loaded"

    @property
    def serving_span(self) -> tuple[int, int] | None:
        """The layers this node's worker is built for (None before a head asked)."""
        if self.config is None:
            return None
        return self.config.placement.start_layer, self.config.placement.end_layer

    def init_stage(self, config: StageConfig) -> tuple[bytes, int]:
        """Build the worker (once per configuration); return (KV spec payload, KV bytes)."""

        if config.model_hash != self.model_hash:
            raise ValueError(f"head serves model {config.model_hash}, this node {self.model_hash}")
        placement = config.placement
        if not self.layers[0] <= placement.start_layer <= placement.end_layer <= self.layers[1]:
            raise ValueError(
                f"asked for layers {placement.start_layer}-{placement.end_layer}; this node "
                f"holds {self.layers[0]}-{self.layers[1]}"
            )
        with self._lock:
            if self.config != config:
                self._build(config)
            spec = self.worker.get_kv_cache_spec()
            available = int(self.worker.determine_available_memory())
            self.kv_capacity_bytes = available
            return codec.dumps(spec), available

    def _build(self, config: StageConfig) -> None:
        """(Re)build the worker for ``config``'s span and limits (caller holds the lock)."""
        from molink.executor.pipeline_executor import PipelineExecutor
        from molink.worker.stage_worker import create_stage_worker

        self._close_links()
        self._shutdown_worker()
        vllm_config = stage_engine_config(self.engine_args, config, PipelineExecutor)
        placement = config.placement
        logger.info(
            "Building the stage for layers %d-%d in %s (limits from the head: %s)",
            placement.start_layer,
            placement.end_layer,
            vllm_config.model_config.dtype,
            config.engine_overrides,
        )
        self.worker = create_stage_worker(vllm_config, placement.rank)
        self.model_dtype = vllm_config.model_config.dtype
        self.pin_activations = self.worker.staging.pin_memory
        self.engine = StageEngine(self.worker, (placement.start_layer, placement.end_layer))
        self.config = config
        self.kv_cache_config = None

    def start_stage(
        self,
        kv_cache_config: KVCacheConfig,
        next_address: str,
        epoch: int,
        standby: bool = False,
    ) -> None:
        """Allocate the KV cache (first time); unless ``standby``, reset and wire ``epoch``."""
        with self._lock:
            if self.engine is None or self.config is None:
                raise StageNotReady("StartStage before InitStage")
            if self.kv_cache_config is not None and self.kv_cache_config != kv_cache_config:
                logger.info("The head planned another KV cache: rebuilding the stage")
                self._build(self.config)
            if self.kv_cache_config is None:
                try:
                    self.worker.initialize_from_config([kv_cache_config])
                    self.worker.compile_or_warm_up_model()
                except Exception:
                    self._build(self.config)  # a half-initialized worker can't be retried
                    raise
                self.kv_cache_config = kv_cache_config
            if standby:
                logger.info("Standing by for layers %d-%d", *self.serving_span)
                return
            self._close_links()
            self.results = ResultStream(epoch)
            if next_address:
                results = self.results
                self.next_link = NextHopLink(
                    next_address,
                    codec.WireFormat.from_names(
                        self.config.wire_dtype, self.config.wire_compression
                    ),
                    on_broken=lambda reason: results.report(
                        f"lost the next stage {next_address} ({reason})"
                    ),
                    security=self.security,
                )
                sink: Any = self.next_link
            else:
                sink = self.results
            self.engine.start_epoch(epoch, sink)
            logger.info(
                "Serving layers %d-%d, epoch %d -> %s",
                *self.serving_span,
                epoch,
                next_address or "head (last stage)",
            )

    def submit(self, msg: molink_pb2.Step) -> None:
        """Decode a step from the previous stage and queue it for compute."""
        arrived_unix, started = time.time(), time.monotonic()
        engine = self.engine
        if engine is None:
            raise StageNotReady("steps before InitStage")
        snapshots: dict = {}
        if msg.error:
            so = None
            tensors = None
        else:
            so, snapshots = codec.loads_step(msg.scheduler_output)
            tensors = (
                codec.decode_tensors(list(msg.tensors), self.model_dtype, self.pin_activations)
                or None
            )
        grammar = codec.loads(msg.grammar_output) if msg.grammar_output else None
        engine.submit(
            StepWork(
                step_id=msg.step_id,
                epoch=msg.epoch,
                scheduler_output=so,  # type: ignore[arg-type]
                scheduler_output_bytes=msg.scheduler_output,
                snapshots=snapshots,
                tensors=tensors,
                sample=msg.sample,
                grammar=lambda: grammar,
                error=msg.error,
                timings=timings_from_proto(msg.timings),
                arrived_unix=arrived_unix,
                decode_s=time.monotonic() - started,
            )
        )

    def result_stream(self, epoch: int) -> ResultStream:
        results = self.results
        if results is None or results.epoch != epoch:
            raise StageNotReady(f"no result stream for epoch {epoch}")
        return results

    def release(self, results: ResultStream) -> None:
        """The head stopped listening to ``results``: stop serving it (if still current)."""
        with self._lock:
            if self.results is not results:
                return
            self._close_links()
            if self.engine is not None:
                self.engine.start_epoch(self.engine.epoch, None)  # drops steps still queued
            logger.info("The head released this stage")

    def announce_leaving(self) -> bool:
        """Tell the head this node is leaving; False if no head is using it."""
        results = self.results
        if results is None:
            return False
        results.report_leaving()
        return True

    def wait_released(self, timeout: float) -> bool:
        """Wait until no head uses this stage; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.results is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def shutdown(self) -> None:
        with self._lock:
            self._close_links()
            self._shutdown_worker()

    def _close_links(self) -> None:
        if self.next_link is not None:
            self.next_link.close()
            self.next_link = None
        if self.results is not None:
            self.results.close()
            self.results = None

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
