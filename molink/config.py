"""MoLink's own settings (everything else on the command line is vLLM's) and model identity."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
from dataclasses import dataclass

from molink.security.settings import SecurityFiles

DEFAULT_GRPC_PORT = 50051
#: dtypes activations may travel in between stages (``--wire-dtype``), and compressions.
WIRE_DTYPE_NAMES = ("float32", "float16", "bfloat16")
WIRE_COMPRESSIONS = ("none", "zlib")
#: A step unanswered this long counts as a lost stage (``--step-timeout``).
DEFAULT_STEP_TIMEOUT_S = 30.0
#: How long requests wait for a full chain to come back before failing (``--outage-timeout``).
DEFAULT_OUTAGE_TIMEOUT_S = 120.0
#: How long a follower told to stop waits for the head to move off it (``--leave-timeout``).
DEFAULT_LEAVE_TIMEOUT_S = 30.0
# Batches in flight are chosen from measurements up to this bound; each costs a pipeline slot.
DEFAULT_MAX_MICRO_BATCHES = 8


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_serving_layers(text: str) -> tuple[int, int]:
    """``"START,END"`` (both inclusive) -> (start, end)."""
    try:
        start_s, end_s = text.split(",")
        start, end = int(start_s), int(end_s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--serving_layers takes START,END (inclusive), e.g. 0,15; got {text!r}"
        ) from None
    if start < 0 or end < start:
        raise argparse.ArgumentTypeError(f"--serving_layers {text}: need 0 <= START <= END")
    return start, end


def add_molink_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add MoLink's flags to a (vLLM) argument parser.

    Flags are declared with dashes; vLLM's ``FlexibleArgumentParser`` also accepts MoLink's
    historical underscore spelling (``--serving_layers``, ``--initial_peer``).
    """
    # "resolve": MoLink's --grpc-port replaces vLLM's (which is for its Rust frontend only).
    group = parser.add_argument_group(
        "MoLink", "Serve the model split across several nodes", conflict_handler="resolve"
    )
    group.add_argument(
        "--serving-layers",
        type=parse_serving_layers,
        default=None,
        help="Layers this node serves, START,END inclusive. The node serving layer 0 is the "
        "head: it runs the scheduler and the OpenAI API. Default: all layers without "
        "--initial_peer (a single node); with it, the node picks the span the swarm needs most.",
    )
    group.add_argument(
        "--num-layers",
        dest="molink_num_layers",
        type=_positive_int,
        default=None,
        help="Without --serving_layers on a follower: how many layers to take "
        "(default: as many as fit in memory).",
    )
    group.add_argument(
        "--initial-peer",
        action="append",
        default=[],
        help="A node already in the swarm: its gRPC HOST:PORT or a full DHT multiaddr "
        "(/ip4/…/tcp/…/p2p/…). Repeatable. Without it the node starts a new swarm.",
    )
    group.add_argument(
        "--grpc-port",
        dest="molink_grpc_port",
        type=int,
        default=DEFAULT_GRPC_PORT,
        help=f"Port of this node's gRPC service (default {DEFAULT_GRPC_PORT}).",
    )
    group.add_argument(
        "--dht-port", type=int, default=0, help="Port of this node's DHT peer (default: any free)."
    )
    group.add_argument(
        "--announce-host",
        default=None,
        help="Address other nodes use to reach this one (behind NAT, or with several "
        "interfaces). Default: the address of the default route, else 127.0.0.1.",
    )
    group.add_argument(
        "--announce-port",
        type=int,
        default=None,
        help="gRPC port other nodes use to reach this one, when it differs from --grpc_port "
        "(port forwarding, a relay). Default: --grpc_port.",
    )
    group.add_argument(
        "--listen-host",
        default="0.0.0.0",
        help="Interface the gRPC service and DHT listen on (default 0.0.0.0).",
    )
    group.add_argument(
        "--chain-timeout",
        type=float,
        default=600.0,
        help="Head: seconds to wait for nodes covering every layer before giving up.",
    )
    group.add_argument(
        "--step-timeout",
        type=float,
        default=DEFAULT_STEP_TIMEOUT_S,
        help="Head: a step not answered within this many seconds counts as a lost stage "
        f"(default {DEFAULT_STEP_TIMEOUT_S:g}).",
    )
    group.add_argument(
        "--outage-timeout",
        type=float,
        default=DEFAULT_OUTAGE_TIMEOUT_S,
        help="Head: how long requests wait for a full chain after a stage is lost before they "
        f"fail (default {DEFAULT_OUTAGE_TIMEOUT_S:g}).",
    )
    group.add_argument(
        "--leave-timeout",
        type=float,
        default=DEFAULT_LEAVE_TIMEOUT_S,
        help="Follower: on SIGTERM, how long to keep serving while the head moves its requests "
        f"to other nodes (default {DEFAULT_LEAVE_TIMEOUT_S:g}).",
    )
    group.add_argument(
        "--wire-dtype",
        choices=WIRE_DTYPE_NAMES,
        default=None,
        help="dtype of activations between stages (default: the model dtype).",
    )
    group.add_argument(
        "--wire-compression",
        choices=WIRE_COMPRESSIONS,
        default="none",
        help="Lossless compression of activations between stages (default none; zlib saves "
        "little on float activations and costs CPU; only for very slow links).",
    )
    group.add_argument(
        "--max-micro-batches",
        type=_positive_int,
        default=DEFAULT_MAX_MICRO_BATCHES,
        help="Head: most batches in flight at once. The head picks how many to use from "
        "measured stage and link times; 1 turns micro-batching off "
        f"(default {DEFAULT_MAX_MICRO_BATCHES}).",
    )
    group.add_argument(
        "--min-micro-batches",
        type=_positive_int,
        default=1,
        help="Head: fewest batches in flight once decoding requests are measured (at most one "
        "per decoding request). Above 1 it overrides the policy: for tests and experiments "
        "(default 1).",
    )
    group.add_argument(
        "--step-trace",
        default=None,
        metavar="PATH",
        help="Head: append one JSON line per pipeline step to PATH, with where its time went "
        "(schedule, encode, each hop, each stage's queue and compute, update); summarize with "
        "`python -m molink.telemetry.step_trace PATH`.",
    )
    security = parser.add_argument_group(
        "MoLink security", "Who may join the swarm and drive this node (see SECURITY.md)"
    )
    security.add_argument(
        "--swarm-key-file",
        default=os.environ.get("MOLINK_SWARM_KEY_FILE"),
        help="The swarm's shared key (make one with `python -m molink.keygen PATH`; mode 0600). "
        "Every gRPC call then uses mutual TLS and only key holders are admitted to the DHT. "
        "Required to listen beyond loopback, unless --insecure. Env: MOLINK_SWARM_KEY_FILE.",
    )
    security.add_argument(
        "--node-key-file",
        default=None,
        help="This node's own signing key (created if absent). Keeps the node id stable across "
        "restarts; default: a new key at every start.",
    )
    security.add_argument(
        "--allowed-nodes-file",
        default=None,
        help="Only route through, and count, nodes whose id is listed here (one per line; "
        "`python -m molink.keygen --node KEYFILE` shows a node's id).",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="Allow listening beyond loopback without a swarm key (a trusted network only).",
    )
    return parser


