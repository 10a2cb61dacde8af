"""The head's ``/swarm`` report: every node the DHT knows, the chain in use, its alternatives
and any coverage gap. Pure data assembly over what the API server process has at hand: the
announcements it read from the DHT and the pipeline snapshot from the engine process
(``PipelineExecutor.pipeline_snapshot``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import molink
from molink.comm.announcement import NodeAnnouncement
from molink.comm.chain import difference, uncovered_layers
from molink.weight_digest import WeightDigests


def build_swarm_report(
    head: NodeAnnouncement,
    nodes: Sequence[NodeAnnouncement],
    pipeline: Mapping[str, Any] | None,
    seconds_since_stored: Mapping[str, float],
    weights: WeightDigests | None = None,
) -> dict[str, Any]:
    """The ``/swarm`` document.

    Args:
        head: this head's own announcement.
        nodes: the announcements read from the DHT (this head's included).
        pipeline: the engine's pipeline snapshot, or None when the engine did not answer.
        seconds_since_stored: per peer id, seconds since it last refreshed its announcement.
        weights: the head's weight digests, which nodes' announced digests must match.
    """
    pipeline = pipeline or {}
    chain: list[dict[str, Any]] = list(pipeline.get("chain", []))
    standbys = {s["peer_id"] for s in pipeline.get("standbys", [])}
    excluded: Mapping[str, str] = pipeline.get("excluded", {})
    rtt: Mapping[str, float] = pipeline.get("rtt_s", {})
    step_s = {hop["peer_id"]: hop.get("step_s") for hop in chain}
    in_chain = {hop["peer_id"] for hop in chain}
    differs = {n.peer_id: difference(head, n, weights) for n in nodes if n.peer_id != head.peer_id}
    ours = [n for n in nodes if differs.get(n.peer_id) is None]

    alternatives = []
    for hop in chain[1:]:
        start, end = hop["layers"]
        peers = [
            n.peer_id
            for n in ours
            if n.peer_id != hop["peer_id"]
            and not n.is_head
            and n.state == "online"
            and n.peer_id not in excluded
            and n.start_layer <= start
            and end <= n.end_layer
        ]
        alternatives.append(
            {"layers": [start, end], "peers": peers, "standby": [p for p in peers if p in standbys]}
        )

    return {
        "generated_at": time.time(),
        "version": molink.__version__,
        "model": head.model_name,
        "model_hash": head.model_hash,
        "num_layers": head.num_layers,
        "head": head.peer_id,
        "ready": bool(pipeline.get("ready", False)),
        "cause": pipeline.get("cause") if pipeline else "the engine did not answer",
        "epoch": pipeline.get("epoch"),
        "steps_in_flight": pipeline.get("steps_in_flight"),
        "chain": chain,
        "alternatives": alternatives,
        "gaps": [
            list(g)
            for g in uncovered_layers(
                0, head.num_layers - 1, [n for n in ours if n.state == "online"]
            )
        ],
        "nodes": [
            {
                "peer_id": n.peer_id,
                "role": "head" if n.is_head else "stage",
                "model": n.model_name,
                "same_model": differs.get(n.peer_id) is None,
                "differs": differs.get(n.peer_id),  # "of a different model (...)" / "with ..."
                "layers": [n.start_layer, n.end_layer],
                "state": n.state,
                "address": n.grpc_address,
                "reachable": n.reachable,  # False: behind NAT, dialed through "relay"
                "relay": n.relay,
                "device": n.device,
                "kv_capacity_bytes": n.kv_capacity_bytes,
                "version": n.version,
                "last_seen_s": seconds_since_stored.get(n.peer_id),
                "throughput_tokens_per_s": n.throughput,
                "heads": list(n.head_ids),  # the heads it serves, and those running sequences
                "running_heads": list(n.running_head_ids),
                "sequences": n.sequences,
                "busy": n.busy,
                "rtt_s": rtt.get(n.peer_id),
                "step_s": step_s.get(n.peer_id),
                "in_chain": n.peer_id in in_chain,
                "standby": n.peer_id in standbys,
                "excluded": excluded.get(n.peer_id),
            }
            for n in nodes
        ],
        "events": list(pipeline.get("events", [])),
        # The head's fitted step costs (micro-batching's model; None before any measurement).
        "costs": pipeline.get("costs"),
        "max_micro_batches": pipeline.get("max_micro_batches"),
        # Another head runs sequences on a stage of the chain: one micro-batch in flight.
        "stages_shared": pipeline.get("stages_shared"),
    }
