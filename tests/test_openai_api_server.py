"""The OpenAI API of a two-node pipeline serving the demo model, through the ``openai`` client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import DEMO_API_KEY, DEMO_ENGINE_FLAGS, NODE_ENV

PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def client(demo_pipeline):
    return openai.OpenAI(
        base_url=demo_pipeline.base_url + "/v1", api_key=DEMO_API_KEY, max_retries=0
    )


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


# ----------------------------------------------------------------------------- bad input
def raw_post(base_url: str, path: str, body: bytes, key: str | None = DEMO_API_KEY):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(base_url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "word " * 5000, "max_tokens": 4},  # longer than --max-model-len 1024
        {"prompt": "hi", "max_tokens": 4, "temperature": -1.0},
        {"prompt": "hi", "max_tokens": 4, "top_p": 2.0},
        {"prompt": "hi", "max_tokens": 4, "n": 0},
        {"prompt": "hi", "max_tokens": -5},
        {"prompt": "hi", "max_tokens": 4, "logprobs": 10_000},
        {"prompt": 12},
    ],
    ids=["oversized", "temperature", "top_p", "n", "max_tokens", "logprobs", "prompt-type"],
)
def test_bad_inputs_get_a_4xx_with_a_reason(client, demo_pipeline, demo_model, body):
    status, text = raw_post(
        demo_pipeline.base_url,
        "/v1/completions",
        json.dumps({"model": demo_model, **body}).encode(),
    )
    assert 400 <= status < 500, (status, text[:300])
    assert json.loads(text)["error"]["message"]
    # ... and the engine keeps serving
    assert client.completions.create(model=demo_model, prompt="hi", max_tokens=2).choices


def test_invalid_json_and_unknown_model(client, demo_pipeline, demo_model):
    status, text = raw_post(demo_pipeline.base_url, "/v1/completions", b"{not json")
    assert 400 <= status < 500 and text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert client.completions.create(model=demo_model, prompt="hi", max_tokens=2).choices


# ----------------------------------------------------------------------------- API key
def test_api_needs_the_key(demo_pipeline, demo_model):
    for key in ("wrong-key", None):
        status, _ = raw_post(
            demo_pipeline.base_url,
            "/v1/completions",
            json.dumps({"model": demo_model, "prompt": "hi", "max_tokens": 2}).encode(),
            key=key,
        )
        assert status == 401
    with urllib.request.urlopen(demo_pipeline.base_url + "/health", timeout=10) as r:
        assert r.status == 200  # health stays open, as in vLLM


def test_follower_status_needs_the_key(demo_pipeline, session_swarm):
    follower = next(n for n in session_swarm.nodes if n.name == "demo-stage1")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(follower.base_url + "/status", timeout=10)
    assert e.value.code == 401
    request = urllib.request.Request(
        follower.base_url + "/status", headers={"Authorization": f"Bearer {DEMO_API_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        status = json.load(r)
    assert status["state"] == "serving" and status["swarm_key"]


def test_a_node_with_another_swarm_key_is_never_used(
    client, demo_pipeline, demo_model, session_swarm, tmp_path
):
    other_key = tmp_path / "other.key"
    subprocess.run(
        [sys.executable, "-m", "molink.entrypoints.cli.keygen", str(other_key)], check=True
    )
    intruder = session_swarm.start(
        "intruder",
        demo_model,
        "15,29",
        [*DEMO_ENGINE_FLAGS, "--swarm-key-file", str(other_key), "--api-key", DEMO_API_KEY],
        peers=[demo_pipeline],
    )
    try:
        deadline = time.monotonic() + 120
        while "another swarm key" not in intruder.log() and time.monotonic() < deadline:
            time.sleep(1)
        assert "another swarm key" in intruder.log()  # its handshake with the head failed
        for _ in range(3):
            assert client.completions.create(model=demo_model, prompt="hi", max_tokens=4).choices
        # It never got into the DHT (so no head can route through it), and it keeps waiting.
        assert "DHT peer" not in intruder.log() and intruder.proc.poll() is None
    finally:
        intruder.stop()
