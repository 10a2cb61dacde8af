"""Unit tests of NodeAnnouncement validation and chain assembly (no network)."""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from molink.comm import chain as chain_mod
from molink.comm.announcement import NodeAnnouncement, split_host_port
from molink.comm.chain import (
    Chain,
    ChainError,
    ChainIncomplete,
    Hop,
    assemble_chain,
    mismatched,
    wait_for_chain,
)
from molink.security.node_ids import node_id
from molink.security.node_key import NodeKey
from molink.weight_digest import WeightDigests

L = 30  # layers of the test model


def ann(
    peer: str,
    start: int,
    end: int,
    *,
    state: str = "online",
    model_hash: str = "h1",
    num_layers: int = L,
    head: bool | None = None,
    port: int = 50051,
) -> NodeAnnouncement:
    """An announcement; peer names must be base58 (no 0, O, I, l)."""
    return NodeAnnouncement(
        peer_id=peer,
        model_name="test-model",
        model_hash=model_hash,
        num_layers=num_layers,
        start_layer=start,
        end_layer=end,
        grpc_address=f"127.0.0.1:{port}",
        state=state,
        version="0.2.0",
        kv_capacity_bytes=1 << 30,
        is_head=(start == 0) if head is None else head,
    )


HEAD = ann("QmHead", 0, 14, state="joining")


@pytest.fixture(autouse=True)
def _reset_warned() -> None:
    chain_mod._warned_mismatch.clear()


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def chain_logs() -> Iterator[list[logging.LogRecord]]:
    """Records of the chain module's logger (``molink`` does not propagate to root/caplog)."""
    handler = _ListHandler()
    chain_logger = logging.getLogger("molink.comm.chain")
    old_level = chain_logger.level
    chain_logger.addHandler(handler)
    chain_logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        chain_logger.removeHandler(handler)
        chain_logger.setLevel(old_level)


# -- successful chains ---------------------------------------------------------------------------


def spans(chain: Chain) -> list[tuple[str, int, int]]:
    return [(hop.peer_id, hop.start_layer, hop.end_layer) for hop in chain.stages]


def test_two_stages() -> None:
    b = ann("QmB", 15, 29)
    chain = assemble_chain(HEAD, [b])
    assert spans(chain) == [("QmHead", 0, 14), ("QmB", 15, 29)]
    assert chain.head is HEAD
    assert chain.partition == [15, 15]
    assert chain.peer_ids == ["QmHead", "QmB"]


def test_three_uneven_stages_any_order_with_head_in_nodes() -> None:
    head = ann("QmHead", 0, 4)
    b, c = ann("QmB", 5, 25), ann("QmC", 26, 29)
    chain = assemble_chain(head, [c, head, b])
    assert chain.peer_ids == ["QmHead", "QmB", "QmC"]
    assert chain.partition == [5, 21, 4]


def test_head_alone_serves_everything() -> None:
    head = ann("QmHead", 0, L - 1)
    assert assemble_chain(head, []).partition == [L]


def test_head_is_stage_zero_even_if_joining_or_excluded() -> None:
    b = ann("QmB", 15, 29)
    chain = assemble_chain(HEAD, [b], exclude_peers={"QmHead"})
    assert chain.stages[0].node is HEAD


def test_head_own_stale_entry_in_nodes_is_replaced_by_head() -> None:
    stale = ann("QmHead", 0, 9)  # an older announcement of the head itself
    b = ann("QmB", 15, 29)
    assert spans(assemble_chain(HEAD, [stale, b]))[0] == ("QmHead", 0, 14)


def test_head_must_start_at_layer_zero() -> None:
    with pytest.raises(ChainError, match="must start at layer 0"):
        assemble_chain(ann("QmHead", 5, 29, head=False), [])


# -- replicas, overlaps and sub-spans ------------------------------------------------------------


def test_equal_replicas_are_picked_per_head_deterministically_and_spread_over_heads() -> None:
    replicas = [ann(f"QmB{i}", 15, 29) for i in range(1, 4)]
    picks = set()
    for h in range(1, 10):
        head = ann(f"QmHead{h}", 0, 14, state="joining")
        chosen = {assemble_chain(head, order).peer_ids[1] for order in (replicas, replicas[::-1])}
        assert len(chosen) == 1  # the same view gives the same chain, in any order
        picks |= chosen
    assert len(picks) > 1  # heads starting at once don't all pile onto one replica


