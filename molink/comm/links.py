"""gRPC links between nodes: the ordered step stream to the next stage and the result stream.

* :class:`NextHopLink` is a :class:`~molink.engine.stage_engine.StepSink` that encodes each step's
  output and sends it on one client-streaming ``Steps`` call, so steps arrive in order and a send
  never waits for the receiver's compute.
* :class:`ResultStream` is the sink of the last stage (sampled tokens) and the channel of every
  remote stage for errors and its leave notice: the head subscribes to it with ``Results``.
A broken stream is reported through the ``on_broken`` callback, never raised into compute code.
:func:`encode_step` and :func:`decode_step` turn a stage's work into a ``Step`` message and back.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
import torch
from vllm.logger import init_logger

from molink.comm import codec, tunnels
from molink.comm.grpc_options import CHANNEL_OPTIONS
from molink.comm.proto import molink_pb2, molink_pb2_grpc
from molink.core.micro_batching import StageTiming
from molink.core.step import HostActivations, StageOutput, StepWork
from molink.security.swarm_security import SwarmSecurity
from molink.telemetry import metrics

logger = init_logger(__name__)

_CLOSE = object()
#: Seconds a closed link's queued steps have to reach the next stage.
CLOSE_GRACE_S = 10.0


def connect(
    address: str, security: SwarmSecurity
) -> tuple[grpc.Channel, molink_pb2_grpc.MoLinkNodeStub]:
    """Open a channel to a node's gRPC service (mutual TLS when the swarm has a key).

    ``address`` is ``host:port``, or a route ``peer_id@relay_host:port`` to a node behind NAT:
    the channel then goes through a local tunnel endpoint (:mod:`molink.comm.tunnels`), and TLS
    still runs end to end with the node.
    """
    if tunnels.is_route(address):
        address = tunnels.local_endpoint(address, security)
    channel = security.channel(address, CHANNEL_OPTIONS)
    return channel, molink_pb2_grpc.MoLinkNodeStub(channel)


def timings_to_proto(timings: list[StageTiming]) -> list[molink_pb2.StageTiming]:
    return [
        molink_pb2.StageTiming(
            wait_s=t.wait_s,
            compute_s=t.compute_s,
            arrived_unix=t.arrived_unix,
            decode_s=t.decode_s,
            done_unix=t.done_unix,
        )
        for t in timings
    ]


def timings_from_proto(msgs: Iterable[molink_pb2.StageTiming]) -> list[StageTiming]:
    """Stage timings from a peer, clamped to sane values (they only feed estimates)."""
    return [
        StageTiming(
            wait_s=_clamp(m.wait_s),
            compute_s=_clamp(m.compute_s),
            arrived_unix=m.arrived_unix if math.isfinite(m.arrived_unix) else 0.0,
            decode_s=_clamp(m.decode_s),
            done_unix=m.done_unix if math.isfinite(m.done_unix) else 0.0,
        )
        for m in msgs
    ]


def _clamp(seconds: float) -> float:
    return min(max(seconds, 0.0), 3600.0) if math.isfinite(seconds) else 0.0


def encode_step(work: StepWork, output: StageOutput, wire: codec.WireFormat) -> molink_pb2.Step:
    """The ``Step`` message that carries ``work`` (and its activations) to the next stage."""
    tensors, order = [], []
    if isinstance(output, HostActivations):
        tensors, order = codec.encode_tensors(output.wait(), wire), output.order
    return molink_pb2.Step(
        step_id=work.step_id,
        epoch=work.epoch,
        scheduler_output=work.scheduler_output_bytes,
        sample=work.sample,
        grammar_output=codec.dumps(work.grammar()) if work.sample else b"",
        tensors=tensors,
        timings=timings_to_proto(work.timings),
        session=work.session,
        replay=work.replay,
        replay_layer=work.replay_layer,
        row_order=order,
    )


def decode_step(msg: molink_pb2.Step, dtype: torch.dtype, pin: bool) -> StepWork:
    """The work a ``Step`` message from the previous stage carries (see :func:`encode_step`);
    activations decoded to ``dtype`` (``pin``: into pinned host memory, for a GPU stage)."""
    arrived_unix, started = time.time(), time.monotonic()
    snapshots: dict = {}
    so, tensors = None, None
    if not msg.error:
        so, snapshots = codec.loads_step(msg.scheduler_output)
        tensors = codec.decode_tensors(list(msg.tensors), dtype, pin) or None
    grammar = codec.loads(msg.grammar_output) if msg.grammar_output else None
    return StepWork(
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
        session=msg.session,
        replay=msg.replay,
        replay_layer=msg.replay_layer,
        row_order=list(msg.row_order),
    )


class NextHopLink:
    """Sends step outputs, in order, on one ``Steps`` stream to the next stage."""

    def __init__(
        self,
        address: str,
        wire: codec.WireFormat,
        on_broken: Callable[[str], None],
        security: SwarmSecurity,
    ) -> None:
        self.address = address
        self.wire = wire
        self.bytes_sent = 0
        self.activation_bytes_sent = 0
        self.tokens_sent = 0
        self._on_broken = on_broken
        self._queue: queue.Queue[object] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # a step is either queued before the close, or dropped
        self.last_step = 0  # id of the last step (not a replay step) queued before the close
        self._channel, stub = connect(address, security)
        self._call = stub.Steps.future(self._requests())
        self._call.add_done_callback(self._done)

    def emit(self, work: StepWork, output: StageOutput) -> None:
        self._put(work, output)

    def _put(self, work: StepWork, output: StageOutput | str) -> None:
        with self._lock:
            if self._closed:
                return
            self._queue.put((work, output))
            if not work.replay:
                self.last_step = max(self.last_step, work.step_id)

    def stats(self) -> dict[str, float | str]:
        """Bytes sent on this hop, in all and per scheduled token (activations + step data)."""
        tokens = self.tokens_sent or 1
        return {
            "address": self.address,
            "bytes_sent": self.bytes_sent,
            "tokens_sent": self.tokens_sent,
            "bytes_per_token": self.bytes_sent / tokens,
            "activation_bytes_per_token": self.activation_bytes_sent / tokens,
        }

    def fail(self, work: StepWork, error: str) -> None:
        # The next stage passes the error on to the last stage, which reports it to the head.
        self._put(work, error)

    def close(self) -> None:
        """End the stream: the receiver sees a clean end, after the steps queued before (the
        channel closes when the call ends, or after :data:`CLOSE_GRACE_S` at the latest)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_CLOSE)
        timer = threading.Timer(CLOSE_GRACE_S, self._channel.close)
        timer.daemon = True
        timer.start()

    def backlog(self) -> int:
        """Steps queued here, not yet handed to gRPC."""
        return self._queue.qsize()

    def _requests(self) -> Iterator[molink_pb2.Step]:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            work, output = item  # type: ignore[misc]
            if isinstance(output, str):
                msg = molink_pb2.Step(
                    step_id=work.step_id, epoch=work.epoch, error=output, session=work.session
                )
            else:
                msg = encode_step(work, output, self.wire)
                self.tokens_sent += work.scheduler_output.total_num_scheduled_tokens
                self.activation_bytes_sent += sum(len(t.data) for t in msg.tensors)
            size = msg.ByteSize()
            self.bytes_sent += size
            metrics.BYTES_SENT.labels("steps").inc(size)
            yield msg

    def _done(self, call: grpc.Future) -> None:
        """Report why the stream ended (``on_broken`` gets e.g. "UNAVAILABLE: Socket closed")."""
        if self._closed:
            self._channel.close()
            return
        try:
            call.result()
            reason = "it ended the step stream"
        except grpc.RpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except Exception as e:  # cancelled or internal
            reason = type(e).__name__
        logger.warning("Lost the next stage %s (%s)", self.address, reason)
        self._on_broken(reason)


