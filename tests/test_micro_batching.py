"""The micro-batching policy: measured costs in, batch count and batch contents out."""

from __future__ import annotations

import math

import pytest

from molink.core.micro_batching import (
    CostEstimator,
    LinearCost,
    MicroBatchPlan,
    PipelineCostModel,
    PipelineCosts,
    StageTiming,
    batches_to_fill,
    choose_num_batches,
    decode_bound,
    plan_micro_batch,
    prefill_chunk,
)

MS = 1e-3


def costs(
    stages: list[tuple[float, float]],
    transfer: tuple[float, float] = (0.0, 0.0),
    head: tuple[float, float] = (0.0, 0.0),
    machines: tuple[int, ...] = (),
) -> PipelineCosts:
    return PipelineCosts(
        stages=tuple(LinearCost(f, p) for f, p in stages),
        transfer=LinearCost(*transfer),
        head=LinearCost(*head),
        machines=machines,
    )


# ---------------------------------------------------------------- estimator
def test_estimator_recovers_fixed_and_per_token_cost() -> None:
    est = CostEstimator()
    for n in [1, 8, 32, 128, 16, 64] * 5:
        est.observe(n, 0.010 + 0.0005 * n)
    cost = est.cost()
    assert cost is not None
    assert cost.fixed_s == pytest.approx(0.010, rel=1e-6)
    assert cost.per_token_s == pytest.approx(0.0005, rel=1e-6)


def test_estimator_with_one_step_size_charges_per_token() -> None:
    est = CostEstimator()
    for _ in range(10):
        est.observe(32, 0.064)
    assert est.cost() == LinearCost(0.0, 0.002)


def test_estimator_forgets_old_samples() -> None:
    est = CostEstimator(half_life=4)
    for n in [8, 64] * 20:
        est.observe(n, 0.001 * n)
    for n in [8, 64] * 20:  # the machine got three times slower
        est.observe(n, 0.003 * n)
    cost = est.cost()
    assert cost is not None and cost.per_token_s == pytest.approx(0.003, rel=0.05)


def test_estimator_ignores_garbage_and_starts_empty() -> None:
    est = CostEstimator()
    assert est.cost() is None
    est.observe(0, 1.0)
    est.observe(8, float("nan"))
    est.observe(8, -1.0)
    assert est.cost() is None


# ---------------------------------------------------------------- batch count
def test_one_request_is_one_batch() -> None:
    wan = costs([(5 * MS, 0.1 * MS)] * 3, transfer=(60 * MS, 0.0))
    assert choose_num_batches(wan, num_decodes=1, max_batches=8) == 1


def test_one_machine_without_link_latency_keeps_one_batch() -> None:
    # Two stages sharing the cores of one machine: splitting only adds fixed costs.
    local = costs([(5 * MS, 1 * MS)] * 2, transfer=(0.2 * MS, 0.0), machines=(0, 0))
    assert choose_num_batches(local, num_decodes=32, max_batches=8) == 1


def test_separate_machines_fill_every_stage() -> None:
    # Three machines, negligible fixed cost and latency: one batch per stage keeps all busy.
    cluster = costs([(0.1 * MS, 1 * MS)] * 3, transfer=(0.5 * MS, 0.0))
    assert choose_num_batches(cluster, num_decodes=30, max_batches=8) == 3


def test_link_latency_needs_more_batches_than_stages() -> None:
    # 100 ms around the ring vs 3 stages of 64 ms each: batches in flight hide the latency.
    wan = costs([(1 * MS, 2 * MS)] * 3, transfer=(100 * MS, 0.01 * MS))
    k = choose_num_batches(wan, num_decodes=32, max_batches=8)
    assert k > 3
    assert wan.cycle(32, k) < wan.cycle(32, 1) / 2


def test_latency_hiding_on_one_machine() -> None:
    # Emulated WAN on one machine: stages share cores, but batches still hide the link.
    wan = costs([(2 * MS, 0.5 * MS)] * 3, transfer=(60 * MS, 0.0), machines=(0, 0, 0))
    k = choose_num_batches(wan, num_decodes=32, max_batches=8)
    assert 1 < k <= 8
    assert wan.cycle(32, k) <= wan.cycle(32, 1)


def test_batch_count_respects_the_bound() -> None:
    wan = costs([(0.1 * MS, 2 * MS)] * 3, transfer=(100 * MS, 0.0))
    assert choose_num_batches(wan, num_decodes=64, max_batches=4) == 4
    assert choose_num_batches(wan, num_decodes=64, max_batches=1) == 1


