"""Nodes behind NAT: the reachability check, and real node processes in network namespaces.

The namespaces (``nat_topology``) put the head on the "internet" and the followers in two homes,
each behind its own MASQUERADE router that drops every inbound connection. The followers find out
that nobody can dial them, take their calls through the head (their relay), and serve: greedy
outputs equal one vLLM process, a NATed follower's kill -9 loses nothing, and a NATed node that
claims to be reachable (so has no relay) is left out with its cause while the head stays up.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from conftest import QWEN3_ENGINE_FLAGS, NodeProcess, free_port
from probes import eventually, get, scrape, value
from reference import assert_same, pipeline_outputs, stream_all

from benchmark.nat_topology import PUBLIC_HOST, PUBLIC_NS, home_host, nat_topology, why_unavailable
from benchmark.processes import ManagedProcess, stop_all
from molink.comm.links import connect
from molink.comm.nat import RelayPresence, check_reachable
from molink.comm.proto import molink_pb2
from molink.comm.stage_service import StageService, start_grpc_server
from molink.security.node_key import NodeKey
from molink.security.swarm_security import SwarmSecurity

WAIT_S = 300.0

# ------------------------------------------------------------------ the check, on loopback


def test_check_reachable_dials_back_and_needs_the_nodes_own_proof():
    security = SwarmSecurity(None, NodeKey.generate())
    info = lambda: molink_pb2.NodeInfo(peer_id="QmPeer")  # noqa: E731
    peer_server, peer_port = start_grpc_server(StageService(info, None, security), "127.0.0.1", 0)
    me = SwarmSecurity(None, NodeKey.generate())
    my_server, my_port = start_grpc_server(StageService(info, None, me), "127.0.0.1", 0)
    peer = (f"127.0.0.1:{peer_port}",)
    try:
        assert check_reachable("auto", peer, f"127.0.0.1:{my_port}", me)[0] is True
        free = free_port()
        reachable, why = check_reachable("auto", peer, f"127.0.0.1:{free}", me)
        assert reachable is False and f"can't dial 127.0.0.1:{free}" in why
        # Someone else answers at the address: not this node.
        reachable, why = check_reachable("auto", peer, f"127.0.0.1:{peer_port}", me)
        assert reachable is False and "another node answers" in why
        assert check_reachable("no", peer, f"127.0.0.1:{my_port}", me) == (False, "--reachable no")
        assert check_reachable("yes", peer, "10.0.0.1:1", me) == (True, "--reachable yes")
        # Nobody to ask (a new swarm, or only multiaddrs): reachable, and it says so.
        assert check_reachable("auto", (), "10.0.0.1:1", me)[1].startswith("assumed")
    finally:
        peer_server.stop(grace=0)
        my_server.stop(grace=0)


def test_a_nated_node_moves_to_another_relay_when_its_relay_goes_away():
    security = SwarmSecurity(None, NodeKey.generate())
    relays = {}
    for name in ("QmRelayOne", "QmRelayTwo"):
        info = lambda name=name: molink_pb2.NodeInfo(peer_id=name)  # noqa: E731
        server, port = start_grpc_server(StageService(info, None, security), "127.0.0.1", 0)
        relays[f"127.0.0.1:{port}"] = server
    nated = StageService(lambda: molink_pb2.NodeInfo(peer_id="QmNated"), None, security)
    nated.relay = None
    nated_server, nated_port = start_grpc_server(nated, "127.0.0.1", 0)
    moves: list[str] = []
    presence = RelayPresence(
        security.node_key,
        f"127.0.0.1:{nated_port}",
        security,
        candidates=lambda: list(relays),
        public_address=lambda peer: None,  # not in a DHT here: announce the address dialed
        on_change=moves.append,
    )
    try:
        first = presence.relay
        assert first in relays
        relays.pop(first).stop(grace=0)
        eventually(lambda: moves, timeout=30, what="a move to the other relay")
        assert moves == [presence.relay] and presence.relay in relays
        channel, stub = connect(f"{security.node_key.node_id}@{presence.relay}", security)
        assert stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=10).peer_id == "QmNated"
        channel.close()
    finally:
        presence.close()
        nated_server.stop(grace=0)
        for server in relays.values():
            server.stop(grace=0)


# ------------------------------------------------------------ processes behind NAT routers


class NamespacedNode(NodeProcess):
    """A node process in network namespace ``ns``, its gRPC service on every interface there,
    announcing ``host`` (started cold: ``ip netns exec``). Only the head's HTTP port is open
    beyond the namespace's loopback (the test talks to the head)."""

    def __init__(self, ns: str, host: str, name: str, args: list[str], log_dir: Path) -> None:
        self.ns, self.host = ns, host
        port, grpc_port = free_port(), free_port()
        args = [
            *args,
            "--dtype", "float32", "--enforce-eager", "--disable-uvicorn-access-log",
            "--host", "0.0.0.0" if name == "head" else "127.0.0.1", "--port", str(port),
            "--grpc_port", str(grpc_port), "--listen_host", "0.0.0.0",
            "--announce_host", host,
        ]  # fmt: skip
        super().__init__(name, args, log_dir, port, grpc_port)
        self.url = self.base_url

    def _launch(self, env: Mapping[str, str]):
        self.cmd = ["ip", "netns", "exec", self.ns, sys.executable, "-m", self.module, *self.args]
        return ManagedProcess._launch(self, env)

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def peer_id(self) -> str:
        found = re.search(r"DHT peer (\w+) started", self.log())
        return found.group(1) if found else ""


