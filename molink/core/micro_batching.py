"""Micro-batching policy: how many batches to keep in flight, and what goes into each.

A pipeline of N stages only computes on all stages at once when several batches are in flight.
Splitting the decoding requests into ``k`` micro-batches of ``ceil(R / k)`` requests hides the
link latency and lets stages on different machines overlap, but every extra batch pays each
stage's fixed per-step cost again. The right ``k`` depends on measured numbers, so this module
keeps online estimates of

* each stage's compute time for a step of ``n`` tokens (``fixed + per_token * n``),
* the head's own per-step cost (scheduling, encoding, output processing),
* the transfer time of a step around the whole ring (latency + bytes / bandwidth + codec),

and picks the ``k`` that maximizes the predicted decode rate. The cost model of one decode cycle
(every decoding request advances one token) with ``k`` micro-batches of ``n`` tokens is::

    latency(n)     = head(n) + sum_s stage_s(n) + transfer(n)   # one batch around the ring
    bottleneck(n)  = max over machines m of sum_{s on m} stage_s(n)  (+ head(n) on the head's)
    cycle(k)       = max(latency(n), k * bottleneck(n))

Stages on the same machine share its cores, so their compute is summed: on one machine, more
batches in flight only help to hide transfer time. Even that overlap costs more than the sum says
(two stages' OpenMP threads spinning on the same cores slow each other down: 2 stages on 2 cores
decoded 2.5x slower with 2 batches than with 1), so a split that puts stages of one machine to
work at once must promise ``MIN_GAIN_SHARED``.

Prompts are chunked across micro-batches too. One batch carrying every waiting prompt (what
vLLM's scheduler does with its whole token budget) keeps one machine busy while the others wait
for it: a burst of 32 prompts on 2 stages took both stages' time in turn. Chunks of ``c`` tokens
pipeline instead; ``P`` pending prompt tokens then take about ``P / c`` times ``bottleneck(c)``
plus one fill and drain, ``latency(c) - bottleneck(c)``, and :func:`prefill_chunk` picks the
``c`` that minimizes that (small chunks pay every stage's fixed cost more often). While more than
one chunk waits, enough batches stay in flight to keep every machine busy.

Everything here is pure Python over numbers; the scheduler applies the :class:`MicroBatchPlan`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# How much longer than a decode-only cycle a cycle carrying prefill chunks may take.
PREFILL_STRETCH = 0.5
# Prefer fewer batches unless more are predicted to be at least this much faster ...
MIN_GAIN = 0.05
# ... or this much, when several stages share a machine (contention the model doesn't see).
MIN_GAIN_SHARED = 0.25
# A batch in flight that would keep machines busy for less than this share of a trip isn't sent.
FILL_SLACK = 0.1
# Estimators forget old samples with this half-life (in observations).
HALF_LIFE = 64


@dataclass(frozen=True)
class LinearCost:
    """Seconds for a step of ``tokens`` tokens: ``fixed_s + per_token_s * tokens``."""

    fixed_s: float = 0.0
    per_token_s: float = 0.0

    def __call__(self, tokens: float) -> float:
        return self.fixed_s + self.per_token_s * tokens


ZERO_COST = LinearCost()


class CostEstimator:
    """Online weighted least-squares fit of ``seconds ~ fixed + per_token * tokens``.

    Old samples decay with a half-life of ``half_life`` observations, so the estimate follows a
    changing load (another job on the machine, a slower link). Until steps of different sizes
    have been seen, the split between fixed and per-token cost is unknown; the estimate then
    assumes all of it is per-token, which underestimates the cost of small steps the least.
    """

    def __init__(self, half_life: int = HALF_LIFE) -> None:
        self._decay = 0.5 ** (1.0 / half_life)
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.samples = 0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds < 0 or not math.isfinite(seconds):
            return
        d = self._decay
        self._w = self._w * d + 1.0
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds
        self.samples += 1

    @property
    def mean_seconds(self) -> float | None:
        """The (decayed) mean of the observed seconds, or None before any observation."""
        return self._y / self._w if self.samples else None

    def cost(self) -> LinearCost | None:
        """The current fit, or None before any observation."""
        if self.samples == 0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > 1.0:
            slope = (self._xy / self._w - mx * my) / var
            fixed = my - slope * mx
            if slope >= 0.0 and fixed >= 0.0:
                return LinearCost(fixed, slope)
            if slope < 0.0:  # noise: larger steps looked cheaper
                return LinearCost(my, 0.0)
        return LinearCost(0.0, my / mx)


@dataclass(frozen=True)
class PipelineCosts:
    """Measured costs of one pipeline, as the policy sees them."""

    stages: tuple[LinearCost, ...]  # compute of each stage; stage 0 runs on the head
    transfer: LinearCost  # one batch around the ring, compute and queueing excluded
    head: LinearCost = ZERO_COST  # the head engine's own work per step
    machines: tuple[int, ...] = ()  # machine index of each stage (default: one each)

    def _machine_of(self, stage: int) -> int:
        return self.machines[stage] if self.machines else stage

    @property
    def shares_machines(self) -> bool:
        """Whether some machine runs more than one stage."""
        placed = [self._machine_of(i) for i in range(len(self.stages))]
        return len(set(placed)) < len(placed)

    def latency(self, tokens: float) -> float:
        """Seconds for one batch of ``tokens`` to go around the ring with nothing else in flight."""
        return self.head(tokens) + sum(s(tokens) for s in self.stages) + self.transfer(tokens)

    def _machine_totals(self, stage_cost: Callable[[LinearCost], float]) -> dict[int, float]:
        totals: dict[int, float] = {}
        for i, stage in enumerate(self.stages):
            m = self._machine_of(i)
            totals[m] = totals.get(m, 0.0) + stage_cost(stage)
        return totals

    def bottleneck(self, tokens: float) -> float:
        """Busy seconds per batch of the most loaded machine."""
        busy = self._machine_totals(lambda stage: stage(tokens))
        busy[self._machine_of(0)] += self.head(tokens)  # the head runs next to stage 0
        return max(busy.values())

    def bottleneck_per_token(self) -> float:
        """Per-token seconds of the most loaded machine (the price of a prefill token)."""
        return max(self._machine_totals(lambda stage: stage.per_token_s).values())

    def cycle(self, num_decodes: int, num_batches: int) -> float:
        """Predicted seconds for every one of ``num_decodes`` requests to advance one token."""
        n = math.ceil(num_decodes / num_batches)
        return max(self.latency(n), num_batches * self.bottleneck(n))

    def to_dict(self) -> dict[str, list]:
        """Plain data (``[fixed_s, per_token_s]`` pairs), e.g. for the head's ``/swarm``."""
        return {
            "stages": [[s.fixed_s, s.per_token_s] for s in self.stages],
            "transfer": [self.transfer.fixed_s, self.transfer.per_token_s],
            "head": [self.head.fixed_s, self.head.per_token_s],
            "machines": list(self.machines),
        }

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> PipelineCosts:
        return cls(
            stages=tuple(LinearCost(*s) for s in d["stages"]),
            transfer=LinearCost(*d["transfer"]),
            head=LinearCost(*d["head"]),
            machines=tuple(d.get("machines", ())),
        )


