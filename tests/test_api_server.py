"""``/generate`` of ``molink.entrypoints.api_server`` on a single node serving every layer."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from conftest import NodeProcess, free_port


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


def test_generate(generate_server):
    status, body = post(
        generate_server.base_url + "/generate",
        {"prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0.0},
    )
    assert status == 200
    text = json.loads(body)["text"][0]
    assert text.startswith("the quick brown fox") and len(text) > len("the quick brown fox")


def test_generate_streaming(generate_server):
    status, body = post(
        generate_server.base_url + "/generate",
        {"prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0.0, "stream": True},
    )
    assert status == 200
    lines = [json.loads(line) for line in body.decode().splitlines() if line]
    assert len(lines) >= 2
    assert lines[-1]["text"][0].startswith(lines[0]["text"][0][:10])


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
