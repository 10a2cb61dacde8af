"""Swarm admission with real gRPC servers and real hivemind DHT peers on loopback.

A node with the wrong swarm key, or none, can't complete a gRPC handshake with any node, can't
join the DHT, and can't announce; a forged or replayed announcement is ignored; the allowlist
and the per-node identity proof hold.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from probes import eventually
from test_dht import make_ann as ann

from molink.comm.links import connect
from molink.comm.membership import NODES_KEY, Membership
from molink.comm.proto import molink_pb2
from molink.comm.stage_service import StageService, start_grpc_server
from molink.security.node_key import NodeKey, node_id, verify_proof
from molink.security.settings import SecurityFiles
from molink.security.swarm_key import SwarmKey, generate_swarm_key
from molink.security.swarm_security import SwarmSecurity

KEY_A = SwarmKey(b"a" * 32)
KEY_B = SwarmKey(b"b" * 32)


def keyed(key: SwarmKey | None, allowed: frozenset[str] | None = None) -> SwarmSecurity:
    return SwarmSecurity(key, NodeKey.generate(), allowed)


# ------------------------------------------------------------------------------------- gRPC
@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, SwarmSecurity]]:
    security = keyed(KEY_A)
    service = StageService(
        lambda: molink_pb2.NodeInfo(peer_id="QmServer", model_name="m"), None, security
    )
    srv, port = start_grpc_server(service, "127.0.0.1", 0)
    yield f"127.0.0.1:{port}", security
    srv.stop(grace=0)


def test_same_key_calls_and_node_proves_its_key(server):
    address, server_security = server
    channel, stub = connect(address, keyed(KEY_A))
    nonce = secrets.token_bytes(16)
    info = stub.GetNodeInfo(molink_pb2.NodeInfoRequest(nonce=nonce), timeout=10)
    channel.close()
    assert info.peer_id == "QmServer"
    assert info.node_key == server_security.node_key.public_key
    assert verify_proof(info.node_key, nonce, info.proof)
    assert not verify_proof(info.node_key, secrets.token_bytes(16), info.proof)
    assert not verify_proof(NodeKey.generate().public_key, nonce, info.proof)


@pytest.mark.parametrize("client_key", [KEY_B, None], ids=["wrong-key", "no-key"])
def test_without_the_key_no_method_can_be_called(server, client_key):
    address, _ = server
    channel, stub = connect(address, keyed(client_key))
    calls = {
        "GetNodeInfo": lambda: stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=5),
        "InitStage": lambda: stub.InitStage(molink_pb2.InitStageRequest(), timeout=5),
        "StartStage": lambda: stub.StartStage(molink_pb2.StartStageRequest(), timeout=5),
        "Steps": lambda: stub.Steps(iter([molink_pb2.Step(step_id=1)]), timeout=5),
        "Results": lambda: list(stub.Results(molink_pb2.ResultsRequest(), timeout=5)),
    }
    try:
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, name
    finally:
        channel.close()


def test_tls_identity_is_the_same_on_every_node():
    from molink.security.grpc_tls import TlsIdentity

    assert TlsIdentity.derive(KEY_A) == TlsIdentity.derive(SwarmKey(b"a" * 32))
    assert TlsIdentity.derive(KEY_A).cert_pem != TlsIdentity.derive(KEY_B).cert_pem


# ------------------------------------------------------------------------------------- DHT
def start(security: SwarmSecurity, peers: list[str] | None = None) -> Membership:
    return Membership(
        initial_peers=peers or [],
        host="127.0.0.1",
        announce_host="127.0.0.1",
        startup_timeout=30,
        security=security,
    )


@pytest.fixture(scope="module")
def keyed_swarm() -> Iterator[tuple[Membership, Membership]]:
    a = start(keyed(KEY_A))
    b = start(keyed(KEY_A), a.visible_maddrs())
    a.announce(ann(a, 0, 4), period=2.0)
    b.announce(ann(b, 5, 9), period=2.0)
    yield a, b
    b.shutdown()
    a.shutdown()


def peers_seen(m: Membership) -> set[str]:
    return {n.peer_id for n in m.nodes()}


def test_key_holders_see_each_other(keyed_swarm):
    a, b = keyed_swarm
    eventually(lambda: peers_seen(a) == {a.peer_id, b.peer_id}, what="a to see b")
    eventually(lambda: peers_seen(b) == {a.peer_id, b.peer_id}, what="b to see a")


@pytest.mark.parametrize("key", [KEY_B, None], ids=["wrong-key", "no-key"])
def test_a_node_without_the_key_cannot_join_or_announce(keyed_swarm, key):
    a, b = keyed_swarm
    eventually(lambda: peers_seen(a) == {a.peer_id, b.peer_id}, what="the swarm")
    try:
        intruder = start(keyed(key), a.visible_maddrs())
    except Exception as e:  # noqa: BLE001  # hivemind: no initial peer answered its ping
        assert "bootstrap" in str(e).lower() or "initial" in str(e).lower(), e
        return
    try:
        intruder.announce(ann(intruder, 5, 9))
        assert peers_seen(intruder) == {intruder.peer_id}  # it reads nothing
        time.sleep(3)
        assert intruder.peer_id not in peers_seen(a)  # and nobody stored its entry
    finally:
        intruder.shutdown()


def run_in_dht(m: Membership, coro):
    """Run ``coro`` in ``m``'s DHT process (through its lock on hivemind's command pipe)."""
    return m._call(m._dht.run_coroutine, coro)


async def _store_raw(_dht, node, key: str, subkey: bytes, value: bytes, expiration: float):
    """In a DHT process: store raw bytes (no signing) on every known peer."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)
    oks = []
    for peer_id in list(node.protocol.routing_table.peer_id_to_uid):
        result = await node.protocol.call_store(
            peer_id, [key_id], [value], [expiration], subkeys=[subkey]
        )
        oks.append(None if result is None else [bool(ok) for ok in result])
    return oks


