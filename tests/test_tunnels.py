"""Tunnels to nodes behind NAT, with real gRPC servers on loopback: a relay node, a "NATed" node
that only dials out (to its relay), and dialers that reach it by its route ``peer@relay``."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from probes import eventually
from prometheus_client import REGISTRY

from molink.comm import relay_hub, tunnels
from molink.comm.links import connect
from molink.comm.proto import molink_pb2
from molink.comm.stage_service import StageService, start_grpc_server
from molink.security.node_ids import node_id
from molink.security.node_key import NodeKey, verify_proof
from molink.security.swarm_key import SwarmKey
from molink.security.swarm_security import SwarmSecurity

KEY = SwarmKey(b"t" * 32)
NATED = "QmNatedNode1"
MARKER = "model-name-only-the-two-ends-should-read"


def node(
    security: SwarmSecurity, peer_id: str, relays: bool = True
) -> tuple[grpc.Server, str, StageService]:
    service = StageService(
        lambda: molink_pb2.NodeInfo(peer_id=peer_id, model_name=MARKER), None, security
    )
    if not relays:
        service.relay = None
    server, port = start_grpc_server(service, "127.0.0.1", 0)
    return server, f"127.0.0.1:{port}", service


@pytest.fixture(params=["swarm-key", "open"])
def swarm(request) -> Iterator[dict]:
    """A relay and a NATed node listening at it; both with the swarm key, or both open."""
    key = KEY if request.param == "swarm-key" else None
    relay_security = SwarmSecurity(key, NodeKey.generate())
    nated_security = SwarmSecurity(key, NodeKey.generate())
    relay_server, relay, hub_service = node(relay_security, "QmRelay")
    nated_server, nated, _ = node(nated_security, NATED, relays=False)
    lost: list[str] = []
    listener = tunnels.RelayListener(
        nated_security.node_key,
        relay,
        relay_security.node_key.public_key,
        nated,
        nated_security,
        lost.append,
    )
    yield {
        "relay": relay,
        "relay_key": relay_security.node_key.public_key,
        "route": f"{nated_security.node_key.node_id}@{relay}",
        "hub": hub_service.relay,
        "nated_security": nated_security,
        "dialer": SwarmSecurity(key, NodeKey.generate()),
        "relay_server": relay_server,
        "listener": listener,
        "lost": lost,
        "keyed": key is not None,
    }
    listener.close()
    nated_server.stop(grace=0)
    relay_server.stop(grace=0)


def test_a_route_reaches_the_nated_node_as_itself(swarm):
    assert swarm["hub"].listeners() == [swarm["nated_security"].node_key.node_id]
    relayed = REGISTRY.get_sample_value("molink_relay_bytes_total") or 0.0
    channel, stub = connect(swarm["route"], swarm["dialer"])
    nonce = secrets.token_bytes(16)
    for _ in range(3):  # several calls on one tunnelled connection
        info = stub.GetNodeInfo(molink_pb2.NodeInfoRequest(nonce=nonce), timeout=10)
        assert info.peer_id == NATED
    assert REGISTRY.get_sample_value("molink_relay_tunnels") >= 1
    channel.close()
    assert verify_proof(swarm["nated_security"].node_key.public_key, nonce, info.proof)
    assert REGISTRY.get_sample_value("molink_relay_bytes_total") > relayed
    assert REGISTRY.get_sample_value("molink_relay_nodes") >= 1
    # A second channel (a new TCP connection, so a new tunnel) works too.
    channel, stub = connect(swarm["route"], swarm["dialer"])
    assert stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=10).peer_id == NATED
    channel.close()


@pytest.fixture
def inviter(swarm) -> Iterator[tuple[grpc.Server, str]]:
    """A reachable node whose process dials NATed nodes by inviting them (as a follower does)."""
    server, address, service = node(swarm["dialer"], "QmInviter")
    tunnels.take_invited_tunnels(service.relay, address)
    yield server, address
    tunnels.take_invited_tunnels(None)
    server.stop(grace=0)


def test_an_invited_node_dials_the_inviter_and_the_relay_carries_nothing(swarm, inviter):
    channel, stub = connect(swarm["route"], swarm["dialer"])
    assert stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=10).peer_id == NATED
    # The connection runs straight between the two nodes: it outlives the relay.
    swarm["relay_server"].stop(grace=0).wait()
    for _ in range(3):
        assert stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=10).peer_id == NATED
    channel.close()


def test_a_node_that_cant_dial_the_inviter_is_reached_through_its_relay(swarm, monkeypatch):
    monkeypatch.setattr(tunnels, "INVITE_TIMEOUT_S", 1.0)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    server, _, service = node(swarm["dialer"], "QmInviter")
    tunnels.take_invited_tunnels(service.relay, f"127.0.0.1:{silent.getsockname()[1]}")
    try:
        channel, stub = connect(swarm["route"], swarm["dialer"])
        assert stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=10).peer_id == NATED
        channel.close()
    finally:
        tunnels.take_invited_tunnels(None)
        server.stop(grace=0)
        silent.close()


def test_the_relay_forwards_only_ciphertext_with_a_swarm_key(swarm, monkeypatch):
    forwarded: list[bytes] = []
    put = relay_hub.ChunkQueue.put

    def spy(self, data: bytes) -> bool:
        forwarded.append(data)
        return put(self, data)

    monkeypatch.setattr(relay_hub.ChunkQueue, "put", spy)
    channel, stub = connect(swarm["route"], swarm["dialer"])
    assert stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=10).model_name == MARKER
    channel.close()
    seen = b"".join(forwarded)
    assert seen  # the bytes did go through the relay
    assert (MARKER.encode() in seen) is not swarm["keyed"]


def test_a_route_to_a_node_the_relay_does_not_know_fails_with_the_cause(swarm):
    route = f"{NodeKey.generate().node_id}@{swarm['relay']}"
    channel, stub = connect(route, swarm["dialer"])
    with pytest.raises(grpc.RpcError) as info:
        stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=5)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    eventually(lambda: "takes no calls through this relay" in tunnels.last_error(route))


def test_bulk_bytes_both_ways_through_the_relay():
    """Any TCP stream goes through: 8 MiB to an echo server behind the relay and back."""
    security = SwarmSecurity(None, NodeKey.generate())
    relay_server, relay, _ = node(security, "QmRelay")
    echo = socket.create_server(("127.0.0.1", 0))

    def serve_echo() -> None:
        conn, _ = echo.accept()
        while data := conn.recv(1 << 16):
            conn.sendall(data)
        conn.close()

    threading.Thread(target=serve_echo, daemon=True).start()
    echo_address = f"127.0.0.1:{echo.getsockname()[1]}"
    echo_key = NodeKey.generate()
    listener = tunnels.RelayListener(
        echo_key, relay, security.node_key.public_key, echo_address, security, lambda _: None
    )
    try:
        host, port = tunnels.local_endpoint(f"{echo_key.node_id}@{relay}", security).split(":")
        payload = secrets.token_bytes(8 << 20)
        with socket.create_connection((host, int(port))) as sock:
            threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
            back = bytearray()
            while len(back) < len(payload):
                chunk = sock.recv(1 << 20)
                assert chunk, "the tunnel closed early"
                back += chunk
        assert bytes(back) == payload
    finally:
        listener.close()
        echo.close()
        relay_server.stop(grace=0)


def test_the_nated_node_hears_when_its_relay_goes_away(swarm):
    swarm["relay_server"].stop(grace=0)
    eventually(lambda: swarm["lost"])


def test_a_node_behind_nat_relays_for_nobody():
    security = SwarmSecurity(None, NodeKey.generate())
    server, address, _ = node(security, "QmBehindNat", relays=False)
    try:
        with pytest.raises(ConnectionError, match="can't relay"):
            tunnels.RelayListener(
                NodeKey.generate(),
                address,
                security.node_key.public_key,
                address,
                security,
                lambda _: None,
                timeout=5,
            )
    finally:
        server.stop(grace=0)


def test_nobody_else_can_take_a_nated_nodes_calls(swarm):
    """A Listen call counts only for the key that signed it, for this relay, lately."""
    stub = connect(swarm["relay"], swarm["dialer"])[1]
    victim = swarm["nated_security"].node_key
    relay_id = NodeKey.generate().node_id  # a claim made for another relay
    forger = swarm["dialer"].node_key
    now = time.time()
    forged = {  # what a key holder could send to take the NATed node's calls
        "someone else's key": (victim.public_key, now, forger.prove(b"x")),
        "a claim for another relay": (
            victim.public_key,
            now,
            victim.prove(tunnels.listen_claim(relay_id, now)),
        ),
    }
    for what, (key, at, proof) in forged.items():
        call = stub.Listen(molink_pb2.ListenRequest(node_key=key, unix_time=at, proof=proof))
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
    old = now - 3600  # an old claim, signed for this relay
    own = tunnels.listen_claim(node_id(swarm["relay_key"]), old)
    call = stub.Listen(
        molink_pb2.ListenRequest(node_key=victim.public_key, unix_time=old, proof=victim.prove(own))
    )
    with pytest.raises(grpc.RpcError, match="signed more than"):
        next(call)
    assert swarm["hub"].listeners() == [victim.node_id]


@pytest.mark.parametrize(
    "route",
    [
        "0123456789abcdef0123456789abcdef@",
        "@127.0.0.1:5",
        "QmPeerIdsAreNotNodeIds@127.0.0.1:5",
        "0123456789abcdef0123456789abcdef@127.0.0.1",
        "0123456789abcdef0123456789abcdef@host:0",
    ],
)
def test_malformed_routes_are_refused(route):
    with pytest.raises(ValueError):
        tunnels.parse_route(route)
