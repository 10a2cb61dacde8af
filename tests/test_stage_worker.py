"""The stage worker keeps one persistent batch per head on a shared stage."""

from __future__ import annotations

from types import SimpleNamespace

from molink.worker.stage_worker import StageHooks


def test_a_head_that_leaves_takes_no_other_heads_batch_with_it() -> None:
    """Head b used the stage last, then left: head a's next step gets a's own batch back, not
    the empty one b left in the runner (a would lose its requests: a stage loss)."""
    hooks = object.__new__(StageHooks)
    hooks.model_runner = runner = SimpleNamespace(input_batch="a's batch", requests={"a1": 1})
    hooks._batch_owner, hooks._other_batches = None, {"b": ("b's batch", {"b1": 1})}
    hooks.use_batch_of("a")
    hooks.use_batch_of("b")
    assert (runner.input_batch, runner.requests) == ("b's batch", {"b1": 1})
    runner.requests.clear()  # b left: reset_stage forgot its requests
    hooks.forget_batch_of("b")
    hooks.use_batch_of("a")
    assert (runner.input_batch, runner.requests) == ("a's batch", {"a1": 1})
    assert hooks._other_batches == {}
    hooks.forget_batch_of("a")
    hooks.use_batch_of("c")  # a head after every other left takes the runner's batch over
    assert runner.input_batch == "a's batch" and hooks._batch_owner == "c"