def _loaded(a: NodeAnnouncement, heads: int, free: int = 1 << 29) -> NodeAnnouncement:
    return dataclasses.replace(a, heads=heads, kv_free_bytes=free)


def test_a_second_head_takes_the_replica_no_other_head_uses() -> None:
    b1, b2 = ann("QmB1", 15, 29), ann("QmB2", 15, 29)
    for first in ("QmB1", "QmB2"):
        view = [_loaded(b, 1 if b.peer_id == first else 0) for b in (b1, b2)]
        second = assemble_chain(HEAD, view).peer_ids[1]
        assert second != first
        # The head already in the chain doesn't count its own use against its node.
        assert assemble_chain(HEAD, view, serving_me={first}).peer_ids[1] in {"QmB1", "QmB2"}


def test_shared_compute_outweighs_a_faster_busy_node_only_when_it_should() -> None:
    fast = dataclasses.replace(ann("QmB1", 15, 29), throughput=400.0, heads=1)
    slow = dataclasses.replace(ann("QmB2", 15, 29), throughput=100.0)
    # Shared by two heads: 2 x 2.5 ms + the shared-node penalty is more than 10 ms alone ...
    assert assemble_chain(HEAD, [fast, slow]).peer_ids[1] == "QmB2"
    # ... but not more than 50 ms alone.
    faster = dataclasses.replace(fast, throughput=4000.0)
    slower = dataclasses.replace(slow, throughput=20.0)
    assert assemble_chain(HEAD, [faster, slower]).peer_ids[1] == "QmB1"


def test_a_node_without_free_kv_is_avoided_unless_it_already_serves_this_head() -> None:
    full = _loaded(ann("QmB1", 15, 29), heads=0, free=0)
    roomy = _loaded(ann("QmB2", 15, 29), heads=0)
    assert assemble_chain(HEAD, [full, roomy]).peer_ids[1] == "QmB2"
    assert assemble_chain(HEAD, [full], serving_me=()).peer_ids[1] == "QmB1"  # still usable


def test_replicas_prefer_online_and_lower_rtt() -> None:
    b1 = ann("QmB1", 15, 29, state="joining")
    b2, b3 = ann("QmB2", 15, 29), ann("QmB3", 15, 29)
    assert assemble_chain(HEAD, [b1, b2, b3]).peer_ids == ["QmHead", "QmB2"]
    rtt = {"QmB2": 0.080, "QmB3": 0.010}
    assert assemble_chain(HEAD, [b1, b2, b3], rtt_s=rtt).peer_ids == ["QmHead", "QmB3"]


def test_a_direct_replica_wins_over_a_relayed_one_as_near() -> None:
    """A node behind NAT is reached through its relay: its hop counts its RTT twice."""
    direct = ann("QmZDirect", 15, 29)
    key = NodeKey.generate().public_key
    nated = dataclasses.replace(
        ann("QmANated", 15, 29), reachable=False, relay="10.0.0.1:50051", node_key=key
    )
    route = f"{node_id(key)}@10.0.0.1:50051"
    assert nated.dial_address == route
    rtt = {"QmZDirect": 0.010, "QmANated": 0.010}
    assert assemble_chain(HEAD, [nated, direct], rtt_s=rtt).peer_ids == ["QmHead", "QmZDirect"]
    chain = assemble_chain(HEAD, [nated, direct], rtt_s={**rtt, "QmZDirect": 0.030})
    assert chain.peer_ids == ["QmHead", "QmANated"]
    assert chain.stages[1].grpc_address == route


def test_replicas_prefer_higher_announced_throughput() -> None:
    slow = dataclasses.replace(ann("QmB1", 15, 29), throughput=50.0)
    fast = dataclasses.replace(ann("QmB2", 15, 29), throughput=500.0)
    unknown = ann("QmB3", 15, 29)  # counts the median of the measured ones
    assert assemble_chain(HEAD, [slow, fast, unknown]).peer_ids == ["QmHead", "QmB2"]
    # Fewer hops still come first.
    quick_pair = [
        dataclasses.replace(ann("QmC1", 15, 20), throughput=1e6),
        dataclasses.replace(ann("QmC2", 21, 29), throughput=1e6),
    ]
    assert assemble_chain(HEAD, [slow, *quick_pair]).peer_ids == ["QmHead", "QmB1"]


