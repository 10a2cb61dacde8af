"""The replay log (molink.core.replay_log) and the replay handshake (molink.core.replay_plan)."""

from __future__ import annotations

import threading

import torch

from molink.core.replay_log import ReplayLog
from molink.core.replay_plan import ReplayHandshake, ReplayItem

HIDDEN = 4


def rows(start: int, num: int) -> dict[str, torch.Tensor]:
    """Rows whose values are their positions (each [num, HIDDEN])."""
    values = torch.arange(start, start + num, dtype=torch.float32)[:, None].expand(num, HIDDEN)
    return {"hidden_states": values.clone(), "residual": -values}


def test_rows_come_back_in_position_order_across_chunks():
    log = ReplayLog(1 << 20)
    log.record("a", 0, rows(0, 5))
    log.record("a", 5, rows(5, 1))
    log.record("a", 6, rows(6, 3))
    assert log.length("a") == 9
    got = log.rows("a", 3, 8)
    assert got is not None
    assert got["hidden_states"][:, 0].tolist() == [3, 4, 5, 6, 7]
    assert got["residual"][:, 0].tolist() == [-3, -4, -5, -6, -7]
    assert log.rows("a", 0, 10) is None  # not all logged
    assert log.nbytes == 9 * 2 * HIDDEN * 4


def test_the_log_copies_what_it_is_given():
    log = ReplayLog(1 << 20)
    given = rows(0, 2)
    log.record("a", 0, given)
    given["hidden_states"].fill_(99)
    assert log.rows("a", 0, 2)["hidden_states"][:, 0].tolist() == [0, 1]


def test_a_restart_replaces_the_rows_after_it():
    """A preempted request recomputes from an earlier position: the new rows replace the old."""
    log = ReplayLog(1 << 20)
    log.record("a", 0, rows(0, 6))
    log.record("a", 3, {k: v + 100 for k, v in rows(3, 2).items()})
    assert log.length("a") == 5
    assert log.rows("a", 0, 5)["hidden_states"][:, 0].tolist() == [0, 1, 2, 103, 104]
    assert log.nbytes == 5 * 2 * HIDDEN * 4


def test_a_gap_drops_the_request_until_it_starts_again():
    log = ReplayLog(1 << 20)
    log.record("a", 0, rows(0, 2))
    log.record("a", 5, rows(5, 1))  # positions 2-4 never came
    assert log.length("a") == 0 and len(log) == 0
    log.record("a", 6, rows(6, 1))
    assert len(log) == 0
    log.record("a", 0, rows(0, 1))
    assert log.length("a") == 1


def test_finished_requests_are_dropped_and_the_cap_drops_the_largest():
    row_bytes = 2 * HIDDEN * 4
    log = ReplayLog(10 * row_bytes)
    log.record("small", 0, rows(0, 3))
    log.record("large", 0, rows(0, 6))
    log.record("small", 3, rows(3, 1))
    assert log.nbytes == 10 * row_bytes
    log.record("new", 0, rows(0, 2))  # 12 rows: over the cap
    assert log.length("large") == 0 and log.length("small") == 4 and log.length("new") == 2
    log.drop({"small", "unknown"})
    assert len(log) == 1 and log.nbytes == 2 * row_bytes


def test_handshake_plan_then_outcome():
    handshake = ReplayHandshake()
    plan = {"a": ReplayItem("a", (1, 2), (7,), 2)}
    assert handshake.offer(3, plan)
    assert handshake.take(3, 0.0) == (True, plan)
    assert handshake.take(3, 0.0) == (False, None)  # taken once
    assert handshake.outcome(3) == (False, frozenset())  # not finished yet
    handshake.finish(3, True, frozenset({"b"}))
    assert handshake.take(3, 5.0) == (True, None)  # a retry of the epoch gets no plan again
    assert handshake.outcome(3) == (True, frozenset({"b"}))
    assert handshake.outcome(3) == (False, frozenset())  # read once


def test_handshake_waits_for_the_scheduler_and_refuses_a_late_offer():
    handshake = ReplayHandshake()
    threading.Timer(0.05, handshake.offer, args=(1, None)).start()
    assert handshake.take(1, 5.0) == (True, None)  # the scheduler declined: nothing to replay
    assert handshake.take(2, 0.0) == (False, None)  # no answer: given up
    assert not handshake.offer(2, {})  # too late: the scheduler must recompute
