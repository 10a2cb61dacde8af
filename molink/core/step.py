"""A pipeline step as it travels through a stage, and where a stage puts what it computed.

Plain data shared by the stage's compute loop (:mod:`molink.engine.stage_engine`) and the links
that carry steps between nodes (:mod:`molink.comm.links`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput

from molink.core.micro_batching import StageTiming
from molink.core.request_snapshot import RequestSnapshot

GrammarSource = Callable[[], "GrammarOutput | None"]


@dataclass
class StepWork:
    """One scheduler output on its way through a stage."""

    step_id: int
    epoch: int
    scheduler_output: SchedulerOutput
    # Restricted-pickle bytes of scheduler_output, forwarded as received (never re-encoded).
    scheduler_output_bytes: bytes
    # Requests this step resumes, for stages that don't hold them (after a pipeline failure).
    snapshots: dict[str, RequestSnapshot] = field(default_factory=dict)
    # Activations from the previous stage, each [num_tokens, hidden_size]; None on stage 0.
    tensors: dict[str, torch.Tensor] | None = None
    # The head asked for sampled tokens (tokens were scheduled).
    sample: bool = False
    # Returns the grammar bitmask for sampling; may block until the head's engine provides it.
    grammar: GrammarSource = field(default=lambda: None)
    # Set when an earlier stage failed this step: it is passed on, not computed.
    error: str = ""
    # What each stage so far reported about this step (this stage appends its own).
    timings: list[StageTiming] = field(default_factory=list)
    received_at: float = field(default_factory=time.monotonic)  # decoded, ready to compute
    arrived_unix: float = field(default_factory=time.time)  # wall clock, before decoding
    decode_s: float = 0.0
    # The secret id of the head's session (molink.core.head_session), checked by every stage.
    session: str = ""
    # A replay step (molink.executor.span_replay) fills the KV cache of the stage whose span
    # starts at replay_layer; the stage before it adds the rows from its replay log, the stages
    # before that pass it on; the target acknowledges it to the head and sends nothing on.
    replay: bool = False
    replay_layer: int = 0
    # The request of each run of rows in ``tensors``, in row order (as the head's stage 0 laid
    # them out); every later stage computes the rows in this order.
    row_order: list[str] = field(default_factory=list)


class HostActivations:
    """A stage's output activations in host memory, where the wire takes them.

    ``tensors`` are ``hidden_states``/``residual``, each [num_tokens, hidden_size]. On a GPU stage
    the copy from the device may still be running when the stage hands them on (it overlaps the
    next step, see :mod:`molink.worker.activation_staging`); :meth:`wait` returns them once they
    hold the data.
    """

    def __init__(
        self, tensors: dict[str, torch.Tensor], order: list[str], ready: Any = None
    ) -> None:
        """``order``: the request of each run of rows, in row order; ``ready``: an event
        (``synchronize()``) the copy records when done; None: no copy."""
        self._tensors = tensors
        self.order = order
        self._ready = ready

    def split(self, parts: list[tuple[int, list[str]]]) -> list[HostActivations]:
        """The activations cut into consecutive parts of ``(rows, order)`` (views, which share
        this copy's completion)."""
        out, start = [], 0
        for rows, order in parts:
            sliced = {name: t[start : start + rows] for name, t in self._tensors.items()}
            out.append(HostActivations(sliced, order, self._ready))
            start += rows
        return out

    def wait(self) -> dict[str, torch.Tensor]:
        """The host tensors, once the copy into them is complete."""
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._tensors


StageOutput = HostActivations | ModelRunnerOutput | None


class StepSink(Protocol):
    """Where a stage puts what it computed."""

    def emit(self, work: StepWork, output: StageOutput) -> None:
        """Pass on the output of ``work`` (activations, or sampled tokens on the last stage)."""

    def fail(self, work: StepWork, error: str) -> None:
        """Report that ``work`` could not be computed."""


def changes_stage_state(scheduler_output: SchedulerOutput) -> bool:
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


def replay_order(scheduler_output: SchedulerOutput) -> list[str]:
    """The row order of a replay step's activations: its requests as it schedules them (each a
    new request of the step)."""
    return [new.req_id for new in scheduler_output.scheduled_new_reqs]