def test_announcements_of_older_nodes_without_throughput_are_read() -> None:
    d = ann("QmB", 15, 29).to_dict()
    del d["throughput"]
    assert NodeAnnouncement.from_dict(d).throughput == 0.0


def test_other_heads_are_not_stages() -> None:
    other_head = ann("QmA", 0, 29)
    b = ann("QmB", 15, 29)
    assert assemble_chain(HEAD, [other_head, b]).peer_ids == ["QmHead", "QmB"]


def test_exclude_peers_skips_failed_replica() -> None:
    b1, b2 = ann("QmB1", 15, 29), ann("QmB2", 15, 29)
    assert assemble_chain(HEAD, [b1, b2], exclude_peers={"QmB1"}).peer_ids == ["QmHead", "QmB2"]
    with pytest.raises(ChainIncomplete) as info:
        assemble_chain(HEAD, [b1, b2], exclude_peers=["QmB1", "QmB2"])
    assert info.value.missing == [(15, 29)]


def test_a_node_serves_a_sub_span_of_its_layers() -> None:
    b = ann("QmB", 10, 29)  # overlaps the head: serves only 15-29 for it
    assert spans(assemble_chain(HEAD, [b])) == [("QmHead", 0, 14), ("QmB", 15, 29)]


def test_fewest_hops_wins_over_exact_spans() -> None:
    b, c = ann("QmB", 15, 24), ann("QmC", 25, 29)
    d = ann("QmD", 12, 29)
    assert spans(assemble_chain(HEAD, [b, c, d]))[1:] == [("QmD", 15, 29)]


def test_overlapping_nodes_split_where_the_next_one_starts() -> None:
    b, c = ann("QmB", 15, 24), ann("QmC", 20, 29)
    assert spans(assemble_chain(HEAD, [b, c]))[1:] in (
        [("QmB", 15, 24), ("QmC", 25, 29)],
        [("QmB", 15, 19), ("QmC", 20, 29)],
    )
    # A node that already holds a span for this head keeps it (no weight reload).
    chain = assemble_chain(HEAD, [b, c], loaded={"QmB": (15, 19), "QmC": (20, 29)})
    assert spans(chain)[1:] == [("QmB", 15, 19), ("QmC", 20, 29)]


def test_loaded_span_is_preferred_over_a_lower_peer_id() -> None:
    b1, b2 = ann("QmB1", 15, 29), ann("QmB2", 15, 29)
    chain = assemble_chain(HEAD, [b1, b2], loaded={"QmB1": (10, 29), "QmB2": (15, 29)})
    assert chain.peer_ids == ["QmHead", "QmB2"]


def test_leaving_nodes_are_not_used() -> None:
    b1, b2 = ann("QmB1", 15, 29, state="leaving"), ann("QmB2", 15, 29)
    assert assemble_chain(HEAD, [b1, b2]).peer_ids == ["QmHead", "QmB2"]


def test_each_node_appears_once() -> None:
    b = ann("QmB", 15, 29)
    c = ann("QmC", 20, 22)
    chain = assemble_chain(HEAD, [b, c])
    assert chain.peer_ids == ["QmHead", "QmB"]


# -- gaps, joining nodes, other models ---------------------------------------------------------


def test_gap_in_the_middle() -> None:
    head = ann("QmHead", 0, 9)
    with pytest.raises(ChainIncomplete) as info:
        assemble_chain(head, [ann("QmC", 20, 29)])
    assert info.value.missing == [(10, 19)]
    assert "layers 10-19 are not served by any node" in str(info.value)


def test_all_gaps_are_listed() -> None:
    head = ann("QmHead", 0, 4)
    with pytest.raises(ChainIncomplete) as info:
        assemble_chain(head, [ann("QmB", 6, 14)])
    assert info.value.missing == [(5, 5), (15, 29)]
    message = str(info.value)
    assert "layer 5 is not served by any node" in message
    assert "layers 15-29 are not served by any node" in message


