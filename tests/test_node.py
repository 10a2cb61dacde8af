"""Nodes: chain assembly from real node processes (missing and mismatched slices) and spans
chosen by followers started without --serving_layers (over a real DHT)."""

from __future__ import annotations

import shutil

from safetensors.torch import load_file, save_file
from test_dht import make_ann

from benchmark.tiny_models import build_checkpoint
from molink.comm.membership import Membership
from molink.entrypoints.span_joining import choose_own_span
from molink.model_identity import ModelIdentity
from molink.weight_digest import CACHE_NAME

FAST_FAIL = ["--chain_timeout", "6"]


def test_missing_layers_are_named(swarm, qwen3_model):
    head = swarm.start("head", qwen3_model, "0,2", FAST_FAIL)
    assert head.wait_exit(timeout=180) == 2
    log = head.log()
    assert "Can't assemble the pipeline" in log and "3-5" in log


def test_other_model_and_other_weights_are_refused(swarm, qwen3_model, tmp_path_factory):
    """Two followers offer layers 3-5, and the head refuses each with its own cause: one serves
    another model (8 layers), the other has this model's config with one tensor of layer 4
    changed (a fine-tune, a bad download), which the head finds by comparing the follower's
    announced weights digest with its own checkpoint's."""
    other = build_checkpoint(tmp_path_factory.mktemp("other") / "qwen3-8", "qwen3", num_layers=8)
    tuned = tmp_path_factory.mktemp("tuned") / "qwen3-tuned"
    shutil.copytree(qwen3_model, tuned, ignore=shutil.ignore_patterns(CACHE_NAME))
    for shard in tuned.glob("*.safetensors"):
        weights = load_file(shard)
        name = next((n for n in sorted(weights) if ".layers.4." in n), None)
        if name is not None:
            weights[name] = weights[name] * 1.01
            save_file(weights, shard, metadata={"format": "pt"})
    followers = [swarm.start("other", other, "3,7"), swarm.start("tuned", str(tuned), "3,5")]
    for follower in followers:
        follower.wait_healthy()  # up before the head's short --chain_timeout starts counting
    head = swarm.start("head", qwen3_model, "0,2", FAST_FAIL, peers=followers)
    assert head.wait_exit(timeout=180) == 2
    log = head.log()
    assert "Can't assemble the pipeline" in log
    assert "serves layers 3-7 of a different model" in log
    assert "serves layers 3-5 with different weights" in log


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
