"""Which span a node without --serving_layers takes, and equal-time pipeline splits (pure policy,
no network)."""

from __future__ import annotations

import itertools

import pytest

from molink.core.span_choice import balanced_split, choose_span, coverage, needs_move

L = 30


def test_followers_beside_a_head_cover_the_rest_without_gaps() -> None:
    # Head serves 0-9; followers of 7 layers join one after another.
    spans: list[tuple[int, int, float]] = []
    for _ in range(3):
        start, end = choose_span(coverage(L, spans), 7, first=10)
        spans.append((start, end, 1.0))
    assert [s[:2] for s in spans] == [(10, 16), (17, 23), (23, 29)]
    served = coverage(L, spans)
    assert all(v >= 1 for v in served[10:])


def test_next_follower_goes_where_coverage_is_thinnest() -> None:
    spans = [(10, 19, 1.0), (20, 29, 1.0), (10, 19, 1.0)]
    assert choose_span(coverage(L, spans), 10, first=10) == (20, 29)


def test_uncovered_layers_come_before_any_covered_one() -> None:
    served = coverage(L, [(10, 24, 1.0)])
    assert choose_span(served, 10, first=10) == (20, 29)  # includes 25-29, nobody's


def test_size_is_clamped_to_the_layers_available() -> None:
    assert choose_span([0.0] * L, 100, first=10) == (10, 29)
    assert choose_span([0.0] * L, 0, first=29) == (29, 29)
    with pytest.raises(ValueError):
        choose_span([0.0] * L, 5, first=30)


def test_coverage_clips_to_the_model() -> None:
    assert coverage(4, [(2, 9, 1.0), (0, 0, 2.0)]) == [2.0, 0.0, 1.0, 1.0]


def test_a_duplicate_moves_only_while_a_gap_exists() -> None:
    others = coverage(L, [(10, 19, 1.0)])
    assert needs_move(others, (10, 19), first=10)  # 20-29 have no server
    assert not needs_move(others, (20, 29), first=10)
    full = coverage(L, [(10, 19, 1.0), (20, 29, 1.0)])
    assert not needs_move(full, (10, 19), first=10)  # a replica, and nothing is missing


def slowest(costs: list[float], last: float, spans: list[tuple[int, int]]) -> float:
    return max(
        sum(costs[a : b + 1]) + (last if i == len(spans) - 1 else 0.0)
        for i, (a, b) in enumerate(spans)
    )


def test_without_a_head_cost_equal_layers_split_evenly() -> None:
    assert balanced_split([1.0] * L, 0.0, 2) == [(0, 14), (15, 29)]
    assert balanced_split([1.0] * L, 0.0, 3) == [(0, 9), (10, 19), (20, 29)]


def test_the_last_stage_gives_up_layers_for_its_lm_head() -> None:
    # SmolLM2-135M's shape: the head costs 4 layers, so 30 + 4 = 34 units, 17 per stage.
    assert balanced_split([1.0] * L, 4.0, 2) == [(0, 16), (17, 29)]


def test_split_is_optimal_and_contiguous() -> None:
    costs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for stages in (1, 2, 3, 4):
        spans = balanced_split(costs, 2.5, stages)
        assert spans[0][0] == 0 and spans[-1][1] == len(costs) - 1
        assert all(b + 1 == c for (_, b), (c, _) in zip(spans, spans[1:], strict=False))
        splits = (
            list(zip((0, *cuts), (*cuts, len(costs)), strict=True))
            for cuts in itertools.combinations(range(1, len(costs)), stages - 1)
        )
        best = min(slowest(costs, 2.5, [(a, b - 1) for a, b in split]) for split in splits)
        assert slowest(costs, 2.5, spans) == best


def test_every_stage_keeps_a_layer_even_behind_a_huge_head() -> None:
    spans = balanced_split([1.0] * 4, 100.0, 3)
    assert spans[-1] == (3, 3)
    assert all(a <= b for a, b in spans) and len(spans) == 3


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="can't split 2 layers into 3 stages"):
        balanced_split([1.0, 1.0], 0.0, 3)
