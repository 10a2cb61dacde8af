"""Nodes: chain assembly from real node processes (missing and mismatched slices) and spans
chosen by followers started without --serving_layers (over a real DHT)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import build_qwen3_checkpoint  # noqa: E402
from test_dht import make_ann

from molink.comm.dht import Membership
from molink.config import ModelIdentity
from molink.engine.node import choose_own_span

FAST_FAIL = ["--chain_timeout", "6"]


def test_missing_layers_are_named(swarm, qwen3_model):
    head = swarm.start("head", qwen3_model, "0,2", FAST_FAIL)
    assert head.wait_exit(timeout=180) == 2
    log = head.log()
    assert "Can't assemble the pipeline" in log and "3-5" in log


def test_other_model_is_refused(swarm, qwen3_model, tmp_path_factory):
    other = build_qwen3_checkpoint(tmp_path_factory.mktemp("other") / "qwen3-8", num_layers=8)
    follower = swarm.start("stage", other, "3,7")
    head = swarm.start("head", qwen3_model, "0,2", FAST_FAIL, peers=[follower])
    assert head.wait_exit(timeout=180) == 2
    assert "different model" in head.log()


def test_bad_serving_layers_is_a_clear_error(swarm, qwen3_model):
    node = swarm.start("head", qwen3_model, "0,9")
    assert node.wait_exit(timeout=180) == 2
    assert "the model has 6 layers" in node.log()


def test_followers_choose_spans_that_cover_the_model_then_the_thinnest():
    """Head 0-9 of a 30-layer model; followers of 10 layers join without --serving_layers."""
    identity = ModelIdentity(name="test-model", config_hash="h1", num_layers=30)
    members: list[Membership] = []
    try:
        head = Membership(host="127.0.0.1", announce_host="127.0.0.1", startup_timeout=30)
        members.append(head)
        head.announce(make_ann(head, 0, 9, state="online"), period=1.0)
        peers = head.visible_maddrs()
        chosen = []
        for _ in range(4):
            m = Membership(initial_peers=peers, host="127.0.0.1", startup_timeout=30)
            members.append(m)

            def announce(span, m=m):
                m.announce(make_ann(m, *span), period=1.0)

            span = choose_own_span(m, identity, 10, announce, settle_s=1.0)
            m.announce(make_ann(m, *span, state="online"), period=1.0)
            chosen.append(span)
        # The first three cover 10-29 with no gap; the fourth doubles the thinner half.
        assert chosen[:2] == [(10, 19), (20, 29)]
        assert chosen[2] == (10, 19)
        assert chosen[3] == (20, 29)
    finally:
        for m in reversed(members):
            m.shutdown()