def test_decode_bound_is_the_best_split_and_survives_a_round_trip() -> None:
    wan = costs([(1 * MS, 2 * MS)] * 3, transfer=(100 * MS, 0.01 * MS))
    assert PipelineCosts.from_dict(wan.to_dict()) == wan
    k, seconds = decode_bound(wan, num_decodes=32, max_batches=8)
    assert seconds == min(wan.cycle(32, j) for j in range(1, 9)) == wan.cycle(32, k)
    assert decode_bound(wan, num_decodes=32, max_batches=1) == (1, wan.cycle(32, 1))


def test_min_batches_overrides_the_policy_within_the_decodes() -> None:
    local = costs([(5 * MS, 1 * MS)] * 2, transfer=(0.2 * MS, 0.0), machines=(0, 0))
    assert choose_num_batches(local, num_decodes=32, max_batches=8, min_batches=3) == 3
    assert choose_num_batches(local, num_decodes=2, max_batches=8, min_batches=3) == 2
    assert choose_num_batches(local, num_decodes=32, max_batches=2, min_batches=3) == 2
    plan = plan_micro_batch(local, 32, 8, 64, 32, min_batches=4)
    assert plan is not None and plan.num_batches == 4 and plan.decode_slots == 8


def test_head_overhead_limits_the_split() -> None:
    # The head pays 20 ms per step: splitting 16 requests finely would be all overhead.
    busy_head = costs([(0.1 * MS, 0.1 * MS)] * 2, transfer=(10 * MS, 0.0), head=(20 * MS, 0.0))
    assert choose_num_batches(busy_head, num_decodes=16, max_batches=8) == 1


def test_cycle_model() -> None:
    c = costs([(1 * MS, 1 * MS), (2 * MS, 1 * MS)], transfer=(10 * MS, 0.0))
    # k=1: latency 1+8 + 2+8 + 10 = 29 ms; k=2: n=4, latency 21 ms, bottleneck 2*(2+4)=12 ms.
    assert c.cycle(8, 1) == pytest.approx(29 * MS)
    assert c.cycle(8, 2) == pytest.approx(21 * MS)


# ---------------------------------------------------------------- batch contents
def test_no_plan_before_measurements() -> None:
    assert plan_micro_batch(None, 10, 8, 2048, 32) is None


def test_a_burst_of_prompts_is_pipelined_across_separate_machines() -> None:
    # 2 stages on their own machines, ~2 ms per prompt token each: one 4096-token batch keeps
    # each machine busy while the other waits; chunks let both work at once.
    separate = costs([(75 * MS, 1.8 * MS), (90 * MS, 1.9 * MS)], transfer=(5 * MS, 0.05 * MS))
    plan = plan_micro_batch(separate, 0, 8, 8192, 32, pending_prefill=4096)
    assert plan is not None
    assert 32 <= plan.prefill_tokens < 4096 and plan.num_batches == 2

    def burst_seconds(chunk: int) -> float:
        steps = math.ceil(4096 / chunk)
        return (
            steps * separate.bottleneck(chunk)
            + separate.latency(chunk)
            - separate.bottleneck(chunk)
        )

    assert burst_seconds(plan.prefill_tokens) < 0.7 * burst_seconds(4096)
    assert plan.prefill_tokens == prefill_chunk(separate, 4096, 8192, 32)
    for other in (32, 64, 256, 1024, 2048):  # no chunk is clearly faster
        assert burst_seconds(plan.prefill_tokens) <= 1.05 * burst_seconds(other)
    # Decodes that ride along keep every machine busy while more than one chunk waits.
    plan = plan_micro_batch(separate, 4, 8, 8192, 32, pending_prefill=4096)
    assert plan is not None and plan.num_batches == 2 and plan.decode_slots == 2


def test_prompts_on_one_machine_go_in_one_full_batch() -> None:
    shared = costs([(75 * MS, 1.8 * MS)] * 2, transfer=(5 * MS, 0.05 * MS), machines=(0, 0))
    assert plan_micro_batch(shared, 0, 8, 2048, 32, pending_prefill=4096) == MicroBatchPlan(
        1, 0, 2048
    )
    assert plan_micro_batch(shared, 0, 8, 2048, 32, pending_prefill=100) == MicroBatchPlan(
        1, 0, 100
    )


def test_small_prompts_are_not_split() -> None:
    separate = costs([(75 * MS, 1.8 * MS)] * 2, transfer=(5 * MS, 0.05 * MS))
    assert prefill_chunk(separate, 20, 2048, 32) == 32
    plan = plan_micro_batch(separate, 0, 8, 2048, 32, pending_prefill=40)
    assert plan is not None and plan.prefill_tokens == 40 and plan.num_batches == 1


