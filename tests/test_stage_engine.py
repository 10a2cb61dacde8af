"""The stage's compute loop: steps of several heads that wait together share one forward pass.

The first tests drive a real :class:`StageEngine` with a worker that records what it is asked to
run; the last ones run the demo model on a follower that two head processes share, through the
``openai`` client, against one vLLM process.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import DEMO_ENGINE_FLAGS
from probes import eventually, scrape, status, total
from reference import assert_same, make_requests, pipeline_outputs, reference_outputs
from test_head_session import new_request, step
from vllm.v1.core.sched.output import SchedulerOutput

from molink.core.head_session import HeadSession
from molink.core.kv_regions import Region
from molink.core.step import HostActivations, StepWork
from molink.engine.stage_engine import StageEngine


class Worker:
    """Runs nothing: records each pass (the steps' ids) and blocks on ``gate`` if set."""

    def __init__(self, max_tokens: int = 1000, compute_s: float = 0.0) -> None:
        self.passes: list[list[int]] = []
        self.compute_s = compute_s
        self.gate: threading.Event | None = None
        self.computing = threading.Event()
        self.max_tokens = max_tokens

    def kv_blocks(self) -> tuple[int, int]:
        return 0, 0

    def can_join(self, so: SchedulerOutput) -> bool:
        return so.total_num_scheduled_tokens > 0

    def step_limits(self) -> tuple[int, int]:
        return self.max_tokens, 100

    def execute_stage(self, steps: list[StepWork]) -> list[HostActivations]:
        self.computing.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.compute_s)
        self.passes.append([s.step_id for s in steps])
        return [HostActivations(s.tensors or {}, s.row_order) for s in steps]

    def reset_stage(self, req_ids, quiet: bool = False) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.emitted: list[HostActivations] = []
        self.failed: list[str] = []

    def emit(self, work: StepWork, output: object) -> None:
        self.emitted.append(output)

    def fail(self, work: StepWork, error: str) -> None:
        self.failed.append(error)


def work(step_id: int, head: str, so: SchedulerOutput) -> StepWork:
    rows = so.total_num_scheduled_tokens
    return StepWork(
        step_id=step_id,
        epoch=0,
        scheduler_output=so,
        scheduler_output_bytes=b"",
        tensors={"hidden_states": torch.zeros(rows, 4)},
        session=head,
        row_order=list(so.num_scheduled_tokens),
    )


def decode(*req_ids: str) -> SchedulerOutput:
    so = step(cached=dict.fromkeys(req_ids))
    so.total_num_scheduled_tokens = len(req_ids)
    return so


def prefill(req_id: str) -> SchedulerOutput:
    so = step(new=[new_request(req_id, [0])])
    so.total_num_scheduled_tokens = 3
    return so


@pytest.fixture(params=[0.0])
def engine(request):
    worker = Worker(compute_s=0.2 if request.param else 0.0)
    engine = StageEngine(worker, (3, 5), join_wait=request.param)
    sinks = {}
    for head in ("a", "b", "c"):
        sinks[head] = Sink()
        engine.start_epoch(HeadSession(head, region=Region(tuple(range(10)))), 0, sinks[head])
    yield engine, worker, sinks
    engine.shutdown()


def run_held(engine: StageEngine, worker: Worker, works: list[StepWork]) -> None:
    """Submit ``works`` while the stage computes a step of head ``c``, so that they wait
    together; then let it go on and wait until the stage ran them all."""
    worker.gate = threading.Event()
    worker.computing.clear()
    engine.submit(work(99, "c", prefill("c1")))
    assert worker.computing.wait(10)
    for w in works:
        engine.submit(w)
    worker.gate.set()
    done = threading.Event()
    engine._on_compute_thread(done.set)
    done.wait(10)


def test_steps_of_heads_that_wait_together_share_a_pass_in_order(engine) -> None:
    engine, worker, sinks = engine
    a1, a2 = work(1, "a", prefill("a1")), work(2, "a", decode("a1"))
    b1, b2 = work(3, "b", prefill("b1")), work(4, "b", decode("b1"))
    run_held(engine, worker, [a1, a2, b1, b2])
    # One step per head per pass, each head's steps in order; a pass never waits for more.
    assert worker.passes == [[99], [1, 3], [2, 4]]
    assert [o.order for o in sinks["a"].emitted] == [["a1"], ["a1"]]
    assert [o.order for o in sinks["b"].emitted] == [["b1"], ["b1"]]
    assert engine.steps_done == 5


def test_heads_may_number_their_steps_alike(engine) -> None:
    """Each head numbers its own steps: two waiting steps may match in every field but their
    head (and tensors, which can't be compared with ==)."""
    engine, worker, sinks = engine
    a2, b2 = work(2, "a", decode("x")), work(2, "b", decode("x"))
    run_held(engine, worker, [work(1, "a", prefill("a1")), b2, a2])
    assert worker.passes[:2] == [[99], [1, 2]]  # a's step 2 stayed queued, and then ran
    assert sinks["a"].failed == ["layers 3-5: request 'x' belongs to another head on this stage"]


