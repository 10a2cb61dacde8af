"""The OpenAI API of a two-node pipeline serving the demo model, through the ``openai`` client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from conftest import NODE_ENV

PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def client(demo_pipeline):
    return openai.OpenAI(base_url=demo_pipeline.base_url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def demo_reference(demo_model, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("demo_ref")
    spec, out = tmp / "spec.json", tmp / "out.json"
    requests = [{"prompt": p, "max_tokens": 24} for p in PROMPTS]
    engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "max_num_seqs": 8}
    spec.write_text(json.dumps({"model": demo_model, "engine": engine, "requests": requests}))
    cmd = [sys.executable, str(Path(__file__).parent / "reference_run.py"), str(spec), str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, **NODE_ENV}, timeout=600)
    return json.loads(out.read_text())


def test_chat_names_paris(client, demo_model):
    resp = client.chat.completions.create(
        model=demo_model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30,
        temperature=0.0,
    )
    assert "Paris" in resp.choices[0].message.content


def test_chat_streaming(client, demo_model):
    stream = client.chat.completions.create(
        model=demo_model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30,
        temperature=0.0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in text


def test_completions_match_single_process(client, demo_model, demo_reference):
    for prompt, ref in zip(PROMPTS, demo_reference, strict=True):
        resp = client.completions.create(
            model=demo_model,
            prompt=prompt,
            max_tokens=24,
            temperature=0.0,
            logprobs=1,
            extra_body={"return_token_ids": True},
        )
        choice = resp.choices[0]
        assert list(choice.token_ids) == ref["token_ids"]
        for a, b in zip(choice.logprobs.token_logprobs, ref["logprobs"], strict=True):
            assert abs(a - b) <= 1e-4


def test_completions_streaming_matches_non_streaming(client, demo_model):
    plain = client.completions.create(
        model=demo_model, prompt=PROMPTS[0], max_tokens=24, temperature=0.0
    )
    stream = client.completions.create(
        model=demo_model, prompt=PROMPTS[0], max_tokens=24, temperature=0.0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == plain.choices[0].text


def test_models_endpoint(client, demo_model):
    assert [m.id for m in client.models.list().data] == [demo_model]


def test_bad_request_is_a_4xx(client, demo_model):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=demo_model, prompt="hello", max_tokens=100_000)
