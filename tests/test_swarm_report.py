"""The head's ``/swarm`` document, from announcements and a pipeline snapshot (pure data)."""

from __future__ import annotations

import dataclasses

from test_chain import ann

from molink.entrypoints.swarm_report import build_swarm_report
from molink.weight_digest import WeightDigests

HEAD = ann("Head", 0, 9, port=1)
A = ann("A", 10, 29, port=2)
B = ann("B", 10, 29, port=3)  # a replica of A, prepared as a standby
C = ann("C", 5, 29, port=4)  # covers A's span too, not prepared
J = ann("J", 10, 29, state="joining", port=5)
OTHER = ann("Xther", 0, 29, model_hash="h2", port=6)

SNAPSHOT = {
    "ready": True,
    "cause": None,
    "epoch": 0,
    "steps_in_flight": 2,
    "chain": [
        {"peer_id": "Head", "address": "127.0.0.1:1", "layers": [0, 9], "step_s": 0.01},
        {"peer_id": "A", "address": "127.0.0.1:2", "layers": [10, 29], "step_s": 0.02},
    ],
    "standbys": [{"peer_id": "B", "address": "127.0.0.1:3", "layers": [10, 29]}],
    "excluded": {},
    "rtt_s": {"A": 0.004, "B": 0.005},
    "events": [{"kind": "restore", "time": 1.0, "chain": "head [0-9] -> A", "restore_s": None}],
}


def report(nodes, snapshot=SNAPSHOT):
    return build_swarm_report(HEAD, nodes, snapshot, {"A": 1.5})


def test_chain_alternatives_and_per_node_view():
    doc = report([HEAD, A, B, C, J, OTHER])
    assert doc["ready"] and doc["gaps"] == [] and doc["num_layers"] == 30
    assert [hop["peer_id"] for hop in doc["chain"]] == ["Head", "A"]
    assert doc["alternatives"] == [{"layers": [10, 29], "peers": ["B", "C"], "standby": ["B"]}]
    nodes = {n["peer_id"]: n for n in doc["nodes"]}
    assert nodes["A"]["in_chain"] and nodes["A"]["step_s"] == 0.02 and nodes["A"]["rtt_s"] == 0.004
    assert nodes["A"]["last_seen_s"] == 1.5 and nodes["B"]["last_seen_s"] is None
    assert nodes["B"]["standby"] and not nodes["B"]["in_chain"]
    assert not nodes["C"]["standby"] and not nodes["C"]["in_chain"]
    assert nodes["Head"]["role"] == "head" and nodes["A"]["role"] == "stage"
    assert not nodes["Xther"]["same_model"]
    assert doc["events"] == SNAPSHOT["events"]


def test_gap_counts_online_nodes_of_this_model_only():
    # J is still joining and Other serves another model: layers 10-29 have no server.
    doc = report([HEAD, J, OTHER], {**SNAPSHOT, "ready": False, "cause": "layers 10-29 ..."})
    assert doc["gaps"] == [[10, 29]]
    assert not doc["ready"] and doc["cause"] == "layers 10-29 ..."


def test_excluded_nodes_are_no_alternative():
    doc = report([HEAD, A, B, C], {**SNAPSHOT, "excluded": {"C": "unreachable or refused"}})
    assert doc["alternatives"][0]["peers"] == ["B"]
    assert {n["peer_id"]: n["excluded"] for n in doc["nodes"]}["C"] == "unreachable or refused"


def test_without_an_engine_answer():
    doc = report([HEAD, A], None)
    assert not doc["ready"] and doc["cause"] == "the engine did not answer"
    assert doc["chain"] == [] and doc["gaps"] == []


def test_a_node_with_other_weights_is_no_alternative():
    weights = WeightDigests(layers=tuple(f"d{i}" for i in range(30)), other="emb")
    good = dataclasses.replace(C, weights_digest=weights.span(5, 29, 30))
    bad = dataclasses.replace(B, weights_digest="0123456789abcdef")
    doc = build_swarm_report(HEAD, [HEAD, A, bad, good], SNAPSHOT, {}, weights)
    assert doc["alternatives"][0]["peers"] == ["C"]
    nodes = {n["peer_id"]: n for n in doc["nodes"]}
    assert not nodes["B"]["same_model"] and nodes["B"]["differs"].startswith("with different")
    assert nodes["C"]["same_model"] and nodes["C"]["differs"] is None