def standby_link(address: str, wire: codec.WireFormat, security: SwarmSecurity) -> NextHopLink:
    """A link that mirrors steps to a hot standby at ``address`` (:mod:`molink.core.hot_standby`):
    when it breaks, only the mirroring stops (the standby sees its stream break)."""

    def broken(reason: str) -> None:
        logger.warning("Lost the hot standby %s (%s): no longer mirroring to it", address, reason)

    return NextHopLink(address, wire, on_broken=broken, security=security)


class ResultStream:
    """Results and errors a stage sends back to the head through its ``Results`` subscription."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self._queue: queue.Queue[object] = queue.Queue()
        self._lock = threading.Lock()

    def emit(self, work: StepWork, output: StageOutput) -> None:
        if work.replay:  # the head waits for each replay step's acknowledgement
            self.replayed(work)
        elif work.sample:  # the head waits only for steps that sampled
            self._queue.put(
                molink_pb2.StepResult(
                    step_id=work.step_id,
                    epoch=work.epoch,
                    model_runner_output=codec.dumps(output),
                    timings=timings_to_proto(work.timings),
                )
            )

    def fail(self, work: StepWork, error: str) -> None:
        if work.replay:  # a replay that fails fails alone: its requests recompute
            self.replayed(work, error)
        else:
            self.report(error, work.step_id, work.epoch)

    def replayed(self, work: StepWork, error: str = "") -> None:
        """Acknowledge replay step ``work`` (``error``: it could not be done)."""
        self._queue.put(
            molink_pb2.StepResult(
                step_id=work.step_id, epoch=work.epoch, replayed=True, error=error
            )
        )

    def report(self, error: str, step_id: int = 0, epoch: int | None = None) -> None:
        """Tell the head that this stage can't go on (e.g. its next hop is gone)."""
        self._queue.put(
            molink_pb2.StepResult(
                step_id=step_id, epoch=self.epoch if epoch is None else epoch, error=error
            )
        )

    def report_leaving(self) -> None:
        """Tell the head this node is shutting down (it moves its requests elsewhere)."""
        self._queue.put(molink_pb2.StepResult(epoch=self.epoch, leaving=True))

    def ask_to_shrink(self, blocks: int) -> None:
        """Ask the head to use at most ``blocks`` KV blocks here (another head needs room)."""
        self._queue.put(molink_pb2.StepResult(epoch=self.epoch, shrink_kv_blocks=blocks))

    def offer_growth(self, blocks: int) -> None:
        """Tell the head it may use up to ``blocks`` KV blocks here (another head left)."""
        self._queue.put(molink_pb2.StepResult(epoch=self.epoch, grow_kv_blocks=blocks))

    def close(self) -> None:
        self._queue.put(_CLOSE)

    def __iter__(self) -> Iterator[molink_pb2.StepResult]:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            metrics.BYTES_SENT.labels("results").inc(item.ByteSize())  # type: ignore[attr-defined]
            yield item  # type: ignore[misc]
