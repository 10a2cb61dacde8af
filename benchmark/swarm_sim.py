"""Internet scale on paper: MoLink's span choice and chain assembly over hundreds of nodes.

    python -m benchmark.swarm_sim                  # 200 nodes, 24 h -> resources/swarm_sim.md
    python -m benchmark.swarm_sim --nodes 400 --hours 48 --seed 3

No processes and no model: simulated nodes run the project's own functions
(:func:`molink.core.span_choice.choose_span` when a node joins, as ``Node`` applies it;
:func:`molink.comm.chain.assemble_chain` when a head plans its chain, with the load other heads
put on each node), not copies of them.

The model: ``--layers`` layers. Node *i* holds ``capacity_i`` layers (memory) and computes
``speed_i`` layer-tokens per second at a full batch (log-normal, a 10x spread). Nodes sit in 4
regions: 5 ms RTT inside one, 80 ms between. A stage serving *l* layers for *h* heads gives each
``speed / (l * h)`` tokens/s; a pipeline runs at its slowest stage, but no faster than its
``--streams`` concurrent streams allow: each waits for a token's round trip through every hop
(``streams / sum of RTTs`` tokens/s). The swarm serves the sum over its pipelines. ``--heads``
nodes are heads (layers ``0..--head-layers-1``); the others choose their spans on joining.

Churn: every node leaves at random (``--churn`` of the nodes per hour) and comes back after an
exponential downtime (mean ``--downtime-min``), choosing its span again. A head whose chain lost
a node replans it at once (``assemble_chain`` without the lost node). Requests last
``--request-min``; one hits a loss when a node of its pipeline leaves during it.

The comparison, *k disjoint pipelines*, is Parallax's allocation as its paper describes it,
simplified: the online nodes are dealt into k groups (snake order by speed), layers are
water-filled over each group's nodes in proportion to speed within their capacity, k is the
value that maximizes the total rate, and the allocation is recomputed whenever membership
changes; a request hits a loss when its pipeline lost a node or was rebuilt. Reported per policy:
aggregate tokens/s (mean over time), the share of time every layer is served, and the share of
requests that hit a loss.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from molink.comm.announcement import NodeAnnouncement
from molink.comm.chain import ChainError, assemble_chain
from molink.core.span_choice import choose_span, coverage, uncovered

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def peer_name(i: int) -> str:
    out = ""
    for _ in range(4):
        i, r = divmod(i, 58)
        out = _B58[r] + out
    return "Qm" + out


@dataclass
class SimNode:
    index: int
    capacity: int  # layers that fit
    speed: float  # layer-tokens per second at a full batch
    region: int
    is_head: bool
    online: bool = True
    span: tuple[int, int] = (0, 0)
    back_at: float = 0.0  # minute it rejoins (while offline)

    @property
    def peer(self) -> str:
        return peer_name(self.index)


def make_nodes(args: argparse.Namespace, rng: random.Random) -> list[SimNode]:
    nodes = []
    for i in range(args.nodes):
        capacity = max(2, min(args.layers, int(rng.lognormvariate(math.log(args.layers / 5), 0.5))))
        speed = rng.lognormvariate(math.log(2000.0), 0.6)
        nodes.append(SimNode(i, capacity, speed, rng.randrange(4), is_head=i < args.heads))
    return nodes


def rtt(a: SimNode, b: SimNode) -> float:
    return 0.005 if a.region == b.region else 0.080


def round_trip(ring: list[SimNode]) -> float:
    """Seconds of network a token spends going through ``ring`` and back to its first node."""
    if len(ring) < 2:
        return 1e-3
    return sum(rtt(a, b) / 2 for a, b in zip(ring, ring[1:] + ring[:1], strict=True))


# ---------------------------------------------------------------- MoLink's policy
class MoLinkSwarm:
    """Nodes choosing spans as MoLink nodes do, heads assembling chains as MoLink heads do."""

    def __init__(self, nodes: list[SimNode], layers: int, head_layers: int, streams: int) -> None:
        self.nodes, self.layers, self.streams = nodes, layers, streams
        self.chains: dict[int, list[tuple[int, int, int]]] = {}  # head -> [(node, start, end)]
        for node in nodes:
            if node.is_head:
                node.span = (0, min(node.capacity, head_layers, layers - 1) - 1)
        for node in nodes:
            if not node.is_head:
                self.join(node)
        for node in nodes:
            if node.is_head:
                self.plan(node)

    def first_layer(self) -> int:
        heads = [n for n in self.nodes if n.is_head and n.online]
        return min((n.span[1] + 1 for n in heads), default=1)

    def join(self, node: SimNode) -> None:
        served = coverage(
            self.layers,
            (
                (n.span[0], n.span[1], 1.0)
                for n in self.nodes
                if n.online and not n.is_head and n is not node
            ),
        )
        node.span = choose_span(served, node.capacity, self.first_layer())

    def heads_on(self) -> dict[int, int]:
        count: dict[int, int] = {}
        for hops in self.chains.values():
            for index, _, _ in hops[1:]:
                count[index] = count.get(index, 0) + 1
        return count

    def announcement(self, node: SimNode, heads: int) -> NodeAnnouncement:
        span_layers = node.span[1] - node.span[0] + 1
        return NodeAnnouncement(
            peer_id=node.peer, model_name="m", model_hash="h", num_layers=self.layers,
            start_layer=node.span[0], end_layer=node.span[1], grpc_address="10.0.0.1:1",
            state="online", version="sim", kv_capacity_bytes=1 << 30, kv_free_bytes=1 << 29,
            is_head=node.is_head, throughput=node.speed / span_layers, heads=heads,
        )  # fmt: skip

    def plan(self, head: SimNode) -> None:
        self.chains.pop(head.index, None)
        if not head.online:
            return
        load = self.heads_on()
        anns = [self.announcement(n, load.get(n.index, 0)) for n in self.nodes if n.online]
        rtts = {n.peer: rtt(head, n) for n in self.nodes}
        try:
            chain = assemble_chain(self.announcement(head, 0), anns, rtt_s=rtts)
        except ChainError:
            return
        by_peer = {n.peer: n for n in self.nodes}
        self.chains[head.index] = [
            (by_peer[h.peer_id].index, h.start_layer, h.end_layer) for h in chain.stages
        ]

    def rate(self) -> float:
        load = self.heads_on()
        total = 0.0
        for hops in self.chains.values():
            compute = min(
                self.nodes[i].speed / ((end - start + 1) * (load.get(i, 0) if k else 1))
                for k, (i, start, end) in enumerate(hops)
            )
            ring = [self.nodes[i] for i, _, _ in hops]
            total += min(compute, self.streams / round_trip(ring))
        return total

    def covered(self) -> bool:
        online = [n for n in self.nodes if n.online]
        if not any(n.is_head for n in online):
            return False
        served = coverage(self.layers, ((n.span[0], n.span[1], 1.0) for n in online))
        return not uncovered(served)

    def leave(self, node: SimNode) -> set[int]:
        """``node`` left: the heads whose chains it was in replan. The heads hit."""
        node.online = False
        hit = {h for h, hops in self.chains.items() if any(i == node.index for i, _, _ in hops)}
        for h in sorted(hit):
            self.plan(self.nodes[h])
        return hit

    def rejoin(self, node: SimNode) -> None:
        node.online = True
        if node.is_head:
            self.plan(node)
        else:
            self.join(node)
            for h in [
                n for n in self.nodes if n.is_head and n.online and n.index not in self.chains
            ]:
                self.plan(h)


# ---------------------------------------------------------------- k disjoint pipelines
def group_rate(group: list[SimNode], layers: int, streams: int) -> float:
    """The rate of one pipeline of ``group`` with layers water-filled by speed within capacity
    (its nodes in region order, so the ring crosses few regions)."""
    if sum(n.capacity for n in group) < layers:
        return 0.0
    ring = sorted(group, key=lambda n: n.region)
    lo, hi = 0.0, max(n.speed for n in group)
    for _ in range(50):  # the largest rate r such that sum(min(cap, speed / r)) >= layers
        mid = (lo + hi) / 2
        if mid == 0 or sum(min(n.capacity, n.speed / mid) for n in group) >= layers:
            lo = mid
        else:
            hi = mid
    return min(lo, streams / round_trip(ring))


def k_pipelines(nodes: list[SimNode], layers: int, streams: int) -> tuple[float, list[list[int]]]:
    """Best total rate over k and the pipelines (node indexes) that give it."""
    online = sorted((n for n in nodes if n.online), key=lambda n: -n.speed)
    best: tuple[float, list[list[int]]] = (0.0, [])
    for k in range(1, max(1, sum(n.capacity for n in online) // layers) + 1):
        groups: list[list[SimNode]] = [[] for _ in range(k)]
        for j, node in enumerate(online):
            lap, pos = divmod(j, k)
            groups[pos if lap % 2 == 0 else k - 1 - pos].append(node)
        rates = [group_rate(g, layers, streams) for g in groups]
        if sum(rates) > best[0]:
            best = (
                sum(rates),
                [[n.index for n in g] for g, r in zip(groups, rates, strict=True) if r > 0],
            )
    return best


# ---------------------------------------------------------------- churn
def simulate(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    nodes = make_nodes(args, rng)
    molink = MoLinkSwarm([replace(n) for n in nodes], args.layers, args.head_layers, args.streams)
    para_nodes = [replace(n) for n in nodes]
    para_rate, para_groups = k_pipelines(para_nodes, args.layers, args.streams)
    k_at_start = len(para_groups)
    steps = int(args.hours * 60)
    leave_p = args.churn / 60.0
    stats = {p: {"rate": 0.0, "covered": 0, "hit": 0.0} for p in ("molink", "k_pipelines")}
    # Each policy's losses per minute, to count requests alive in the window after them.
    losses: dict[str, list[float]] = {"molink": [], "k_pipelines": []}
    for minute in range(steps):
        events = []
        for n in nodes:
            if n.online and rng.random() < leave_p:
                n.online = False
                n.back_at = minute + rng.expovariate(1.0 / args.downtime_min)
                events.append(("leave", n.index))
            elif not n.online and minute >= n.back_at:
                n.online = True
                events.append(("join", n.index))
        m_hit_rate = 0.0
        before = molink.rate()
        for what, i in events:
            if what == "leave":
                hit = molink.leave(molink.nodes[i])
                m_hit_rate += sum(1 for _ in hit)
            else:
                molink.rejoin(molink.nodes[i])
        m_rate = molink.rate()
        heads_alive = max(1, len(molink.chains))
        losses["molink"].append(min(1.0, m_hit_rate / heads_alive) if before else 0.0)
        p_hit = 0.0
        if events:
            for what, i in events:
                para_nodes[i].online = what == "join"
            old = {tuple(g) for g in para_groups}
            para_rate, para_groups = k_pipelines(para_nodes, args.layers, args.streams)
            kept = sum(1 for g in para_groups if tuple(g) in old)
            p_hit = 1.0 - kept / max(1, len(old))
        losses["k_pipelines"].append(p_hit)
        stats["molink"]["rate"] += m_rate
        stats["k_pipelines"]["rate"] += para_rate
        stats["molink"]["covered"] += molink.covered()
        stats["k_pipelines"]["covered"] += para_rate > 0
        if args.progress and minute % 120 == 0:
            print(f"  minute {minute}/{steps}: molink {m_rate:.0f} tok/s, k pipelines "
                  f"{para_rate:.0f} tok/s", file=sys.stderr, flush=True)  # fmt: skip
    window = max(1, int(args.request_min))
    out = {}
    for policy, s in stats.items():
        series = losses[policy]
        # A request starting at minute t is hit when a loss on its pipeline falls in [t, t+window).
        hit = [1 - math.prod(1 - x for x in series[t : t + window]) for t in range(len(series))]
        out[policy] = {
            "tokens_per_s": round(s["rate"] / steps, 1),
            "covered_share": round(s["covered"] / steps, 4),
            "requests_hit_share": round(sum(hit) / len(hit), 4),
        }
    out["k_pipelines"]["k_at_start"] = k_at_start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.swarm_sim",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--heads", type=int, default=20, help="nodes that are heads")
    parser.add_argument("--head-layers", type=int, default=4, help="layers each head serves")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams per pipeline")
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--churn", type=float, default=0.10, help="share of nodes leaving per hour")
    parser.add_argument("--downtime-min", type=float, default=30.0)
    parser.add_argument("--request-min", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("resources"))
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    started = time.time()
    result = simulate(args)
    result["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["command"] = " ".join(["python -m benchmark.swarm_sim", *sys.argv[1:]])
    result["date"] = time.strftime("%Y-%m-%d")
    result["seconds"] = round(time.time() - started, 1)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "swarm_sim.json").write_text(json.dumps(result, indent=2) + "\n")
    m, p = result["molink"], result["k_pipelines"]
    lines = [
        f"# {args.nodes} simulated nodes, {args.hours:g} h of churn ({result['date']})",
        "",
        f"{args.layers} layers, {args.heads} MoLink heads, {args.churn:.0%} of nodes leaving per "
        f"hour (back after {args.downtime_min:g} min on average), {args.request_min:g}-minute "
        f"requests. Command: `{result['command']}`. Model and assumptions: "
        "`benchmark/swarm_sim.py`.",
        "",
        "| Policy | Tokens/s (mean) | Time every layer served | Requests hit by a loss |",
        "|---|---:|---:|---:|",
        f"| MoLink (span choice + load-aware chains, {args.heads} heads) | {m['tokens_per_s']:.0f} "
        f"| {m['covered_share']:.1%} | {m['requests_hit_share']:.2%} |",
        f"| k disjoint pipelines (Parallax-like, k={p['k_at_start']} at start) | "
        f"{p['tokens_per_s']:.0f} | {p['covered_share']:.1%} | {p['requests_hit_share']:.2%} |",
    ]
    (args.output_dir / "swarm_sim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
