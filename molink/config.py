"""MoLink's own settings (everything else on the command line is vLLM's).

Each MoLink flag is declared once, as a field of :class:`MoLinkConfig` made by :func:`flag`:
the field's default is the flag's default, and the :class:`Flag` in the field's metadata says
how argparse reads it (name, help, type, ...). :func:`add_molink_args` builds the parser from
these declarations and :meth:`MoLinkConfig.from_args` reads the parsed flags back through them.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from molink.flag_values import (
    absolute_path,
    as_tuple,
    mebibytes,
    parse_serving_layers,
    port,
    port_or_any,
    positive_int,
    seconds,
    seconds_or_zero,
    share,
)
from molink.security.settings import SecurityFiles

#: dtypes activations may travel in between stages (``--wire-dtype``), and compressions.
WIRE_DTYPE_NAMES = ("float32", "float16", "bfloat16")
WIRE_COMPRESSIONS = ("none", "zlib")

#: The ``--help`` sections of MoLink's flags: title -> (description, argparse conflict handler;
#: None: the parser's).
GROUPS: dict[str, tuple[str, str | None]] = {
    # "resolve": MoLink's --grpc-port replaces vLLM's (which is for its Rust frontend only).
    "MoLink": ("Serve the model split across several nodes", "resolve"),
    "MoLink security": ("Who may join the swarm and drive this node (see SECURITY.md)", None),
}

_FLAG = "molink.flag"  # field metadata key: the Flag a field is read from
_FLAGS = "molink.flags"  # field metadata key: {field of the nested dataclass: Flag}


@dataclass(frozen=True)
class Flag:
    """How argparse reads one MoLink flag. Its default is the default of the field it fills.

    ``help`` may show the default as ``%(default)s`` (argparse fills it in; a help without it
    gets ``(default: ...)`` appended by vLLM's help formatter).
    """

    name: str  # with dashes; vLLM's FlexibleArgumentParser also takes the underscore spelling
    help: str
    dest: str = ""  # the Namespace attribute; default: argparse's own, from the name
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    action: str | None = None  # e.g. "append", "store_true"
    metavar: str | None = None
    env: str | None = None  # an environment variable that, when set, replaces the default
    convert: Callable[[Any], Any] | None = None  # parsed value -> field value
    group: str = "MoLink"  # a key of GROUPS

    def __post_init__(self) -> None:
        if not self.dest:
            object.__setattr__(self, "dest", self.name.removeprefix("--").replace("-", "_"))

    def parser_default(self, default: Any) -> Any:
        """What argparse holds for this flag when the command line lacks it."""
        if self.env:
            default = os.environ.get(self.env, default)
        return list(default) if self.action == "append" else default

    def add_to(self, group: Any, default: Any) -> None:
        """Add this flag to an argparse group; ``default`` is its field's."""
        options = {
            key: getattr(self, key)
            for key in ("type", "choices", "action", "metavar")
            if getattr(self, key) is not None
        }
        group.add_argument(
            self.name,
            dest=self.dest,
            default=self.parser_default(default),
            help=self.help,
            **options,
        )

    def read(self, args: argparse.Namespace) -> Any:
        """This flag's field value from parsed arguments."""
        value = getattr(args, self.dest)
        return self.convert(value) if self.convert else value


def flag(default: Any, name: str, *, help: str, **options: Any) -> Any:
    """A :class:`MoLinkConfig` field read from flag ``name``; ``default`` is both theirs."""
    return field(default=default, metadata={_FLAG: Flag(name, help, **options)})


def flag_group(default: Any, **flags: Flag) -> Any:
    """A field holding a frozen dataclass, ``default``, each of whose fields is read from a flag
    (``flags``, by field name) whose default is that field's in ``default``."""
    return field(default=default, metadata={_FLAGS: flags})


@dataclass(frozen=True)
class DeclaredFlag:
    """A flag and the :class:`MoLinkConfig` field it fills."""

    path: tuple[str, ...]  # ("grpc_port",), or ("security_files", "insecure") for a nested field
    flag: Flag
    default: Any  # the field's default, hence the flag's


def declared_flags() -> list[DeclaredFlag]:
    """Every MoLink flag, in declaration order (the order of ``--help`` without sorting)."""
    found = []
    for f in fields(MoLinkConfig):
        if _FLAG in f.metadata:
            found.append(DeclaredFlag((f.name,), f.metadata[_FLAG], f.default))
        for name, nested in f.metadata.get(_FLAGS, {}).items():
            found.append(DeclaredFlag((f.name, name), nested, getattr(f.default, name)))
    return found


def add_molink_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add MoLink's flags to a (vLLM) argument parser, in the sections of :data:`GROUPS`.

    Flags are declared with dashes; vLLM's ``FlexibleArgumentParser`` also accepts MoLink's
    historical underscore spelling (``--serving_layers``, ``--initial_peer``).
    """
    groups = {}
    for title, (description, handler) in GROUPS.items():
        options = {"conflict_handler": handler} if handler else {}
        groups[title] = parser.add_argument_group(title, description, **options)
    for declared in declared_flags():
        declared.flag.add_to(groups[declared.flag.group], declared.default)
    return parser


def default_announce_host() -> str:
    """The local address of the default route (no packet is sent), else loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: connect() on UDP only picks a route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _announce_host(host: str | None) -> str:
    return host or default_announce_host()


@dataclass(frozen=True)
class MoLinkConfig:
    """MoLink's flags, checked against the model: each field is declared with its flag."""

    serving_layers: tuple[int, int] | None = flag(
        None,
        "--serving-layers",
        type=parse_serving_layers,
        help="Layers this node serves, START,END inclusive. The node serving layer 0 is the "
        "head: it runs the scheduler and the OpenAI API. Default: all layers without "
        "--initial_peer (a single node); with it, the node picks the span the swarm needs most.",
    )
    # --num-layers, for a node choosing its own span.
    layers_to_serve: int | None = flag(
        None,
        "--num-layers",
        dest="molink_num_layers",
        type=positive_int,
        help="Without --serving_layers on a follower: how many layers to take "
        "(default: as many as fit in memory).",
    )
    initial_peers: tuple[str, ...] = flag(
        (),
        "--initial-peer",
        action="append",
        convert=as_tuple,
        help="A node already in the swarm: its gRPC HOST:PORT or a full DHT multiaddr "
        "(/ip4/…/tcp/…/p2p/…). Repeatable. Without it the node starts a new swarm.",
    )
    grpc_port: int = flag(
        50051,
        "--grpc-port",
        dest="molink_grpc_port",  # vLLM's args.grpc_port is for its Rust frontend
        type=port,
        help="Port of this node's gRPC service (default %(default)s).",
    )
    dht_port: int = flag(
        0,
        "--dht-port",
        type=port_or_any,
        help="Port of this node's DHT peer (default %(default)s: any free).",
    )
    # From the command line, never None: from_args falls back to default_announce_host().
    announce_host: str | None = flag(
        None,
        "--announce-host",
        convert=_announce_host,
        help="Address other nodes use to reach this one (behind NAT, or with several "
        "interfaces). Default: the address of the default route, else 127.0.0.1.",
    )
    announce_port: int | None = flag(
        None,
        "--announce-port",
        type=port,
        help="gRPC port other nodes use to reach this one, when it differs from --grpc_port "
        "(port forwarding, a relay). Default: --grpc_port.",
    )
    reachable: str = flag(
        "auto",
        "--reachable",
        choices=("auto", "yes", "no"),
        help="Whether other nodes can dial this one. auto: its --initial-peer dials it back at "
        "the address it announces; a node that can't be dialed (behind NAT or a firewall) takes "
        "its calls through a relay, a reachable node it dials out to, and needs no open port. "
        "yes: don't check; no: always use a relay (default %(default)s).",
    )
    listen_host: str = flag(
        "0.0.0.0",
        "--listen-host",
        help="Interface the gRPC service and DHT listen on (default %(default)s).",
    )
    chain_timeout: float = flag(
        600.0,
        "--chain-timeout",
        type=seconds,
        help="Head: seconds to wait for nodes covering every layer before giving up "
        "(default %(default)g).",
    )
    step_timeout: float = flag(
        30.0,
        "--step-timeout",
        type=seconds,
        help="Head: a step not answered within this many seconds counts as a lost stage "
        "(default %(default)g).",
    )
    outage_timeout: float = flag(
        120.0,
        "--outage-timeout",
        type=seconds,
        help="Head: how long requests wait for a full chain after a stage is lost before they "
        "fail (default %(default)g).",
    )
    rebalance_after: float = flag(
        30.0,
        "--rebalance-after",
        type=seconds_or_zero,
        help="Head: once its chain has served this many seconds, move to less loaded replicas "
        "of the same spans when that makes the chain at least 25%% cheaper for 10 s; 0: never "
        "(default %(default)g).",
    )
    recovery: str = flag(
        "replay",
        "--recovery",
        choices=("replay", "recompute"),
        help="Head: how requests go on after a stage is lost. replay: only the node that takes "
        "the lost span is filled, from the activations the stage before it logged, and every "
        "other stage keeps its KV cache (it falls back to recompute where it can't replay, and "
        "says why); recompute: every request recomputes its prompt and output through every "
        "stage (default %(default)s).",
    )
    replay_log_mb: float = flag(
        1024.0,
        "--replay-log-mb",
        type=mebibytes,
        help="Head: MiB of host memory each stage of its chain may keep for the replay log, the "
        "activations it sent to the next stage for every token of every running request (a "
        "token costs 2 x hidden size x dtype bytes: 3.5 KiB for a 0.5B model in float16, 14 KiB "
        "for a 7B one, so the default holds about 75,000 tokens of a 7B model; half that for a "
        "float32 Llama-like model or a narrower --wire-dtype). Past it, the "
        "largest requests' logs are dropped and those requests recompute after a loss "
        "(default %(default)g).",
    )
    hot_standby: bool = flag(
        False,
        "--hot-standby",
        action="store_true",
        help="Head (with --recovery replay): a standby that holds exactly the span of a stage of "
        "the chain also computes every step beside it, mirrored by the stage before, and keeps "
        "its KV cache: when the serving node is lost, the standby takes over with nothing (or "
        "little) to replay. It costs the standby's compute and the mirrored activations' "
        "bandwidth.",
    )
    leave_timeout: float = flag(
        30.0,
        "--leave-timeout",
        type=seconds_or_zero,
        help="Follower: on SIGTERM, how long to keep serving while the head moves its requests "
        "to other nodes (default %(default)g).",
    )
    join_wait: float = flag(
        0.0,
        "--join-wait",
        type=share,
        help="Follower serving several heads: how long it may wait for the next steps of the "
        "other heads that use it before a forward pass, so that they share the pass, as a "
        "share of its last pass's compute time (0-1). It waits only for heads whose steps "
        "shared its last passes, and backs off from heads that come late. Steps that already "
        "wait together share a pass whatever this is. 0: never wait; on CPU followers waiting "
        "cost throughput (see docs/benchmarks.md) (default %(default)g).",
    )
    wire_dtype: str | None = flag(
        None,
        "--wire-dtype",
        choices=WIRE_DTYPE_NAMES,
        help="dtype of activations between stages (default: the model dtype).",
    )
    wire_compression: str = flag(
        "none",
        "--wire-compression",
        choices=WIRE_COMPRESSIONS,
        help="Lossless compression of activations between stages (default %(default)s; zlib "
        "saves little on float activations and costs CPU; only for very slow links).",
    )
    # Batches in flight are chosen from measurements up to this bound; each costs a pipeline slot.
    max_micro_batches: int = flag(
        8,
        "--max-micro-batches",
        type=positive_int,
        help="Head: most batches in flight at once. The head picks how many to use from "
        "measured stage and link times; 1 turns micro-batching off (default %(default)s).",
    )
    min_micro_batches: int = flag(
        1,
        "--min-micro-batches",
        type=positive_int,
        help="Head: fewest batches in flight once decoding requests are measured (at most one "
        "per decoding request). Above 1 it overrides the policy: for tests and experiments "
        "(default %(default)s).",
    )
    # Absolute: the head's engine process writes it too.
    step_trace: str | None = flag(
        None,
        "--step-trace",
        metavar="PATH",
        convert=absolute_path,
        help="Head: append one JSON line per pipeline step to PATH, with where its time went "
        "(schedule, encode, each hop, each stage's queue and compute, update); summarize with "
        "`python -m molink.telemetry.step_trace PATH`.",
    )
    # Key file paths, absolute: the head's engine process reads them too. Defaults: SecurityFiles'.
    security_files: SecurityFiles = flag_group(
        SecurityFiles(),
        swarm_key_file=Flag(
            "--swarm-key-file",
            env="MOLINK_SWARM_KEY_FILE",
            convert=absolute_path,
            group="MoLink security",
            help="The swarm's shared key (make one with `molink keygen PATH`; mode 0600). Every "
            "gRPC call then uses mutual TLS and only key holders are admitted to the DHT. "
            "Required to listen beyond loopback, unless --insecure. Env: MOLINK_SWARM_KEY_FILE.",
        ),
        node_key_file=Flag(
            "--node-key-file",
            convert=absolute_path,
            group="MoLink security",
            help="This node's own signing key (created if absent). Keeps the node id stable "
            "across restarts; default: a new key at every start.",
        ),
        allowed_nodes_file=Flag(
            "--allowed-nodes-file",
            convert=absolute_path,
            group="MoLink security",
            help="Only route through, and count, nodes whose id is listed here (one per line; "
            "`molink keygen --node KEYFILE` shows a node's id).",
        ),
        insecure=Flag(
            "--insecure",
            action="store_true",
            group="MoLink security",
            help="Allow listening beyond loopback without a swarm key (a trusted network only).",
        ),
    )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MoLinkConfig:
        """The config from arguments parsed by a parser :func:`add_molink_args` extended."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if _FLAG in f.metadata:
                values[f.name] = f.metadata[_FLAG].read(args)
            elif _FLAGS in f.metadata:
                nested = {name: fl.read(args) for name, fl in f.metadata[_FLAGS].items()}
                values[f.name] = replace(f.default, **nested)
        return cls(**values)

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
