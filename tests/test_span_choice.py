"""Which span a node without --serving_layers takes (pure policy, no network)."""

from __future__ import annotations

import pytest

from molink.core.span_choice import choose_span, coverage, needs_move

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
