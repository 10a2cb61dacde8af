"""MoLink flags and the head-to-stage configuration."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
from vllm.utils.argparse_utils import FlexibleArgumentParser

from molink.config import (
    MoLinkConfig,
    add_molink_args,
    declared_flags,
    default_announce_host,
    parse_serving_layers,
)
from molink.security.settings import SecurityFiles
from molink.stage_spec import StageConfig, StagePlacement

#: For each flag: its arguments and the field value they give (every flag needs one).
SAMPLES = {
    "--serving-layers": (["3,7"], (3, 7)),
    "--num-layers": (["7"], 7),
    "--initial-peer": (["h:1"], ("h:1",)),
    "--grpc-port": (["6000"], 6000),
    "--dht-port": (["6001"], 6001),
    "--announce-host": (["10.0.0.2"], "10.0.0.2"),
    "--announce-port": (["6002"], 6002),
    "--listen-host": (["127.0.0.1"], "127.0.0.1"),
    "--chain-timeout": (["6"], 6.0),
    "--step-timeout": (["2.5"], 2.5),
    "--outage-timeout": (["9"], 9.0),
    "--rebalance-after": (["0"], 0.0),
    "--recovery": (["recompute"], "recompute"),
    "--replay-log-mb": (["0.5"], 0.5),
    "--hot-standby": ([], True),
    "--leave-timeout": (["0"], 0.0),
    "--join-wait": (["0.25"], 0.25),
    "--reachable": (["no"], "no"),
    "--wire-dtype": (["bfloat16"], "bfloat16"),
    "--wire-compression": (["zlib"], "zlib"),
    "--max-micro-batches": (["4"], 4),
    "--min-micro-batches": (["2"], 2),
    "--step-trace": (["trace.jsonl"], os.path.abspath("trace.jsonl")),
    "--swarm-key-file": (["swarm.key"], os.path.abspath("swarm.key")),
    "--node-key-file": (["node.key"], os.path.abspath("node.key")),
    "--allowed-nodes-file": (["/etc/nodes"], "/etc/nodes"),
    "--insecure": ([], True),
}


@pytest.fixture
def parser(monkeypatch) -> FlexibleArgumentParser:
    """MoLink's flags on vLLM's parser, without a swarm key from the environment."""
    monkeypatch.delenv("MOLINK_SWARM_KEY_FILE", raising=False)
    return add_molink_args(FlexibleArgumentParser())


def field_value(cfg: MoLinkConfig, path: tuple[str, ...]):
    value = cfg
    for name in path:
        value = getattr(value, name)
    return value


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


def test_every_field_is_declared_with_its_flag():
    paths = {d.path for d in declared_flags()}
    top = {f.name for f in dataclasses.fields(MoLinkConfig)} - {"security_files"}
    nested = {("security_files", f.name) for f in dataclasses.fields(SecurityFiles)}
    assert paths == {(name,) for name in top} | nested
    assert {d.flag.name for d in declared_flags()} == set(SAMPLES)
    for d in declared_flags():  # a declared default is the dataclass's
        assert field_value(MoLinkConfig(), d.path) == d.default, d.flag.name


def test_parser_defaults_are_the_field_defaults(parser):
    for d in declared_flags():  # announce_host: computed when not given
        unparsed = argparse.Namespace(**{d.flag.dest: parser.get_default(d.flag.dest)})
        assert d.path == ("announce_host",) or d.flag.read(unparsed) == d.default, d.flag.name
    args = parser.parse_args([])
    expected = dataclasses.replace(MoLinkConfig(), announce_host=default_announce_host())
    assert MoLinkConfig.from_args(args) == expected


def test_swarm_key_file_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOLINK_SWARM_KEY_FILE", "swarm.key")
    cfg = MoLinkConfig.from_args(add_molink_args(FlexibleArgumentParser()).parse_args([]))
    assert cfg.security_files == SecurityFiles(swarm_key_file=os.path.abspath("swarm.key"))


@pytest.mark.parametrize("spelling", ["dashes", "underscores"])
@pytest.mark.parametrize("declared", declared_flags(), ids=lambda d: d.flag.name)
def test_each_flag_parses(parser, declared, spelling):
    values, expected = SAMPLES[declared.flag.name]
    name = declared.flag.name
    if spelling == "underscores":
        name = "--" + name.removeprefix("--").replace("-", "_")
    cfg = MoLinkConfig.from_args(parser.parse_args([name, *values]))
    assert field_value(cfg, declared.path) == expected
    # every other field keeps its default
    others = [d for d in declared_flags() if d.path not in (declared.path, ("announce_host",))]
    assert all(field_value(cfg, d.path) == d.default for d in others)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--serving-layers", "3,1"], "argument --serving-layers: --serving_layers 3,1: need 0"),
        (["--serving_layers", "7"], "--serving_layers takes START,END (inclusive)"),
        (["--num-layers", "0"], "argument --num-layers: must be at least 1, got 0"),
        (["--max-micro-batches", "two"], "argument --max-micro-batches: expected an integer"),
        (["--grpc-port", "70000"], "argument --grpc-port: a port is 1..65535, got 70000"),
        (["--grpc_port", "0"], "argument --grpc-port: a port is 1..65535, got 0"),
        (["--dht-port", "-1"], "argument --dht-port: a port is 1..65535 (0: any free)"),
        (["--announce-port", "x"], "argument --announce-port: expected an integer, got 'x'"),
        (["--step-timeout", "0"], "argument --step-timeout: must be more than 0 seconds"),
        (["--outage-timeout", "nan"], "argument --outage-timeout: must be more than 0 seconds"),
        (["--chain-timeout", "soon"], "argument --chain-timeout: expected a number, got 'soon'"),
        (["--leave-timeout", "-1"], "argument --leave-timeout: must be 0 seconds or more"),
        (["--join-wait", "2"], "argument --join-wait: must be between 0 and 1, got 2"),
        (["--reachable", "maybe"], "argument --reachable: invalid choice: 'maybe'"),
        (["--wire-dtype", "int8"], "argument --wire-dtype: invalid choice: 'int8'"),
        (["--wire-compression", "gzip"], "argument --wire-compression: invalid choice: 'gzip'"),
        (["--insecure", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_bad_values_are_refused(parser, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_shows_each_default_once(parser):
    for d in declared_flags():
        if "%(default" not in d.flag.help:
            continue  # vLLM's formatter appends "(default: ...)"
        alone = FlexibleArgumentParser(prog="p")
        d.flag.add_to(alone, d.default)
        text = " ".join(super(FlexibleArgumentParser, alone).format_help().split())
        assert text.count("(default") == 1, text
    # every group (what `--help=all` shows), with vLLM's formatter
    text = " ".join(super(FlexibleArgumentParser, parser).format_help().split())
    assert all(d.flag.name in text for d in declared_flags())
    assert "Port of this node's gRPC service (default 50051)." in text
    assert "stage is lost before they fail (default 120)." in text
    assert "MoLink security:" in text and "Env: MOLINK_SWARM_KEY_FILE." in text
