"""MoLink flags and the head-to-stage configuration."""

from __future__ import annotations

import argparse
import json

import pytest

from molink.config import MoLinkConfig, add_molink_args, parse_serving_layers
from molink.stage_spec import StageConfig, StagePlacement


@pytest.mark.parametrize("value", ["5", "3,1", "a,b", "-1,2"])
def test_serving_layers_syntax_errors(value):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_serving_layers(value)


def test_flags_parse_with_defaults():
    parser = add_molink_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--serving-layers", "0,14", "--initial-peer", "h:1", "--initial-peer", "/ip4/x"]
    )
    cfg = MoLinkConfig.from_args(args)
    assert cfg.serving_layers == (0, 14)
    assert cfg.initial_peers == ("h:1", "/ip4/x")
    assert cfg.layers_for(30) == (0, 14)
    assert MoLinkConfig().layers_for(30) == (0, 29)
    assert not cfg.chooses_span and cfg.step_timeout == 30.0
    assert MoLinkConfig(initial_peers=("h:1",)).chooses_span  # a follower without a span
    auto = MoLinkConfig.from_args(parser.parse_args(["--initial-peer", "h:1", "--num-layers", "7"]))
    assert auto.chooses_span and auto.layers_to_serve == 7
    with pytest.raises(ValueError, match="30 layers"):
        MoLinkConfig(serving_layers=(15, 30)).layers_for(30)


def test_stage_config_round_trip():
    cfg = StageConfig(
        placement=StagePlacement(15, 29, 30),
        model_hash="abc",
        engine_overrides={"max_num_seqs": 8, "dtype": "float32"},
        wire_dtype="float16",
    )
    assert StageConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["placement"].update(end_layer=30),
        lambda d: d["placement"].update(start_layer=4, end_layer=3),
        lambda d: d.update(placement=[0, 5]),
        lambda d: d["engine_overrides"].update(model="/etc/passwd"),
        lambda d: d["engine_overrides"].update(max_num_seqs=[1]),
        lambda d: d.update(wire_dtype="int8"),
    ],
)
def test_stage_config_rejects_bad_input(mutate):
    d = json.loads(StageConfig(StagePlacement(0, 2, 6), "abc", {"max_num_seqs": 8}).to_json())
    mutate(d)
    with pytest.raises(ValueError):
        StageConfig.from_json(json.dumps(d))


@pytest.mark.parametrize(
    ("span", "rank", "partition"),
    [
        ((0, 14), 0, (15, 15)),
        ((15, 29), 1, (15, 15)),
        ((10, 19), 1, (10, 10, 10)),
        ((0, 29), 0, (30,)),
    ],
)
def test_placement_depends_only_on_the_stage_span(span, rank, partition):
    placement = StagePlacement(*span, 30)
    assert placement.rank == rank and placement.partition == partition
