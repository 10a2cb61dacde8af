"""Which models MoLink serves: DeepSeek-V2-style MLA with MoE layers through a pipeline, exact
and through a lost stage; and a refusal, at start and before any weight loads, of a model vLLM
can't split into stages. (``benchmark/arch_matrix.py`` checks every family.)"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from conftest import QWEN3_ENGINE_FLAGS
from reference import (
    ENGINE,
    STREAM_TOKENS,
    assert_same,
    pipeline_outputs,
    reference_outputs,
    stream_all,
)
from vllm.engine.arg_utils import EngineArgs

from benchmark.tiny_models import FAMILIES, build_checkpoint, build_tokenizer
from molink.engine.model_support import UnsupportedModel, check_servable
from molink.entrypoints.openai.api_server import main


def unpipelinable_model(folder: Path) -> str:
    """A config (and tokenizer) of Gemma 3n, whose vLLM class doesn't implement SupportsPP; no
    weights at all, so the node must refuse before loading any."""
    from transformers import Gemma3nTextConfig

    tokenizer = build_tokenizer(folder)
    config = Gemma3nTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    config.architectures = ["Gemma3nForCausalLM"]
    config.save_pretrained(folder)
    return str(folder)


def test_a_model_vllm_can_pipeline_passes(qwen3_model: str) -> None:
    check_servable(EngineArgs(model=qwen3_model), "qwen3-tiny")


def test_a_model_without_supports_pp_is_refused(tmp_path: Path) -> None:
    model = unpipelinable_model(tmp_path / "gemma3n")
    with pytest.raises(UnsupportedModel, match="gemma3n .*Gemma3nForCausalLM.*SupportsPP"):
        check_servable(EngineArgs(model=model), "gemma3n")


def test_the_node_exits_at_start_with_the_reason(tmp_path: Path, capfd) -> None:
    model = unpipelinable_model(tmp_path / "gemma3n")
    argv = ["--model", model, "--serving_layers", "0,1", "--port", "0"]
    argv += ["--listen_host", "127.0.0.1", "--enforce-eager"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    captured = capfd.readouterr()
    logged = captured.out + captured.err  # vLLM's log handler writes to stdout
    assert "MoLink can't serve gemma3n (Gemma3nForCausalLM)" in logged
    assert "SupportsPP" in logged


# vLLM's CPU MLA backend uses 16-token blocks whatever is asked; the KV cache is left at its
# default size (no block-count override, which would fall short of max_model_len at 16). And
# vLLM 0.32's CPU MLA isn't exact when requests share a step (one process gives batch-dependent,
# run-to-run different outputs; benchmark/arch_matrix.py), so requests run one at a time, where
# it is deterministic, and both sides can be compared token for token. The reference CPU MLA
# backend is chosen on both sides: on a CPU with AMX vLLM would pick one that refuses float32
# (FAMILIES["deepseek_v2"].engine_args).
MLA_ENGINE = {
    **{key: value for key, value in ENGINE.items() if key != "num_gpu_blocks_override"},
    "max_num_seqs": 1,
    "attention_backend": "CPU_MLA",
}
MLA_FLAGS = [*QWEN3_ENGINE_FLAGS, "--max-num-seqs", "1", *FAMILIES["deepseek_v2"].engine_args]


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """DeepSeek-V2 style, 4 layers: MLA in every layer (kv_lora_rank 512, rope 64), dense MLPs
    in layers 0-1 and MoE (4 routed experts, 1 shared) in layers 2-3."""
    folder = tmp_path_factory.mktemp("mla")
    return build_checkpoint(folder / "deepseek-v2-tiny", "deepseek_v2", num_layers=4)


@pytest.fixture(scope="module")
def mla_reference(mla_model: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return reference_outputs(mla_model, tmp_path_factory.mktemp("mla-ref"), engine=MLA_ENGINE)


def test_mla_and_moe_layers_serve_exactly_and_survive_a_lost_stage(
    swarm, mla_model: str, mla_reference: list[dict]
) -> None:
    """The head runs the dense layers 0-1, a follower the MoE layers 2-3 with a replica beside
    it: greedy outputs equal one vLLM process's, and when the serving follower is killed
    (kill -9) mid-stream, every stream goes on through the replica."""
    first = swarm.start("stage-a", mla_model, "2,3", MLA_FLAGS)
    head = swarm.start("head", mla_model, "0,1", MLA_FLAGS, peers=[first])
    replica = swarm.start("stage-b", mla_model, "2,3", MLA_FLAGS, peers=[head])
    head.wait_healthy()
    replica.wait_healthy()
    assert_same(mla_reference, asyncio.run(pipeline_outputs(head.base_url, mla_model)))

    undisturbed = asyncio.run(stream_all(head, mla_model))
    ports = re.findall(r"-> 127\.0\.0\.1:(\d+) \[2-3\]", head.log())
    serving = next(n for n in (first, replica) if str(n.grpc_port) == ports[-1])

    recovered = asyncio.run(stream_all(head, mla_model, during=serving.kill))
    assert f"Lost stage 127.0.0.1:{serving.grpc_port} [2-3]" in head.log()
    assert "Pipeline restored (epoch 1)" in head.log()
    # Every stream completes. One runs at a time, so one was in flight at the kill (each had
    # 16 tokens by then): it is recomputed, and from there it may part from the undisturbed
    # run, as it would in one vLLM process: MLA's prefill and decode take different (equal in
    # exact arithmetic) paths, and one vLLM process re-prefilling a request's own first tokens
    # also continues differently within a few tokens (benchmark/arch_matrix.py's note).
    assert all(len(tokens) == STREAM_TOKENS for tokens in recovered)
    assert all(got[:16] == want[:16] for got, want in zip(recovered, undisturbed, strict=True))
    assert sum(got != want for got, want in zip(recovered, undisturbed, strict=True)) <= 1