def test_nothing_but_the_head() -> None:
    with pytest.raises(ChainIncomplete, match="layers 15-29 are not served by any node"):
        assemble_chain(HEAD, [])


def test_joining_node_counts_as_missing_and_is_named() -> None:
    b = ann("QmB", 15, 29, state="joining")
    with pytest.raises(ChainIncomplete) as info:
        assemble_chain(HEAD, [b])
    assert info.value.missing == [(15, 29)]
    assert "node QmB is joining" in str(info.value)
    # once it is online, the chain forms
    assert assemble_chain(HEAD, [ann("QmB", 15, 29)]).partition == [15, 15]


def test_model_mismatch_is_ignored_named_and_warned_once(
    chain_logs: list[logging.LogRecord],
) -> None:
    other = ann("QmX", 15, 29, model_hash="h2")
    assert [n for n, _ in mismatched(HEAD, [HEAD, other, ann("QmB", 15, 29)])] == [other]
    for _ in range(3):
        with pytest.raises(ChainIncomplete) as info:
            assemble_chain(HEAD, [other])
    message = str(info.value)
    assert "layers 15-29 are not served by any node" in message
    assert "node QmX serves layers 15-29 of a different model" in message
    assert "hash h2" in message
    warnings = [r for r in chain_logs if "QmX" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "different model" in warnings[0].getMessage()


def test_layer_count_mismatch_is_a_different_model() -> None:
    other = ann("QmX", 15, 31, num_layers=32)
    with pytest.raises(ChainIncomplete, match="node QmX serves layers 15-31 of a different model"):
        assemble_chain(HEAD, [other])


def test_a_node_with_other_weights_is_refused_by_its_digest(
    chain_logs: list[logging.LogRecord],
) -> None:
    weights = WeightDigests(layers=tuple(f"d{i}" for i in range(L)), other="emb")
    ours = dataclasses.replace(ann("QmB", 15, 29), weights_digest=weights.span(15, 29, L))
    tuned = list(weights.layers)
    tuned[20] = "fine-tuned"
    theirs = WeightDigests(layers=tuple(tuned), other="emb").span(15, 29, L)
    other = dataclasses.replace(ann("QmX", 15, 29), weights_digest=theirs)
    unknown = ann("QmU", 15, 29)  # announces no digest (older node): accepted
    assert assemble_chain(HEAD, [ours], weights=weights).peer_ids == ["QmHead", "QmB"]
    assert assemble_chain(HEAD, [unknown], weights=weights).peer_ids == ["QmHead", "QmU"]
    assert assemble_chain(HEAD, [other]).peer_ids == ["QmHead", "QmX"]  # head can't tell
    with pytest.raises(ChainIncomplete) as info:
        assemble_chain(HEAD, [other], weights=weights)
    message = str(info.value)
    assert "node QmX serves layers 15-29 with different weights" in message
    assert f"digest {theirs}" in message and weights.span(15, 29, L) in message
    assert assemble_chain(HEAD, [other, ours], weights=weights).peer_ids == ["QmHead", "QmB"]
    assert any("different weights" in r.getMessage() for r in chain_logs)


def test_mismatched_node_is_never_a_stage() -> None:
    other = ann("QmX", 10, 29, model_hash="h2")
    b = ann("QmB", 15, 29)
    assert assemble_chain(HEAD, [other, b]).peer_ids == ["QmHead", "QmB"]


def test_errors_pickle() -> None:
    err = ChainIncomplete("layers 1-2 missing", [(1, 2)])
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.missing == [(1, 2)]


def test_chain_rejects_non_contiguous_stages() -> None:
    with pytest.raises(ValueError):
        Chain((Hop(HEAD, 0, 14), Hop(ann("QmB", 16, 29), 16, 29)))
    with pytest.raises(ValueError, match="outside the layers"):
        Hop(ann("QmB", 16, 29), 15, 29)


# -- NodeAnnouncement validation ---------------------------------------------------------------


def test_roundtrip_and_extra_keys_ignored() -> None:
    d = HEAD.to_dict()
    assert NodeAnnouncement.from_dict(d) == HEAD
    assert NodeAnnouncement.from_dict({**d, "future_field": [1, 2]}) == HEAD
    assert HEAD.layers == range(15)
    assert split_host_port("[::1]:8000") == ("::1", 8000)


BAD_FIELDS = [
    ("peer_id", ""),
    ("peer_id", "Qm0OIl"),  # not base58
    ("peer_id", 123),
    ("model_name", ""),
    ("model_hash", None),
    ("model_hash", "x" * 5000),
    ("num_layers", 0),
    ("num_layers", "30"),
    ("num_layers", 30.0),
    ("num_layers", True),
    ("start_layer", -1),
    ("start_layer", 20),  # > end_layer
    ("end_layer", 30),  # == num_layers
    ("end_layer", [14]),
    ("grpc_address", "localhost"),
    ("grpc_address", "localhost:abc"),
    ("grpc_address", "localhost:0"),
    ("grpc_address", "localhost:70000"),
    ("grpc_address", ":8000"),
    ("grpc_address", "a b:8000"),
    ("grpc_address", "::1:8000"),
    ("grpc_address", "host:+80"),
    ("state", "offline"),
    ("state", "gone"),
    ("state", "ONLINE"),
    ("version", 2),
    ("kv_capacity_bytes", -1),
    ("kv_capacity_bytes", 1.5),
    ("is_head", 1),
    ("is_head", "true"),
    ("throughput", -1.0),
    ("throughput", float("inf")),
    ("throughput", float("nan")),
    ("throughput", "fast"),
    ("throughput", True),
    ("reachable", "no"),
    ("reachable", False),  # behind NAT without a relay
    ("relay", "10.0.0.1"),
    ("grpc_address", "QmA@10.0.0.1:80"),  # a route is not an address
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_from_dict_rejects_bad_field(field: str, value: Any) -> None:
    d = HEAD.to_dict()
    d[field] = value
    with pytest.raises(ValueError):
        NodeAnnouncement.from_dict(d)


def test_from_dict_rejects_non_heads_claiming_head() -> None:
    d = ann("QmB", 15, 29).to_dict()
    d["is_head"] = True
    with pytest.raises(ValueError, match="head must start at layer 0"):
        NodeAnnouncement.from_dict(d)


@pytest.mark.parametrize("value", [None, [], "peer", 5, b"\x80"])
def test_from_dict_rejects_non_mappings(value: Any) -> None:
    with pytest.raises(ValueError):
        NodeAnnouncement.from_dict(value)


def test_from_dict_rejects_missing_field() -> None:
    d = HEAD.to_dict()
    del d["grpc_address"]
    with pytest.raises(ValueError, match="grpc_address"):
        NodeAnnouncement.from_dict(d)


# -- wait_for_chain with a fake membership -----------------------------------------------------


class FakeMembership:
    """Returns one list of nodes per call (the last one forever); may raise."""

    def __init__(self, *views: Any) -> None:
        self.views = list(views)
        self.calls = 0

    def nodes(self) -> list[NodeAnnouncement]:
        self.calls += 1
        view = self.views.pop(0) if len(self.views) > 1 else self.views[0]
        if isinstance(view, Exception):
            raise view
        return list(view)


def test_wait_for_chain_returns_once_complete() -> None:
    b = ann("QmB", 15, 29)
    fake = FakeMembership(
        [HEAD], RuntimeError("dht hiccup"), [HEAD, ann("QmB", 15, 29, state="joining")], [HEAD, b]
    )
    chain = wait_for_chain(fake, HEAD, timeout=5, poll_interval=0.01)  # type: ignore[arg-type]
    assert chain.peer_ids == ["QmHead", "QmB"]
    assert fake.calls == 4


def test_wait_for_chain_times_out_naming_missing_layers(
    chain_logs: list[logging.LogRecord],
) -> None:
    fake = FakeMembership([HEAD, ann("QmC", 20, 29)])
    with pytest.raises(ChainIncomplete) as info:
        wait_for_chain(  # type: ignore[arg-type]
            fake, HEAD, timeout=0.3, poll_interval=0.02, log_interval=0.1
        )
    assert info.value.missing == [(15, 19)]
    assert "no complete chain after 0.3 s" in str(info.value)
    assert "layers 15-19 are not served by any node" in str(info.value)
    waiting = [r for r in chain_logs if "waiting for a complete chain" in r.getMessage()]
    assert waiting and all(r.levelno == logging.INFO for r in waiting)
