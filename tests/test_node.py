"""Chain assembly from real node processes: missing, overlapping and mismatched slices."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import build_qwen3_checkpoint  # noqa: E402

FAST_FAIL = ["--chain_timeout", "6"]


def test_missing_layers_are_named(swarm, qwen3_model):
    head = swarm.start("head", qwen3_model, "0,2", FAST_FAIL)
    assert head.wait_exit(timeout=180) == 2
    log = head.log()
    assert "Can't assemble the pipeline" in log and "3-5" in log


def test_overlapping_slices_are_refused(swarm, qwen3_model):
    follower = swarm.start("stage", qwen3_model, "2,5")
    head = swarm.start("head", qwen3_model, "0,2", FAST_FAIL, peers=[follower])
    assert head.wait_exit(timeout=180) == 2
    log = head.log()
    assert "Can't assemble the pipeline" in log and "served by both" in log


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