@dataclass(frozen=True)
class MoLinkConfig:
    """MoLink's flags, checked against the model."""

    serving_layers: tuple[int, int] | None = None
    layers_to_serve: int | None = None  # --num_layers, for a node choosing its own span
    initial_peers: tuple[str, ...] = ()
    grpc_port: int = DEFAULT_GRPC_PORT
    dht_port: int = 0
    announce_host: str | None = None
    announce_port: int | None = None
    listen_host: str = "0.0.0.0"
    chain_timeout: float = 600.0
    step_timeout: float = DEFAULT_STEP_TIMEOUT_S
    outage_timeout: float = DEFAULT_OUTAGE_TIMEOUT_S
    leave_timeout: float = DEFAULT_LEAVE_TIMEOUT_S
    wire_dtype: str | None = None
    wire_compression: str = "none"
    max_micro_batches: int = DEFAULT_MAX_MICRO_BATCHES
    min_micro_batches: int = 1
    step_trace: str | None = None  # absolute path of the head's step trace, if any
    security_files: SecurityFiles = SecurityFiles()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MoLinkConfig:
        return cls(
            serving_layers=args.serving_layers,
            layers_to_serve=args.molink_num_layers,
            initial_peers=tuple(args.initial_peer or ()),
            grpc_port=args.molink_grpc_port,
            dht_port=args.dht_port,
            announce_host=args.announce_host or default_announce_host(),
            announce_port=args.announce_port,
            listen_host=args.listen_host,
            chain_timeout=args.chain_timeout,
            step_timeout=args.step_timeout,
            outage_timeout=args.outage_timeout,
            leave_timeout=args.leave_timeout,
            wire_dtype=args.wire_dtype,
            wire_compression=args.wire_compression,
            max_micro_batches=args.max_micro_batches,
            min_micro_batches=args.min_micro_batches,
            step_trace=os.path.abspath(args.step_trace) if args.step_trace else None,
            # Absolute: the head's engine process reads them too.
            security_files=SecurityFiles(
                swarm_key_file=_absolute(args.swarm_key_file),
                node_key_file=_absolute(args.node_key_file),
                allowed_nodes_file=_absolute(args.allowed_nodes_file),
                insecure=args.insecure,
            ),
        )

    @property
    def chooses_span(self) -> bool:
        """A follower without ``--serving_layers`` picks its span from what the swarm needs."""
        return self.serving_layers is None and bool(self.initial_peers)

    def layers_for(self, num_layers: int) -> tuple[int, int]:
        """This node's (start, end) for a model of ``num_layers`` layers; raises ValueError.

        Without ``--serving_layers`` (and not :attr:`chooses_span`): every layer.
        """
        start, end = self.serving_layers or (0, num_layers - 1)
        if end >= num_layers:
            raise ValueError(
                f"--serving_layers {start},{end}: the model has {num_layers} layers "
                f"(0..{num_layers - 1})"
            )
        return start, end


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def default_announce_host() -> str:
    """The local address of the default route (no packet is sent), else loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: connect() on UDP only picks a route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


@dataclass(frozen=True)
class ModelIdentity:
    """What nodes compare to be sure they serve the same model."""

    name: str
    config_hash: str
    num_layers: int


def model_identity(model: str, trust_remote_code: bool = False) -> ModelIdentity:
    """Name, config hash and layer count of a model path or name (reads config.json only)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    text_config = config.get_text_config()
    d = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        d.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()
    name = model.rstrip("/").split("/")[-1]
    return ModelIdentity(
        name=name, config_hash=digest[:16], num_layers=int(text_config.num_hidden_layers)
    )