def decode_bound(costs: PipelineCosts, num_decodes: int, max_batches: int) -> tuple[int, float]:
    """(batches, seconds per token) of the fastest decode cycle any split into at most
    ``max_batches`` micro-batches reaches under ``costs``: the bound a schedule is measured
    against (``num_decodes / seconds`` is the throughput bound)."""
    upper = max(1, min(max_batches, num_decodes))
    return min(((k, costs.cycle(num_decodes, k)) for k in range(1, upper + 1)), key=lambda x: x[1])


def choose_num_batches(
    costs: PipelineCosts, num_decodes: int, max_batches: int, min_batches: int = 1
) -> int:
    """The number of micro-batches that maximizes the predicted decode rate.

    The smallest count within ``MIN_GAIN`` of the best wins: every extra batch costs real
    overhead that the linear model only approximates. Leaving one batch needs ``MIN_GAIN_SHARED``
    when stages share a machine. ``min_batches`` (at most one per decoding request) overrides.
    """
    upper = max(1, min(max_batches, num_decodes))
    floor = min(max(1, min_batches), upper)
    return max(floor, _best_num_batches(costs, num_decodes, upper))


def _best_num_batches(costs: PipelineCosts, num_decodes: int, upper: int) -> int:
    cycles = {k: costs.cycle(num_decodes, k) for k in range(1, upper + 1)}
    best = min(cycles.values())
    k = min(k for k, c in cycles.items() if c <= best * (1.0 + MIN_GAIN))
    if k > 1 and costs.shares_machines and cycles[k] * (1.0 + MIN_GAIN_SHARED) > cycles[1]:
        return 1
    return k


