"""The head's operator surface on a real 2-stage swarm: ``/ready``, ``/swarm``, the ``/swarm/ui``
page in headless Chromium, MoLink's metrics on both nodes, and the head's log lines.

The swarm is the tiny Qwen3 checkpoint: a head (layers 0-2) and a follower (3-5), each with its
own node key (``--node-key-file``); the head routes only through the nodes its
``--allowed-nodes-file`` lists. The last test kills the follower (the layers 3-5 are then
missing), starts a node the allowlist doesn't name (never used), then a listed one in its place.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from conftest import DEMO_API_KEY, QWEN3_ENGINE_FLAGS, NodeProcess, Swarm
from probes import eventually, get, scrape, status, total, value

from molink.security.node_key import NodeKey

FLAGS = QWEN3_ENGINE_FLAGS
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def swarm_doc(head: NodeProcess) -> dict:
    code, body = get(head.base_url + "/swarm")
    assert code == 200, body
    return json.loads(body)


NODES = ("head", "stage", "replacement", "outsider")  # the outsider isn't on the allowlist


@pytest.fixture(scope="module")
def node_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """Each node's key file and node id, and (under "allowed") the head's allowlist file."""
    folder = tmp_path_factory.mktemp("node_keys")
    keys = {name: str(folder / f"{name}.key") for name in NODES}
    ids = {name: NodeKey.load_or_create(path).node_id for name, path in keys.items()}
    allowed = folder / "allowed_nodes.txt"
    allowed.write_text("".join(f"{ids[name]}\n" for name in NODES if name != "outsider"))
    return {name: (keys[name], ids[name]) for name in NODES} | {"allowed": (str(allowed), "")}


def node_flags(node_keys: dict, name: str) -> list[str]:
    return [*FLAGS, "--node-key-file", node_keys[name][0]]


@pytest.fixture(scope="module")
def pipeline(
    module_swarm: Swarm, qwen3_model: str, node_keys: dict
) -> tuple[NodeProcess, NodeProcess]:
    head_flags = [*node_flags(node_keys, "head"), "--allowed-nodes-file", node_keys["allowed"][0]]
    head = module_swarm.start("head", qwen3_model, "0,2", head_flags)
    stage = module_swarm.start(
        "stage", qwen3_model, "3,5", node_flags(node_keys, "stage"), peers=[head]
    )
    head.wait_healthy()
    return head, stage


@pytest.fixture(scope="module")
def client(pipeline) -> openai.OpenAI:
    return openai.OpenAI(base_url=pipeline[0].base_url + "/v1", api_key="none", max_retries=0)


def test_ready_and_swarm_show_both_nodes_and_the_chain(pipeline, node_keys):
    head, stage = pipeline
    assert status(stage)["node_id"] == node_keys["stage"][1]  # the identity --node-key-file holds
    code, body = get(head.base_url + "/ready")
    assert code == 200, body
    assert json.loads(body)["ready"] is True
    doc = swarm_doc(head)
    assert doc["ready"] and doc["gaps"] == [] and doc["num_layers"] == 6
    by_address = {n["address"]: n for n in doc["nodes"]}
    assert by_address[head.grpc_address]["role"] == "head"
    assert by_address[stage.grpc_address]["layers"] == [3, 5]
    assert all(n["in_chain"] and n["state"] == "online" for n in by_address.values())
    assert [hop["address"] for hop in doc["chain"]] == [head.grpc_address, stage.grpc_address]
    assert [hop["layers"] for hop in doc["chain"]] == [[0, 2], [3, 5]]
    assert by_address[stage.grpc_address]["peer_id"] == status(stage)["peer_id"]
    assert by_address[stage.grpc_address]["last_seen_s"] < 15


def test_metrics_move_under_load(pipeline, client, qwen3_model):
    head, stage = pipeline
    head_before, stage_before = scrape(head), scrape(stage)
    stream = client.completions.create(
        model=qwen3_model, prompt="hello " * 40, max_tokens=64, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    used_mid_request = 0.0
    for i, _ in enumerate(stream):
        if i == 8:  # the request holds KV blocks on every stage now
            used_mid_request = value(scrape(stage), "molink_stage_kv_blocks_used")
    for _ in range(3):
        client.completions.create(model=qwen3_model, prompt="the quick brown fox", max_tokens=16)
    head_after, stage_after = scrape(head), scrape(stage)

    def grew(before: dict, after: dict, name: str, **labels: str) -> bool:
        return value(after, name, **labels) > value(before, name, **labels)

    # The head: its stage 0 and its pipeline, in the same scrape as vLLM's own metrics.
    assert any(name.startswith("vllm:") for name, _ in head_after)
    assert grew(head_before, head_after, "molink_stage_tokens_total", layers="0-2")
    assert grew(head_before, head_after, "molink_stage_step_seconds_count", layers="0-2")
    assert grew(head_before, head_after, "molink_hop_bytes_sent_total", stream="steps")
    assert grew(head_before, head_after, "molink_hop_bytes_received_total", stream="results")
    assert value(head_after, "molink_chain_ready") == 1
    assert value(head_after, "molink_chain_stages") == 2
    assert value(head_after, "molink_micro_batches_planned") >= 1
    # The follower: its own stage.
    assert grew(stage_before, stage_after, "molink_stage_tokens_total", layers="3-5")
    assert grew(stage_before, stage_after, "molink_stage_queue_wait_seconds_count", layers="3-5")
    assert grew(stage_before, stage_after, "molink_hop_bytes_received_total", stream="steps")
    assert grew(stage_before, stage_after, "molink_hop_bytes_sent_total", stream="results")
    assert 0 < used_mid_request <= value(stage_after, "molink_stage_kv_blocks_total")
    assert not any(name.startswith("molink_chain") for name, _ in stage_after)  # head only


def test_the_head_logs_every_request_event(pipeline, client, qwen3_model):
    head, _ = pipeline
    client.completions.create(
        model=qwen3_model,
        prompt="the quick brown fox",
        max_tokens=16,
        extra_body={"ignore_eos": True},
    )
    log = head.log()
    ids = re.findall(r"Request (cmpl-\S+) admitted: \d+ prompt tokens, up to 16 new", log)
    assert ids
    assert re.search(
        rf"Request {re.escape(ids[-1])} finished \(length\): \d+ prompt \+ 16 generated tokens", log
    )


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (scripts/install.sh --dev)")
def test_status_page_in_headless_chromium(pipeline, tmp_path: Path):
    head, stage = pipeline
    url = head.base_url + "/swarm/ui"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    bars = re.findall(r'<div class="bar node-bar ([^"]*)"[^>]*data-peer="([^"]+)"', dom)
    assert len(bars) == 2, dom[-3000:]
    assert all("in-chain" in classes for classes, _ in bars)
    assert {peer for _, peer in bars} >= {status(stage)["peer_id"]}
    assert 'class="badge ok">serving<' in dom
    assert stage.grpc_address in dom and "chain-hop" in dom
    shot = tmp_path / "swarm-ui.png"
    subprocess.run(
        [*common, "--window-size=1100,700", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 10_000


def test_a_lost_stage_shows_in_ready_swarm_metrics_and_log(
    pipeline, module_swarm: Swarm, qwen3_model: str, node_keys: dict
):
    head, stage = pipeline
    stage.kill()

    def missing_layers_named() -> str | None:
        code, body = get(head.base_url + "/ready")
        cause = json.loads(body).get("cause", "") if code == 503 else ""
        return cause if "layers 3-5 are not served by any node" in cause else None

    cause = eventually(missing_layers_named, timeout=120, what="/ready 503 naming the gap")
    assert f"lost stage 127.0.0.1:{stage.grpc_port} [3-5]" in cause
    doc = eventually(
        lambda: (d := swarm_doc(head))["gaps"] and d, timeout=120, what="a gap in /swarm"
    )
    assert doc["gaps"] == [[3, 5]] and not doc["ready"]
    assert [n["address"] for n in doc["nodes"]] == [head.grpc_address]
    assert doc["events"][-1]["kind"] == "loss"
    assert re.search(rf"Lost stage 127\.0\.0\.1:{stage.grpc_port} \[3-5\]: ", head.log())
    samples = scrape(head)
    assert value(samples, "molink_stage_losses_total", cause="lost") == 1
    assert value(samples, "molink_chain_ready") == 0

    # A node the allowlist doesn't name serves the missing layers: the head never uses it.
    outsider = module_swarm.start(
        "outsider", qwen3_model, "3,5", node_flags(node_keys, "outsider"), peers=[head]
    )
    outsider.wait_healthy()
    assert status(outsider)["node_id"] == node_keys["outsider"][1]
    deadline = time.monotonic() + 10  # several of the head's swarm refreshes
    while time.monotonic() < deadline:
        assert get(head.base_url + "/ready")[0] == 503
        assert outsider.grpc_address not in {n["address"] for n in swarm_doc(head)["nodes"]}
        time.sleep(0.5)

    replacement = module_swarm.start(
        "replacement", qwen3_model, "3,5", node_flags(node_keys, "replacement"), peers=[head]
    )
    eventually(lambda: get(head.base_url + "/ready")[0] == 200, timeout=240, what="/ready again")
    chain = [hop["address"] for hop in swarm_doc(head)["chain"]]
    assert chain == [head.grpc_address, replacement.grpc_address]
    assert re.search(
        r"Pipeline restored \(epoch 1\) [0-9.]+ s after the loss was detected", head.log()
    )
    samples = scrape(head)
    assert total(samples, "molink_recoveries_total") == 1
    assert value(samples, "molink_recovery_seconds_count") == 1
    assert swarm_doc(head)["events"][-1]["kind"] == "restore"


def test_swarm_needs_the_api_key_and_ready_does_not(demo_pipeline):
    assert get(demo_pipeline.base_url + "/swarm")[0] == 401
    code, body = get(demo_pipeline.base_url + "/swarm", key=DEMO_API_KEY)
    assert code == 200 and json.loads(body)["ready"]
    assert get(demo_pipeline.base_url + "/ready")[0] == 200
    assert get(demo_pipeline.base_url + "/swarm/ui")[0] == 200


def test_a_busy_engine_keeps_the_last_snapshot_a_silent_one_loses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine stepping a heavy batch may be slow to answer: /ready answers at once with the
    last snapshot (no flapping, and well within a router's timeout), one fetch at a time; after
    SNAPSHOT_STALE_OK_S of silence the head is not ready."""
    from molink.entrypoints import head_routes

    monkeypatch.setattr(head_routes, "SNAPSHOT_TIMEOUT_S", 0.05)
    monkeypatch.setattr(head_routes, "SNAPSHOT_STALE_WAIT_S", 0.01)
    monkeypatch.setattr(head_routes, "SNAPSHOT_MAX_AGE_S", 0.0)
    calls = 0

    async def run() -> None:
        answer = asyncio.Event()
        answer.set()

        async def collective_rpc(method: str) -> list:
            nonlocal calls
            calls += 1
            await answer.wait()
            return [{"ready": True, "metrics": [], "call": calls}]

        view = head_routes.PipelineView(SimpleNamespace(collective_rpc=collective_rpc))
        assert (await view.snapshot())["call"] == 1
        answer.clear()  # busy from now on
        assert (await view.snapshot())["call"] == 1  # the last one stands in
        assert (await view.snapshot())["call"] == 1
        assert calls == 2  # the second caller did not start another fetch
        answer.set()
        await asyncio.sleep(0.05)
        assert (await view.snapshot())["call"] >= 2
        answer.clear()
        monkeypatch.setattr(head_routes, "SNAPSHOT_STALE_OK_S", 0.0)
        assert await view.snapshot() is None  # silent for too long

    asyncio.run(run())