def test_more_batches_fill_a_long_ring() -> None:
    wan = costs([(10 * MS, 1 * MS)] * 2, transfer=(200 * MS, 0.0))
    # A 100-token batch keeps a machine busy 110 ms of its 420 ms trip: 4 fill the ring.
    assert batches_to_fill(wan, 100, 8) == 4
    assert batches_to_fill(wan, 100, 3) == 3


def test_plan_splits_decodes_evenly() -> None:
    wan = costs([(2 * MS, 0.2 * MS)] * 3, transfer=(60 * MS, 0.01 * MS))
    plan = plan_micro_batch(
        wan, num_decodes=32, max_batches=8, max_batch_tokens=2048, min_prefill_chunk=32
    )
    assert plan is not None
    assert plan.decode_slots == math.ceil(32 / plan.num_batches)
    assert plan.decode_slots * plan.num_batches >= 32


def test_prefill_allowance_uses_idle_ring_time() -> None:
    # Separate machines, long link: with k batches the machines idle for part of each cycle,
    # and prompt tokens may fill it beyond the pipelined chunk. By hand: 2 batches of 32
    # decodes; a stage step takes 1 + 32 * 0.05 = 2.6 ms and a cycle 100 + 3 * 2.6 = 107.8 ms,
    # of which each machine idles 107.8 - 2 * 2.6 = 102.6 ms. That, plus the stretch of half a
    # cycle (53.9 ms), buys 156.5 / 0.05 = 3130 prompt tokens per cycle: 1565 per batch.
    wan = costs([(1 * MS, 0.05 * MS)] * 3, transfer=(100 * MS, 0.0))
    plan = plan_micro_batch(wan, 64, 8, 4096, 32, pending_prefill=100)
    assert plan == MicroBatchPlan(num_batches=2, decode_slots=32, prefill_tokens=1565)
    # A batch never carries more than its token budget: 512 - 32 decodes.
    capped = plan_micro_batch(wan, 64, 8, 512, 32, pending_prefill=100)
    assert capped is not None and capped.num_batches == 2 and capped.prefill_tokens == 480


def test_prefill_allowance_on_one_machine_is_vllms_budget() -> None:
    compute_bound = costs([(0.0, 10 * MS)] * 2, machines=(0, 0))
    plan = plan_micro_batch(compute_bound, 4, 8, 2048, 32, pending_prefill=5000)
    assert plan is not None and plan.num_batches == 1
    assert plan.decode_slots + plan.prefill_tokens == 2048  # plain vLLM's budget


def test_shared_machine_needs_a_clear_gain_to_split() -> None:
    # Transfer is a small part of the cycle: splitting looks ~10% better on paper, which
    # separate machines take, but stages sharing cores would lose it to contention.
    stages, transfer = [(1 * MS, 1 * MS)] * 2, (10 * MS, 0.0)
    separate = costs(stages, transfer=transfer, machines=(0, 1))
    shared = costs(stages, transfer=transfer, machines=(0, 0))
    assert choose_num_batches(separate, 32, 8) > 1
    assert shared.cycle(32, 2) < shared.cycle(32, 1)
    assert choose_num_batches(shared, 32, 8) == 1


# ---------------------------------------------------------------- cost model
def test_cost_model_splits_round_trip_into_compute_and_transfer() -> None:
    model = PipelineCostModel()
    model.reset(["10.0.0.1", "10.0.0.2", "10.0.0.1"])
    assert model.costs() is None
    for n in (4, 16, 64) * 4:
        compute = [0.001 + 0.0001 * n, 0.002 + 0.0001 * n, 0.001]
        timings = [StageTiming(wait_s=0.005, compute_s=c) for c in compute]
        model.observe_step(n, timings, round_trip_s=sum(compute) + 3 * 0.005 + 0.040)
        model.observe_head(n, 0.003)
    c = model.costs()
    assert c is not None
    assert c.machines == (0, 1, 0)
    assert c.stages[1].fixed_s == pytest.approx(0.002, rel=1e-3)
    assert c.transfer.fixed_s == pytest.approx(0.040, rel=1e-3)
    assert c.head(10) == pytest.approx(0.003, rel=1e-3)


def test_cost_model_ignores_timings_of_another_chain() -> None:
    model = PipelineCostModel()
    model.reset(["a", "b"])
    model.observe_step(8, [StageTiming(0.0, 0.01)] * 3, 0.1)
    assert model.costs() is None