@dataclass(frozen=True)
class MicroBatchPlan:
    """What the scheduler may put into the next micro-batch."""

    num_batches: int  # micro-batches to keep in flight
    decode_slots: int  # decoding requests in this micro-batch
    prefill_tokens: int  # prompt tokens (new or chunked prefills) in this micro-batch


def prefill_chunk(
    costs: PipelineCosts, pending: int, max_chunk: int, min_chunk: int, riders: int = 0
) -> int:
    """Prompt tokens per micro-batch that finish ``pending`` prompt tokens soonest.

    ``pending`` is split into full batches or into ``m`` even chunks, which keep the busiest
    machine busy ``m * bottleneck(chunk)``, plus one fill and drain; the largest chunk within
    ``MIN_GAIN`` of the best wins. ``riders`` decode tokens travel in every batch. On one
    machine the fill and drain cost nothing and the answer is the largest chunk, as plain vLLM
    would schedule.
    """
    max_chunk = max(max_chunk, min_chunk)
    if pending <= min_chunk:
        return min_chunk
    seconds: dict[int, float] = {}
    m = math.ceil(pending / max_chunk)
    chunk = min(max_chunk, pending)  # full batches first, as plain vLLM
    while True:
        full, last = divmod(pending, chunk)
        busy = full * costs.bottleneck(chunk + riders)
        if last:
            busy += costs.bottleneck(last + riders)
        n = chunk + riders  # the other machines' share of a (first or last) batch
        seconds[chunk] = busy + costs.latency(n) - costs.bottleneck(n)
        if chunk == min_chunk:
            break
        m = max(m + 1, int(m * 1.25))
        chunk = max(min_chunk, math.ceil(pending / m))
    best = min(seconds.values())
    return max(c for c, s in seconds.items() if s <= best * (1.0 + MIN_GAIN))


def batches_to_fill(costs: PipelineCosts, tokens: float, max_batches: int) -> int:
    """Batches of ``tokens`` tokens in flight that keep every machine busy (at most
    ``max_batches``): one batch's trip around the ring over the busiest machine's share, where
    a batch more than that would only cover the last ``FILL_SLACK`` of a trip."""
    bottleneck = costs.bottleneck(tokens)
    if bottleneck <= 0:
        return 1
    return max(1, min(max_batches, math.ceil(costs.latency(tokens) / bottleneck - FILL_SLACK)))


