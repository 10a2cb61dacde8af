"""Replay steps into a lost span's new node (molink.executor.span_replay), without a network:
the acknowledgements come from a stand-in for the node's result stream."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from molink.comm import codec
from molink.core.replay_log import ReplayLog
from molink.core.replay_plan import ReplayItem
from molink.executor.span_replay import WINDOW, ReplayFailed, SpanReplay

BLOCK = 4


def stage(span: tuple[int, int], name: str) -> SimpleNamespace:
    return SimpleNamespace(span=span, __str__=lambda: name)


def test_one_new_node_on_the_same_spans_is_replayed():
    a, b, c, c2 = stage((1, 3), "a"), stage((4, 5), "b"), stage((1, 3), "c"), stage((4, 5), "c2")
    assert SpanReplay.new_node([a, b], [c, b]) == (0, "")
    assert SpanReplay.new_node([a, b], [a, c2]) == (1, "")
    assert SpanReplay.new_node([a, b], [a, b]) == (None, "")  # nothing lost its KV cache
    assert SpanReplay.new_node([a, b], [c, c2]) == (None, "2 stages of the new chain are new nodes")
    assert "differently" in SpanReplay.new_node([a, b], [stage((1, 4), "d"), b])[1]
    assert "differently" in SpanReplay.new_node([a, b], [stage((1, 5), "e")])[1]


def logged(num: int) -> ReplayLog:
    log = ReplayLog(1 << 20)
    values = torch.arange(num, dtype=torch.float32)[:, None].expand(num, 2).clone()
    log.record("r", 0, {"hidden_states": values, "residual": values + 0.5})
    return log


def test_a_request_is_replayed_in_chunks_into_its_blocks():
    replay = SpanReplay(logged(12), BLOCK, chunk_tokens=8, max_requests=4)
    item = ReplayItem("r", tuple(range(100, 112)), (7, 3, 9), 12)
    sent = []
    ids = iter(range(1, 100))

    def send(work, activations):
        sent.append((work, activations.wait()))
        replay.acknowledged(work.step_id)

    assert replay.run({"r": item}, 5, (3, True), "s", lambda: next(ids), send, 5) == (12, set())
    assert [w.step_id for w, _ in sent] == [1, 2]
    for (work, tensors), (start, end, blocks) in zip(
        sent, [(0, 8, [7, 3]), (8, 12, [7, 3, 9])], strict=True
    ):
        assert work.replay and not work.sample and work.epoch == 5 and work.session == "s"
        assert work.replay_layer == 3
        new = work.scheduler_output.scheduled_new_reqs[0]
        assert new.num_computed_tokens == start and new.block_ids == (blocks,)
        assert new.prompt_token_ids == list(range(100, 100 + end))
        assert work.scheduler_output.num_scheduled_tokens == {new.req_id: end - start}
        assert tensors["hidden_states"][:, 0].tolist() == list(range(start, end))
        # The step crosses the wire like any other.
        decoded, _ = codec.loads_step(work.scheduler_output_bytes)
        assert decoded.scheduled_new_reqs[0].num_computed_tokens == start


def test_requests_share_steps_up_to_the_token_budget_and_batch_size():
    log = ReplayLog(1 << 20)
    for req_id, num in (("a", 5), ("b", 6)):
        values = torch.arange(num, dtype=torch.float32)[:, None] + (100 if req_id == "b" else 0)
        log.record(req_id, 0, {"hidden_states": values, "residual": values})
    plan = {
        "a": ReplayItem("a", tuple(range(5)), (1, 2), 5),
        "b": ReplayItem("b", tuple(range(6)), (3, 4), 6),
    }
    ids = iter(range(1, 100))
    sent = []

    def send(work, activations):
        new = work.scheduler_output.scheduled_new_reqs
        sent.append(
            ([(n.req_id[-1], n.num_computed_tokens) for n in new], activations.wait()["residual"])
        )
        replay.acknowledged(work.step_id)

    replay = SpanReplay(log, BLOCK, chunk_tokens=8, max_requests=4)
    assert replay.run(plan, 1, (1, True), "s", lambda: next(ids), send, 5) == (11, set())
    assert [pieces for pieces, _ in sent] == [[("a", 0), ("b", 0)], [("b", 3)]]
    assert sent[0][1][:, 0].tolist() == [0, 1, 2, 3, 4, 100, 101, 102]  # rows in step order
    assert sent[1][1][:, 0].tolist() == [103, 104, 105]

    sent.clear()
    replay = SpanReplay(log, BLOCK, chunk_tokens=8, max_requests=1)
    assert replay.run(plan, 2, (1, True), "s", lambda: next(ids), send, 5) == (11, set())
    assert [pieces for pieces, _ in sent] == [[("a", 0)], [("b", 0)]]


def test_steps_wait_for_acknowledgements_and_a_failure_aborts():
    replay = SpanReplay(logged(40), BLOCK, chunk_tokens=BLOCK, max_requests=4)
    item = ReplayItem("r", tuple(range(40)), tuple(range(10)), 40)
    ids = iter(range(1, 100))
    sent = []

    def send(work, _):
        sent.append(work.step_id)
        if len(sent) == WINDOW:  # the chain fails while the replay waits
            threading.Timer(0.1, replay.abort, args=(3, "lost stage x")).start()

    with pytest.raises(ReplayFailed, match="lost stage x"):
        replay.run({"r": item}, 3, (1, True), "s", lambda: next(ids), send, 5)
    assert len(sent) == WINDOW  # the fifth waits for the first's acknowledgement
    assert replay.aborted

    with pytest.raises(ReplayFailed, match="no acknowledgement within 0.2 s"):
        replay.run({"r": item}, 4, (1, True), "s", lambda: next(ids), lambda *_: None, 0.2)


def test_requests_without_logged_rows_recompute_alone():
    """The head's log lacks one request (the head is the source); a follower source says it
    lacks another (an acknowledgement with an error): only those two recompute."""
    replay = SpanReplay(logged(8), BLOCK, chunk_tokens=64, max_requests=1)
    plan = {
        "r": ReplayItem("r", tuple(range(8)), (1, 2), 8),
        "gone": ReplayItem("gone", tuple(range(8)), (3, 4), 8),
    }
    ids = iter(range(1, 100))
    acks = {}

    def send(work, activations):
        acks[work.step_id] = activations
        replay.acknowledged(work.step_id)

    assert replay.run(plan, 1, (1, True), "s", lambda: next(ids), send, 1) == (8, {"gone"})
    assert len(acks) == 1  # "gone" was never sent

    def from_a_follower(work, activations):
        assert activations is None  # the stage before the target adds the rows
        name = work.scheduler_output.scheduled_new_reqs[0].req_id
        replay.acknowledged(work.step_id, "no rows" if name.endswith("gone") else "")

    got = replay.run(plan, 2, (4, False), "s", lambda: next(ids), from_a_follower, 1)
    assert got == (8, {"gone"})