async def _raw_entries(_dht, node, key: str):
    """In a DHT process: this peer's stored (subkey -> (raw value, expiration)) under ``key``."""
    from hivemind.dht.routing import DHTID

    found = node.protocol.storage.get(DHTID.generate(source=key))
    if found is None:
        return {}
    return {sk: (bytes(v), exp) for sk, (v, exp) in found.value.items()}


def test_forged_announcements_are_ignored(keyed_swarm):
    from hivemind.utils import MSGPackSerializer, get_dht_time

    a, b = keyed_swarm
    eventually(lambda: peers_seen(a) == {a.peer_id, b.peer_id}, what="the swarm")
    forged = ann(a, 5, 9).to_dict() | {"peer_id": "QmForged1", "node_key": a._node_key}
    value = MSGPackSerializer.dumps(forged)
    expiration = get_dht_time() + 30
    # b writes under a's owner subkey without a's signature: every peer refuses the store.
    refused = run_in_dht(
        b, partial(_store_raw, key=NODES_KEY, subkey=a._subkey, value=value, expiration=expiration)
    )
    assert refused == [[False]]
    # ... and under a plain subkey (not protected, so stored): readers skip it.
    stored = run_in_dht(
        b,
        partial(_store_raw, key=NODES_KEY, subkey="QmForged1", value=value, expiration=expiration),
    )
    assert stored == [[True]]  # the forged record is in the DHT...
    raw_on_a = partial(run_in_dht, a, partial(_raw_entries, key=NODES_KEY))
    eventually(lambda: any("QmForged1" in str(k) for k in raw_on_a()), what="the record on a")
    assert "QmForged1" not in peers_seen(a)  # ... and no reader takes it
    assert "QmForged1" not in peers_seen(b)
    assert {n.peer_id: n.start_layer for n in a.nodes()}[a.peer_id] == 0


def test_a_replayed_announcement_is_ignored(keyed_swarm):
    a, b = keyed_swarm
    eventually(lambda: peers_seen(a) == {a.peer_id, b.peer_id}, what="the swarm")
    stored = run_in_dht(a, partial(_raw_entries, key=NODES_KEY))
    old_value, old_expiration = next(v for k, v in stored.items() if b._subkey in k)
    b.update(state="leaving")
    eventually(
        lambda: any(n.peer_id == b.peer_id and n.state == "leaving" for n in a.nodes()),
        what="a to see b leaving",
    )
    try:
        # Anyone replays b's old, validly signed "online" record: refused (an older expiration;
        # the signature covers it, so it can't be moved forward).
        replayed = run_in_dht(
            a,
            partial(
                _store_raw,
                key=NODES_KEY,
                subkey=b._subkey,
                value=old_value,
                expiration=old_expiration,
            ),
        )
        assert replayed == [[False]]
        time.sleep(1)
        assert {n.peer_id: n.state for n in a.nodes()}[b.peer_id] == "leaving"
    finally:
        b.update(state="online")


def test_allowlist_hides_unlisted_nodes(keyed_swarm):
    a, b = keyed_swarm
    eventually(lambda: peers_seen(a) == {a.peer_id, b.peer_id}, what="the swarm")
    # A reader whose allowlist names a sees a, and only a: b is read from the same DHT, and
    # skipped because it isn't listed.
    only_a = start(keyed(KEY_A, allowed=frozenset({node_id(a._node_key)})), a.visible_maddrs())
    try:
        eventually(lambda: peers_seen(only_a) == {a.peer_id}, what="the reader to see a")
        time.sleep(1)
        assert peers_seen(only_a) == {a.peer_id}
    finally:
        only_a.shutdown()


# ------------------------------------------------------------------------------------- files
def test_settings_load_keys_from_files(tmp_path: Path):
    generate_swarm_key(tmp_path / "swarm.key")
    files = SecurityFiles(str(tmp_path / "swarm.key"), str(tmp_path / "node.key"))
    first = SwarmSecurity.from_files(files)
    again = SwarmSecurity.from_files(files)
    assert first.secured and first.swarm_key == again.swarm_key
    assert first.node_key.node_id == again.node_key.node_id  # the node key persists
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600
    assert "swarm key" in first.describe() and first.swarm_key.secret.hex() not in first.describe()