def plan_micro_batch(
    costs: PipelineCosts | None,
    num_decodes: int,
    max_batches: int,
    max_batch_tokens: int,
    min_prefill_chunk: int,
    min_batches: int = 1,
    pending_prefill: int = 0,
) -> MicroBatchPlan | None:
    """The plan for the next micro-batch, or None to schedule as plain vLLM would.

    ``num_decodes`` counts every request past its prompt, in flight or not; ``pending_prefill``
    the prompt tokens not yet scheduled. Plain vLLM scheduling applies until something is
    measured.
    """
    if costs is None:
        return None
    k = choose_num_batches(costs, num_decodes, max_batches, min_batches) if num_decodes else 1
    decode_slots = math.ceil(num_decodes / k)
    chunk = prefill_chunk(
        costs, pending_prefill, max_batch_tokens - decode_slots, min_prefill_chunk, decode_slots
    )
    if pending_prefill > chunk:  # several chunks to pipeline: keep every machine busy
        k = max(k, batches_to_fill(costs, chunk + decode_slots, max_batches))
        decode_slots = math.ceil(num_decodes / k)
    if num_decodes == 0:
        return MicroBatchPlan(num_batches=k, decode_slots=0, prefill_tokens=chunk)
    cycle = costs.cycle(num_decodes, k)
    # Machine time a decode-only cycle leaves idle, plus the allowed stretch, buys prefill tokens.
    idle = max(0.0, cycle - k * costs.bottleneck(decode_slots))
    per_token = costs.bottleneck_per_token()
    budget = (idle + PREFILL_STRETCH * cycle) / per_token if per_token > 0 else max_batch_tokens
    prefill = min(max(chunk, int(budget / k)), max(0, max_batch_tokens - decode_slots))
    return MicroBatchPlan(num_batches=k, decode_slots=decode_slots, prefill_tokens=prefill)


@dataclass(frozen=True)
class StageTiming:
    """What one stage reports about one step."""

    wait_s: float  # queued behind earlier steps on this stage
    compute_s: float
    arrived_unix: float = 0.0  # wall clock: the step reached this stage (before decoding)
    decode_s: float = 0.0  # decoding the step message
    done_unix: float = 0.0  # wall clock: compute finished


class PipelineCostModel:
    """Estimators fed by the executor (step timings) and the scheduler (its own time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages: list[CostEstimator] = []
        self._transfer = CostEstimator()
        self._head = CostEstimator()
        self._machines: tuple[int, ...] = ()

    def reset(self, hosts: Sequence[str]) -> None:
        """Start over for a chain whose stage ``i`` runs on ``hosts[i]``."""
        index: dict[str, int] = {}
        with self._lock:
            self._machines = tuple(index.setdefault(h, len(index)) for h in hosts)
            self._stages = [CostEstimator() for _ in hosts]
            self._transfer = CostEstimator()
            self._head = CostEstimator()

    def observe_step(
        self, tokens: int, timings: Sequence[StageTiming], round_trip_s: float
    ) -> None:
        """A step of ``tokens`` tokens came back ``round_trip_s`` after it was submitted."""
        with self._lock:
            if len(timings) != len(self._stages):
                return
            for estimator, t in zip(self._stages, timings, strict=True):
                estimator.observe(tokens, t.compute_s)
            spent = sum(t.wait_s + t.compute_s for t in timings)
            self._transfer.observe(tokens, max(0.0, round_trip_s - spent))

    def observe_head(self, tokens: int, seconds: float) -> None:
        """The head engine spent ``seconds`` on a step of ``tokens`` tokens."""
        with self._lock:
            self._head.observe(tokens, seconds)

    def mean_compute_s(self) -> list[float | None]:
        """Each stage's recent mean compute seconds per step (None: not measured yet)."""
        with self._lock:
            return [e.mean_seconds for e in self._stages]

    def costs(self) -> PipelineCosts | None:
        """The current estimates, or None until every stage has reported."""
        with self._lock:
            stages = [e.cost() for e in self._stages]
            transfer = self._transfer.cost()
            head = self._head.cost() or ZERO_COST
            machines = self._machines
        if not stages or transfer is None or any(s is None for s in stages):
            return None
        return PipelineCosts(
            stages=tuple(s for s in stages if s is not None),
            transfer=transfer,
            head=head,
            machines=machines,
        )