def test_a_step_that_cant_join_keeps_its_heads_later_steps_behind_it(engine) -> None:
    engine, worker, _ = engine
    empty = work(2, "a", step(finished={"gone"}))  # no tokens: runs alone
    empty.tensors = None
    run_held(engine, worker, [empty, work(3, "a", decode("a1")), work(4, "b", prefill("b1"))])
    assert worker.passes == [[99], [2], [3, 4]]


def test_a_pass_stays_within_the_stages_token_budget(engine) -> None:
    engine, worker, _ = engine
    worker.max_tokens = 4  # a prefill (3 tokens) and one decode
    run_held(
        engine,
        worker,
        [work(1, "a", prefill("a1")), work(2, "b", prefill("b1")), work(3, "c", decode("c1"))],
    )
    assert worker.passes == [[99], [1, 3], [2]]


def test_a_head_naming_another_heads_request_is_refused_and_the_other_unharmed(engine) -> None:
    engine, worker, sinks = engine
    theirs = work(2, "b", decode("a1"))  # b names a's running request
    run_held(engine, worker, [work(1, "a", prefill("a1")), theirs, work(3, "a", decode("a1"))])
    assert sinks["b"].failed == ["layers 3-5: request 'a1' belongs to another head on this stage"]
    assert worker.passes == [[99], [1], [3]]
    assert len(sinks["a"].emitted) == 2 and not sinks["a"].failed
    lying = work(4, "b", decode("b1"))
    lying.row_order = ["b1", "a1"]  # rows it doesn't own
    run_held(engine, worker, [lying])
    assert "row order" in sinks["b"].failed[-1]


@pytest.mark.parametrize("engine", [0.0, 1.0], indirect=True, ids=["no-wait", "wait"])
def test_heads_that_shared_a_pass_are_waited_for_only_with_join_wait(engine) -> None:
    """Each head sends its next step when the last one's result is back: the second head's
    comes a little after the first's, and shares its pass only if the stage waits for it."""
    engine, worker, _ = engine
    run_held(engine, worker, [work(1, "a", prefill("a1")), work(2, "b", prefill("b1"))])
    engine.submit(work(3, "a", decode("a1")))
    time.sleep(0.05)
    engine.submit(work(4, "b", decode("b1")))
    done = threading.Event()
    time.sleep(0.01)
    engine._on_compute_thread(done.set)
    done.wait(10)
    joined = [3, 4] in worker.passes
    assert joined == (engine.join_wait > 0), worker.passes


# ------------------------------------------------------------------ the demo model, two heads

DEMO_ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "max_num_seqs": 8}
REQUESTS = make_requests(8)


@pytest.fixture(scope="module")
def two_heads(module_swarm, demo_model):
    """Two heads on light spans and a follower that does most of the work and waits for the
    heads whose steps shared its last passes (``--join-wait``), so that it joins their steps
    whatever the machine's load (two heads' steps seldom wait together by themselves)."""
    flags = [*DEMO_ENGINE_FLAGS, "--join-wait", "1"]
    follower = module_swarm.start("joined-follower", demo_model, "4,29", flags)
    heads = []
    for name in ("joined-head1", "joined-head2"):  # the second joins a follower in use
        heads.append(
            module_swarm.start(name, demo_model, "0,3", DEMO_ENGINE_FLAGS, peers=[follower])
        )
        heads[-1].wait_healthy()
    return follower, heads


@pytest.fixture(scope="module")
def demo_requests_reference(demo_model, tmp_path_factory) -> list[dict]:
    return reference_outputs(
        demo_model, tmp_path_factory.mktemp("joined-ref"), REQUESTS, engine=DEMO_ENGINE
    )


def joined_steps(follower) -> float:
    return total(scrape(follower), "molink_stage_joined_steps_total")


def test_two_heads_share_the_followers_passes_and_answer_like_one_vllm_process(
    two_heads, demo_model, demo_requests_reference
):
    follower, heads = two_heads
    before = joined_steps(follower)

    async def both() -> list[list[dict]]:
        return await asyncio.gather(
            *(pipeline_outputs(h.base_url, demo_model, REQUESTS) for h in heads)
        )

    for got in asyncio.run(both()):
        assert_same(demo_requests_reference, got)
    assert joined_steps(follower) > before  # the two heads' steps really shared passes


def test_kill_9_of_a_head_while_steps_are_joined_leaves_the_other_unchanged(
    two_heads, demo_model, demo_requests_reference
):
    follower, (survivor, doomed) = two_heads
    before = joined_steps(follower)

    async def kill_while_joined() -> list[dict]:
        survivor_outputs = asyncio.create_task(
            pipeline_outputs(survivor.base_url, demo_model, REQUESTS)
        )
        doomed_outputs = asyncio.create_task(
            pipeline_outputs(doomed.base_url, demo_model, REQUESTS)
        )
        await asyncio.to_thread(
            eventually, lambda: joined_steps(follower) > before, 120, "joined steps"
        )
        assert not survivor_outputs.done()
        doomed.kill()
        await asyncio.gather(doomed_outputs, return_exceptions=True)
        return await survivor_outputs

    assert_same(demo_requests_reference, asyncio.run(kill_while_joined()))
    eventually(lambda: len(status(follower)["heads"]) == 1, timeout=60, what="the head released")
