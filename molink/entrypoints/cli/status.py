"""``molink status --initial_peer HOST:PORT``: the swarm as a table, from any machine.

Reads every node's announcement from the DHT (joining it as a client, through any node's gRPC
address or DHT multiaddr) and prints, per model, one row per node (span, role, state, address,
throughput, version) and the layers no online node serves. Exit status: 0 when every model's
layers are covered, 1 when some are not, 2 when the swarm can't be reached or is empty.
Also runnable as ``python -m molink.entrypoints.cli.status``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from vllm.logger import configure_logging_from_args, init_logger

from molink.comm.announcement import NodeAnnouncement
from molink.comm.chain import uncovered_layers
from molink.comm.membership import Membership
from molink.security.settings import SecurityFiles
from molink.security.swarm_security import SwarmSecurity

logger = init_logger("molink.entrypoints.cli.status")

_COLUMNS = (
    "node",
    "role",
    "layers",
    "state",
    "address",
    "device",
    "KV free/all GiB",
    "heads",
    "tok/s",
    "weights",
    "version",
)


def render(nodes: Sequence[NodeAnnouncement]) -> tuple[str, bool]:
    """The table of ``nodes`` grouped by model, and whether every model is fully covered."""
    by_model: dict[tuple[str, str], list[NodeAnnouncement]] = {}
    for node in nodes:
        by_model.setdefault((node.model_name, node.model_hash), []).append(node)
    out, complete = [], True
    for (name, digest), group in sorted(by_model.items()):
        group.sort(key=lambda n: (n.start_layer, n.end_layer, n.peer_id))
        rows = [
            (
                n.peer_id[-12:],
                "head" if n.is_head else "stage",
                f"{n.start_layer}-{n.end_layer}",
                n.state,
                n.grpc_address,
                n.device or "?",
                f"{n.kv_free_bytes / 2**30:.1f}/{n.kv_capacity_bytes / 2**30:.1f}",
                str(n.heads),
                f"{n.throughput:g}",
                n.weights_digest or "?",
                n.version,
            )
            for n in group
        ]
        widths = [max(len(r[i]) for r in (_COLUMNS, *rows)) for i in range(len(_COLUMNS))]
        out.append(f"{name} ({group[0].num_layers} layers, config {digest})")
        for row in (_COLUMNS, *rows):
            out.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        gaps = uncovered_layers(
            0, group[0].num_layers - 1, [n for n in group if n.state == "online"]
        )
        complete &= not gaps
        missing = ", ".join(f"{a}-{b}" for a, b in gaps)
        out.append(f"  missing layers: {missing}" if gaps else "  every layer is served")
        out.append("")
    return "\n".join(out), complete


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m molink.entrypoints.cli.status",
        description=__doc__,
    )
    parser.add_argument(
        "--initial-peer",
        "--initial_peer",
        dest="initial_peer",
        action="append",
        required=True,
        help="any node of the swarm: its gRPC HOST:PORT or a DHT multiaddr (repeatable)",
    )
    parser.add_argument("--swarm-key-file", "--swarm_key_file", dest="swarm_key_file")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to reach the swarm")
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    from molink.comm.bootstrap import resolve_initial_peers

    try:
        security = SwarmSecurity.from_files(SecurityFiles(swarm_key_file=args.swarm_key_file))
        maddrs = resolve_initial_peers(tuple(args.initial_peer), args.timeout, security)
        membership = Membership(
            initial_peers=maddrs, host="127.0.0.1", client_mode=True, security=security
        )
    except Exception as e:  # noqa: BLE001  # bad key file, no answer, p2pd bootstrap failure
        logger.error("Can't reach the swarm: %s", e)
        return 2
    try:
        nodes: list[NodeAnnouncement] = []
        for _ in range(3):  # a new DHT client may need a moment to find the entries
            nodes = membership.nodes()
            if nodes:
                break
            time.sleep(1.0)
    finally:
        membership.shutdown()
    if not nodes:
        logger.error("No node announces itself in this swarm")
        return 2
    table, complete = render(nodes)
    sys.stdout.write(table + "\n")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
