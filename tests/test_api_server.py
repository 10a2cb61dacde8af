"""``/generate`` of ``molink.entrypoints.api_server`` on a single node serving every layer."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from conftest import NodeProcess, free_port
from reference import REQUESTS


@pytest.fixture(scope="module")
def generate_server(qwen3_model, tmp_path_factory):
    port = free_port()
    args = [
        "--model",
        qwen3_model,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--grpc_port",
        str(free_port()),
        "--listen_host",
        "127.0.0.1",
        "--announce_host",
        "127.0.0.1",
    ]
    node = NodeProcess(
        "generate",
        args,
        tmp_path_factory.mktemp("generate"),
        port,
        0,
        module="molink.entrypoints.api_server",
    )
    try:
        node.wait_healthy()
        yield node
    finally:
        node.stop()


def post(url: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


GREEDY = {
    "prompt": REQUESTS[0]["prompt"],
    "max_tokens": REQUESTS[0]["max_tokens"],
    "temperature": 0,
}


def test_generate(generate_server, qwen3_reference):
    status, body = post(generate_server.base_url + "/generate", GREEDY)
    assert status == 200
    (text,) = json.loads(body)["text"]
    # /generate answers prompt + completion; the completion is single-process vLLM's.
    assert text == GREEDY["prompt"] + qwen3_reference[0]["text"]


def test_generate_streaming(generate_server):
    status, body = post(generate_server.base_url + "/generate", {**GREEDY, "stream": True})
    assert status == 200
    texts = [json.loads(line)["text"][0] for line in body.decode().splitlines() if line]
    assert len(texts) >= 2
    # Each chunk extends the one before, and the last is the non-streaming answer.
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    status, body = post(generate_server.base_url + "/generate", GREEDY)
    assert texts[-1] == json.loads(body)["text"][0]


def test_generate_rejects_bad_input(generate_server):
    status, body = post(generate_server.base_url + "/generate", {"prompt": 3})
    assert status == 400 and b"prompt" in body
    status, _ = post(generate_server.base_url + "/generate", {"prompt": "x", "top_p": 7})
    assert status == 400


def test_head_routes_on_the_generate_server(generate_server):
    with urllib.request.urlopen(generate_server.base_url + "/ready", timeout=30) as r:
        assert json.load(r)["ready"] is True
    with urllib.request.urlopen(generate_server.base_url + "/swarm", timeout=30) as r:
        doc = json.load(r)
    assert doc["ready"] and doc["gaps"] == [] and [h["layers"] for h in doc["chain"]] == [[0, 5]]
