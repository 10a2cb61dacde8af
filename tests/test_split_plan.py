"""Equal-decode-time spans from a checkpoint's config and safetensors headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from molink.core.split_plan import decode_costs, plan
from molink.entrypoints.cli.split_plan import main

HIDDEN, VOCAB, LAYERS = 8, 64, 6


def checkpoint(folder: Path, layers: int = LAYERS, vocab: int = VOCAB) -> str:
    """Two shards; each layer holds 2 × 8 × 8 = 128 parameters plus a norm of 8."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"num_hidden_layers": layers, "hidden_size": HIDDEN, "vocab_size": vocab}
    (folder / "config.json").write_text(json.dumps(config))
    shards: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": torch.zeros(vocab, HIDDEN)},
        {"model.norm.weight": torch.ones(HIDDEN)},
    ]
    for i in range(layers):
        shard = shards[i % 2]
        shard[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.zeros(HIDDEN, HIDDEN)
        shard[f"model.layers.{i}.mlp.up_proj.weight"] = torch.zeros(HIDDEN, HIDDEN)
        shard[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
    for n, shard in enumerate(shards):
        save_file(shard, str(folder / f"model-0000{n + 1}-of-00002.safetensors"))
    return str(folder)


def test_costs_count_each_layers_parameters_and_the_lm_head(tmp_path: Path) -> None:
    costs = decode_costs(checkpoint(tmp_path / "m"), layer_overhead=10)
    assert costs.layers == (146.0,) * LAYERS  # 2 * 64 + 8 parameters + 10 overhead
    assert costs.lm_head == VOCAB * HIDDEN
    assert costs.stage(0, 1, last=False) == 292.0
    assert costs.stage(4, 5, last=True) == 292.0 + VOCAB * HIDDEN


def test_lm_head_as_big_as_two_layers_moves_two_layers_off_the_last_stage(
    tmp_path: Path,
) -> None:
    # LM head 292 = two layers of 146: 6 + 2 = 8 units, 4 per stage.
    model = checkpoint(tmp_path / "m", vocab=292 // HIDDEN)
    costs = decode_costs(model, layer_overhead=10 + (292 % HIDDEN) / 2)
    assert plan(costs, 2) == [(0, 3), (4, 5)]


def test_cli_prints_one_span_per_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = checkpoint(tmp_path / "m")
    # Layers of 136, an LM head of 512: 0-4 (680) against 5 + head (648).
    assert main(["--model", model, "--nodes", "2", "--layer-overhead", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in lines] == [
        ["head", "--serving_layers", "0,4", "(5"],
        ["node", "1", "--serving_layers", "5,5"],
    ]
    assert "of a decode step" in lines[0]


def test_cli_refuses_what_it_cant_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "absent"), "--nodes", "2"])
    assert e.value.code == 2
    assert "no local checkpoint with a config.json" in capsys.readouterr().err
    model = checkpoint(tmp_path / "m")
    with pytest.raises(SystemExit):
        main(["--model", model, "--nodes", str(LAYERS + 1)])
    assert f"can't split {LAYERS} layers into {LAYERS + 1} stages" in capsys.readouterr().err


def test_a_checkpoint_without_safetensors_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 8})
    )
    with pytest.raises(ValueError, match="no safetensors weights"):
        decode_costs(str(folder))