@pytest.fixture(scope="module")
def nat(tmp_path_factory: pytest.TempPathFactory, qwen3_model: str, swarm_key_file: str):
    why = why_unavailable()
    if why is not None:
        pytest.skip(f"NAT namespaces: {why}")
    log_dir = tmp_path_factory.mktemp("nat")
    nodes: list[NamespacedNode] = []
    flags = [*QWEN3_ENGINE_FLAGS, "--swarm-key-file", swarm_key_file, "--model", qwen3_model]

    def start(ns: str, host: str, name: str, layers: str, *extra: str) -> NamespacedNode:
        peers = [] if name == "head" else ["--initial_peer", nodes[0].grpc_address]
        node = NamespacedNode(
            ns, host, name, [*flags, "--serving_layers", layers, *peers, *extra], log_dir
        )
        nodes.append(node)
        return node

    with nat_topology():
        try:
            yield start, nodes
        finally:
            stop_all([n for n in nodes if n.name == "head"], grace=10)
            stop_all(nodes, grace=10)


def swarm_doc(head: NodeProcess) -> dict:
    code, body = get(head.base_url + "/swarm")
    assert code == 200, body
    return json.loads(body)


def test_behind_nat_followers_serve_through_their_relay(nat, qwen3_model, qwen3_reference):
    start, nodes = nat
    head = start(PUBLIC_NS, PUBLIC_HOST, "head", "0,1", "--min-micro-batches", "2")
    # A home node that claims it can be dialed takes no relay: it is left out, with the cause,
    # and the head stays up and waits.
    liar = start("mlnat-h1", home_host("mlnat-h1"), "liar", "2,5", "--reachable", "yes")
    cause = f"{home_host('mlnat-h1')}:{liar.grpc_port} is unreachable"
    eventually(lambda: cause in head.log(), timeout=WAIT_S, what="the unreachable node named")
    code, body = get(head.base_url + "/ready")
    assert code == 503 and cause in json.loads(body)["cause"], body
    liar.stop()
    # Two followers, each behind its own NAT: the head and the hop between them are relayed.
    a = start("mlnat-h1", home_host("mlnat-h1"), "a", "2,3")
    b = start("mlnat-h2", home_host("mlnat-h2"), "b", "4,5")
    head.wait_healthy(timeout=WAIT_S)
    for node in (a, b):
        assert "joining through a relay" in node.log()
        assert f"calls to this node go through relay {head.grpc_address}" in node.log()
    docs = {n["peer_id"]: n for n in swarm_doc(head)["nodes"]}
    for node in (a, b):
        assert docs[node.peer_id()]["reachable"] is False
        assert docs[node.peer_id()]["relay"] == head.grpc_address
    assert_same(qwen3_reference, asyncio.run(pipeline_outputs(head.base_url, qwen3_model)))
    samples = scrape(head)
    assert value(samples, "molink_relay_nodes") == 2
    assert value(samples, "molink_relay_bytes_total") > 0


def test_kill_9_of_a_nated_follower_with_a_nated_replica_loses_nothing(nat, qwen3_model):
    start, nodes = nat
    head = nodes[0]
    reference = asyncio.run(stream_all(head, qwen3_model))
    replica = start("mlnat-h1", home_host("mlnat-h1"), "b2", "4,5")  # beside a, behind NAT 1
    eventually(
        lambda: re.search(r"Standby for .*@" + re.escape(head.grpc_address), head.log()),
        timeout=WAIT_S,
        what="the replica as a standby",
    )
    chain = {hop["peer_id"] for hop in swarm_doc(head)["chain"]}
    tails = [n for n in nodes if n.name in ("b", "b2")]
    victim = next(n for n in tails if n.peer_id() in chain)
    got = asyncio.run(stream_all(head, qwen3_model, during=victim.kill))
    assert got == reference
    assert "Pipeline restored" in head.log()
    assert replica.poll() is None or replica is victim


def test_a_reachable_stage_reaches_its_nated_successor_without_the_relay(nat, qwen3_model):
    """A reachable follower takes over the span before the NATed tail: it invites the tail to
    dial it (through the tail's relay), and the hop between them skips the relay."""
    start, nodes = nat
    head = nodes[0]
    reference = asyncio.run(stream_all(head, qwen3_model))
    s = start(PUBLIC_NS, PUBLIC_HOST, "s", "2,3")
    eventually(
        lambda: re.search(rf"Standby for .*: {re.escape(s.grpc_address)} \[2-3\]", head.log()),
        timeout=WAIT_S,
        what="s as a standby",
    )
    a = next(n for n in nodes if n.name == "a")
    got = asyncio.run(stream_all(head, qwen3_model, during=a.kill))
    assert got == reference
    assert "Reachable at" in s.log()
    assert "dialed this node when invited" in s.log()
