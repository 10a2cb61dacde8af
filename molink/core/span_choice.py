"""Which layers a node serves: where the swarm is thinnest, or an equal-time split.

Petals' block selection (``petals/server/block_selection.py``): a joining node sums what the
swarm already serves per layer and takes the contiguous window whose values, sorted ascending,
are lexicographically smallest, so it covers the weakest layers first: an uncovered layer (0)
before any covered one, a layer served once before one served twice. Pure functions over
numbers; :mod:`molink.entrypoints.node` reads the announcements and applies the choice.

:func:`balanced_split` plans a whole pipeline instead: contiguous spans whose decode steps take
equal time, given each layer's cost and the last stage's LM head (:mod:`molink.core.split_plan`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def coverage(num_layers: int, spans: Iterable[tuple[int, int, float]]) -> list[float]:
    """Per layer, the summed weight of the ``(start, end, weight)`` spans serving it."""
    served = [0.0] * num_layers
    for start, end, weight in spans:
        for layer in range(max(start, 0), min(end, num_layers - 1) + 1):
            served[layer] += weight
    return served


def uncovered(served: list[float]) -> list[tuple[int, int]]:
    """The inclusive ``(start, end)`` ranges of layers whose coverage is zero."""
    gaps: list[tuple[int, int]] = []
    for layer, count in enumerate(served):
        if count:
            continue
        if gaps and gaps[-1][1] == layer - 1:
            gaps[-1] = (gaps[-1][0], layer)
        else:
            gaps.append((layer, layer))
    return gaps


def choose_span(served: list[float], size: int, first: int) -> tuple[int, int]:
    """The window of ``size`` layers within ``first..len(served)-1`` that the swarm needs most.

    Windows are compared by their sorted coverage (lexicographically), then by the layers'
    coverage in order, then leftmost first. ``size`` is clamped to the layers available.
    """
    last = len(served) - 1
    if not 0 <= first <= last:
        raise ValueError(f"no layers to choose from: first={first}, {len(served)} layers")
    size = max(1, min(size, last - first + 1))
    best: tuple[list[float], list[float], int] | None = None
    for start in range(first, last - size + 2):
        window = served[start : start + size]
        key = (sorted(window), window, start)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2], best[2] + size - 1


def needs_move(served_by_others: list[float], span: tuple[int, int], first: int) -> bool:
    """Whether ``span`` duplicates others while some layer from ``first`` on has no server.

    Used after nodes that chose at the same moment see each other's choices.
    """
    start, end = span
    duplicate = all(v > 0 for v in served_by_others[start : end + 1])
    gap = any(v == 0 for v in served_by_others[first:])
    return duplicate and gap


def balanced_split(
    layer_costs: Sequence[float], last_stage_cost: float, stages: int
) -> list[tuple[int, int]]:
    """``stages`` contiguous inclusive spans over the layers that minimize the slowest stage.

    A stage costs the sum of its layers' costs; the last one also ``last_stage_cost`` (the LM
    head and sampling). In a pipeline every stage runs every micro-batch, so the slowest stage
    sets the decode rate. Ties go to the split whose stages are most even in layer count.
    Exact (dynamic programming over the split points).
    """
    n = len(layer_costs)
    if not 1 <= stages <= n:
        raise ValueError(f"can't split {n} layers into {stages} stages")
    prefix = [0.0]
    for cost in layer_costs:
        prefix.append(prefix[-1] + cost)
    # best[s][i]: (slowest stage, sum of squared span sizes) covering layers [0, i) with s stages
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, stages + 1):
        extra = last_stage_cost if s == stages else 0.0
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                slowest, squares = best[s - 1][j]
                key = (max(slowest, prefix[i] - prefix[j] + extra), squares + (i - j) ** 2)
                if key < best[s][i]:
                    best[s][i], cut[s][i] = key, j
    spans: list[tuple[int, int]] = []
    end = n
    for s in range(stages, 0, -1):
        start = cut[s][end]
        spans.append((start, end - 1))
        end = start
    return spans[::-1]
