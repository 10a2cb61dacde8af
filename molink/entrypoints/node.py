"""One MoLink node: its gRPC service, its DHT membership, and (on a head) the engine arguments.

Start-up order, the same on every node: read the model's identity, open the gRPC service (so
others can resolve ``HOST:PORT`` to DHT addresses), join the DHT (retrying while the initial peer
is not up yet), choose its span if it has none (:mod:`molink.core.span_choice`), announce. A head
then waits for stages covering every layer and builds vLLM engine arguments that drive them; a
follower waits for a head to call ``InitStage``. A follower told to stop (SIGTERM) announces that
it is leaving and keeps serving until the head has moved off it (:meth:`Node.leave`).
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from typing import Any

import grpc
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.logger import init_logger

import molink
from molink.comm import tunnels
from molink.comm.announcement import NodeAnnouncement, is_peer_id
from molink.comm.bootstrap import resolve_initial_peers
from molink.comm.chain import Chain, Hop
from molink.comm.membership import Membership
from molink.comm.nat import RelayPresence, check_reachable
from molink.comm.proto import molink_pb2
from molink.comm.stage_service import StageService, start_grpc_server
from molink.config import MoLinkConfig
from molink.core.scheduler import SCHEDULER_CLS
from molink.engine.head_config import HeadConfig, RemoteStageSpec
from molink.engine.model_support import check_servable
from molink.engine.stage_host import StageHost
from molink.entrypoints.span_joining import choose_own_span
from molink.executor.first_chain import wait_for_reachable_chain
from molink.executor.pipeline_executor import PipelineExecutor
from molink.model_identity import model_identity
from molink.security.settings import check_exposure
from molink.security.swarm_security import SwarmSecurity
from molink.telemetry import metrics
from molink.vllm_compat.worker import use_v1_model_runner
from molink.weight_digest import weight_digests
from molink.worker.memory_budget import kv_capacity_estimate, layers_that_fit
from molink.worker.platform_worker import describe_device, stage_enforce_eager
from molink.worker.stage_worker import WORKER_CLS

logger = init_logger(__name__)

# A follower announces its load (heads, sequences, busy share) this often when it changed ...
LOAD_PERIOD_S = 2.0
# ... and re-measures the throughput it announces this often (seconds) ...
THROUGHPUT_PERIOD_S = 10.0
# ... and announces a new value when it moved by more than this fraction.
THROUGHPUT_CHANGE = 0.1


class Node:
    """A running MoLink node (head or follower)."""

    def __init__(self, engine_args: EngineArgs, config: MoLinkConfig) -> None:
        self.engine_args = engine_args
        self.config = config
        check_exposure(config.listen_host, config.security_files)
        self.security = SwarmSecurity.from_files(config.security_files)
        use_v1_model_runner()
        self.identity = model_identity(engine_args.model, engine_args.trust_remote_code)
        check_servable(engine_args, self.identity.name)
        self.weights = weight_digests(engine_args.model, self.identity.num_layers)
        if config.chooses_span:
            # Decided once the swarm is visible (start()); never the head's layer 0.
            self.start_layer, self.end_layer = 1, self.identity.num_layers - 1
        else:
            self.start_layer, self.end_layer = config.layers_for(self.identity.num_layers)
        self.is_head = self.start_layer == 0
        self.host = (
            None
            if self.is_head
            else StageHost(
                engine_args,
                self.identity.config_hash,
                self.layers,
                self.security,
                executor_cls=PipelineExecutor,
                join_wait=config.join_wait,
            )
        )
        self.membership: Membership | None = None
        self.grpc_server: grpc.Server | None = None
        self.grpc_port = config.grpc_port
        self.state = "joining"
        #: Head, before its engine starts: why it has no chain yet (None once it has one).
        self.waiting_for_chain: str | None = "joining the swarm" if self.is_head else None
        self.throughput = 0.0
        self.busy_share = 0.0
        # A head's OpenAI API base URL, announced so that routers find it (set before start()).
        self.api_url = ""
        #: Whether other nodes can dial this one; if not, its relay (see molink.comm.nat).
        self.reachable = True
        self.relay: RelayPresence | None = None
        self._stopped = threading.Event()

    @property
    def layers(self) -> tuple[int, int]:
        return self.start_layer, self.end_layer

    @property
    def grpc_address(self) -> str:
        return f"{self.config.announce_host}:{self.config.announce_port or self.grpc_port}"

    def start(self) -> None:
        """Open the gRPC service, join the DHT and announce this node."""
        logger.info("Security: %s", self.security.describe())
        service = StageService(self.node_info, self.host, self.security)
        self.grpc_server, self.grpc_port = start_grpc_server(
            service, self.config.listen_host, self.config.grpc_port
        )
        initial = resolve_initial_peers(
            self.config.initial_peers, self.config.chain_timeout, self.security
        )
        self.reachable, how = check_reachable(
            self.config.reachable, self.config.initial_peers, self.grpc_address, self.security
        )
        if self.reachable:
            logger.info("Reachable at %s (%s)", self.grpc_address, how)
            assert service.relay is not None
            tunnels.take_invited_tunnels(service.relay, self.grpc_address)
        else:
            service.relay = None  # a node nobody can dial relays for nobody
            logger.info("Nobody can dial %s (%s): joining through a relay", self.grpc_address, how)
        self.membership = Membership(
            initial_peers=initial,
            host=self.config.listen_host,
            port=self.config.dht_port,
            announce_host=self.config.announce_host,
            security=self.security,
            client_mode=not self.reachable,  # others can't dial its DHT peer either
        )
        if not self.reachable:
            self.relay = RelayPresence(
                self.security.node_key,
                self._own_grpc_address(),
                self.security,
                candidates=self._relay_candidates,
                public_address=self._grpc_address_of,
                may_dial=lambda address: address in self._relay_candidates(),
                on_change=lambda relay: self._announce(relay=relay),
            )
        if self.config.chooses_span:
            self._choose_span()
        self.state = "online"
        self.membership.announce(self.announcement())
        if self.host is not None:
            threading.Thread(
                target=self._measure_throughput, name="molink-throughput", daemon=True
            ).start()
        logger.info(
            "MoLink %s serving layers %d-%d of %s (%d layers); gRPC %s; DHT %s",
            "head" if self.is_head else "stage",
            self.start_layer,
            self.end_layer,
            self.identity.name,
            self.identity.num_layers,
            self.grpc_address,
            " ".join(self.membership.visible_maddrs()),
        )

    def _own_grpc_address(self) -> str:
        """This node's gRPC service, as seen from this machine (where tunnels end)."""
        host = self.config.listen_host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.grpc_port}"

    def _relay_candidates(self) -> list[str]:
        """gRPC addresses of nodes that could relay for this one: its initial peers and every
        reachable node online in the swarm."""
        peers = [p for p in self.config.initial_peers if not p.startswith("/")]
        swarm = self.membership.nodes() if self.membership else []
        return peers + [n.grpc_address for n in swarm if n.reachable and n.state == "online"]

    def _grpc_address_of(self, peer_id: str) -> str | None:
        """The gRPC address node ``peer_id`` announces, if it is in the swarm and reachable."""
        nodes = self.membership.nodes() if self.membership else []
        return next((n.grpc_address for n in nodes if n.peer_id == peer_id and n.reachable), None)

    def _choose_span(self) -> None:
        """Take the span the swarm needs most, sized by memory or ``--num_layers``."""
        assert self.membership is not None and self.host is not None
        size = self.config.layers_to_serve or layers_that_fit(
            self.engine_args, self.identity.num_layers
        )

        def announce_joining(span: tuple[int, int]) -> None:
            assert self.membership is not None and self.host is not None
            self.start_layer, self.end_layer = span
            self.host.layers = span
            self.membership.announce(self.announcement())  # state "joining"

        choose_own_span(self.membership, self.identity, size, announce_joining)
        logger.info(
            "Chose layers %d-%d (%d layer(s)%s): where the swarm's coverage is thinnest",
            self.start_layer,
            self.end_layer,
            self.end_layer - self.start_layer + 1,
            "" if self.config.layers_to_serve else ", as many as fit in memory",
        )

    def _measure_throughput(self) -> None:
        """Announce this stage's load every :data:`LOAD_PERIOD_S` when it changed (its heads,
        free KV, sequences and busy share: heads spread by it), and the tokens per second it
        computes (heads route by it) every :data:`THROUGHPUT_PERIOD_S`."""
        assert self.host is not None
        last_tokens, last_busy = 0, 0.0
        window_busy, window_at = 0.0, time.monotonic()
        next_rate = time.monotonic() + THROUGHPUT_PERIOD_S
        while not self._stopped.wait(LOAD_PERIOD_S):
            self.host.expire_claims()
            engine = self.host.engine
            busy_now, now = (engine.busy_seconds if engine else 0.0), time.monotonic()
            if busy_now < window_busy:  # the stage was rebuilt
                window_busy = 0.0
            self.busy_share = min(1.0, (busy_now - window_busy) / max(now - window_at, 1e-9))
            window_busy, window_at = busy_now, now
            current = self.membership.announcement if self.membership else None
            load = self._kv_and_heads()
            if current is not None and any(
                abs(value - getattr(current, key)) > 0.1
                if key == "busy"
                else value != getattr(current, key)
                for key, value in load.items()
            ):
                self._announce(**load)
            if engine is None or now < next_rate:
                continue
            next_rate = now + THROUGHPUT_PERIOD_S
            tokens, busy = engine.tokens_done, engine.busy_seconds
            if tokens < last_tokens:  # the stage was rebuilt
                last_tokens, last_busy = 0, 0.0
            if tokens - last_tokens < 64 or busy <= last_busy:
                continue  # too little work to measure
            rate = (tokens - last_tokens) / (busy - last_busy)
            last_tokens, last_busy = tokens, busy
            old = self.throughput
            if old and abs(rate - old) <= THROUGHPUT_CHANGE * old:
                continue
            self.throughput = rate
            metrics.STAGE_THROUGHPUT.set(rate)
            self._announce(throughput=round(rate, 1))

    def _announce(self, **changes: Any) -> None:
        """Update fields of this online node's announcement (retried by the next change)."""
        membership = self.membership
        if membership is not None and self.state == "online":
            try:
                membership.update(**changes)
            except Exception as e:  # noqa: BLE001  # try again next period
                logger.debug("could not announce %s: %s", ", ".join(changes), e)

    def _kv_and_heads(self) -> dict[str, Any]:
        """The announcement's load fields: KV capacity, free KV, heads served (their peer ids, and
        those running sequences here), the sequences they run here and the busy share of this
        node's compute lately."""
        capacity = self.kv_capacity_bytes()
        host = self.host
        busy = round(self.busy_share, 2)
        if host is None or not host.kv_capacity_bytes:
            return {
                "kv_capacity_bytes": capacity,
                "kv_free_bytes": capacity,
                "heads": 0,
                "head_ids": (),
                "running_head_ids": (),
                "sequences": 0,
                "busy": busy,
            }
        heads = host.heads()
        return {
            "kv_capacity_bytes": capacity,
            "kv_free_bytes": host.kv_free_bytes,
            "heads": len(heads),
            "head_ids": tuple(sorted(h["head"] for h in heads if is_peer_id(h["head"]))),
            "running_head_ids": tuple(
                sorted(h["head"] for h in heads if h["requests"] and is_peer_id(h["head"]))
            ),
            "sequences": sum(h["requests"] for h in heads),
            "busy": busy,
        }

    def kv_capacity_bytes(self) -> int:
        """KV cache bytes for this node's layers: as the worker measured it once built, else
        estimated from the node's memory and its vLLM flags (see memory_budget)."""
        if self.host is not None and self.host.kv_capacity_bytes:
            return self.host.kv_capacity_bytes
        span = self.end_layer - self.start_layer + 1
        return kv_capacity_estimate(self.engine_args, span, self.identity.num_layers)

    def announcement(self) -> NodeAnnouncement:
        assert self.membership is not None
        return NodeAnnouncement(
            peer_id=self.membership.peer_id,
            model_name=self.identity.name,
            model_hash=self.identity.config_hash,
            num_layers=self.identity.num_layers,
            start_layer=self.start_layer,
            end_layer=self.end_layer,
            grpc_address=self.grpc_address,
            state=self.state,
            version=molink.__version__,
            **self._kv_and_heads(),
            is_head=self.is_head,
            throughput=round(self.throughput, 1),
            node_key=self.security.node_key.public_key,
            weights_digest=self.weights.span(*self.layers, self.identity.num_layers)
            if self.weights
            else "",
            device=describe_device(),
            api_url=self.api_url,
            reachable=self.reachable,
            relay=self.relay.relay if self.relay else "",
        )

    def node_info(self) -> molink_pb2.NodeInfo:
        membership = self.membership
        return molink_pb2.NodeInfo(
            peer_id=membership.peer_id if membership else "",
            dht_maddrs=membership.visible_maddrs() if membership else [],
            model_name=self.identity.name,
            model_hash=self.identity.config_hash,
            start_layer=self.start_layer,
            end_layer=self.end_layer,
            num_layers=self.identity.num_layers,
            state="leaving"
            if self.state == "leaving"
            else self.host.state
            if self.host
            else "head",
            version=molink.__version__,
            is_head=self.is_head,
        )

    def wait_for_chain(self) -> Chain:
        """Head: block until reachable nodes cover every layer once (raises ChainError after
        ``--chain_timeout``; see :mod:`molink.executor.first_chain`); meanwhile
        :attr:`waiting_for_chain` says what the head waits for."""
        assert self.membership is not None and self.is_head
        if self.end_layer < self.identity.num_layers - 1:
            logger.info(
                "Waiting up to %.0f s for nodes serving layers %d-%d",
                self.config.chain_timeout,
                self.end_layer + 1,
                self.identity.num_layers - 1,
            )
            chain = wait_for_reachable_chain(
                self.membership,
                self.announcement(),
                self.config.chain_timeout,
                self.security,
                self.weights,
                on_wait=lambda cause: setattr(self, "waiting_for_chain", cause),
            )
        else:
            chain = Chain(stages=(Hop(self.announcement(), 0, self.end_layer),))
        self.waiting_for_chain = None
        return chain

    def head_engine_args(self, chain: Chain) -> AsyncEngineArgs:
        """vLLM engine arguments that run this head's chain as a pipeline."""
        assert self.membership is not None
        head = HeadConfig(
            head=self.announcement().to_dict(),
            stages=tuple(RemoteStageSpec.from_hop(hop) for hop in chain.stages[1:]),
            dht_maddrs=tuple(self.membership.visible_maddrs()),
            wire_dtype=self.config.wire_dtype,
            wire_compression=self.config.wire_compression,
            max_micro_batches=self.config.max_micro_batches,
            min_micro_batches=self.config.min_micro_batches,
            step_trace=self.config.step_trace,
            step_timeout=self.config.step_timeout,
            outage_timeout=self.config.outage_timeout,
            chain_timeout=self.config.chain_timeout,
            rebalance_after=self.config.rebalance_after,
            recovery=self.config.recovery,
            replay_log_mb=self.config.replay_log_mb,
            hot_standby=self.config.hot_standby,
            security=self.config.security_files,
            weights=self.weights.to_dict() if self.weights else None,
        )
        return dataclasses.replace(
            self.engine_args,  # type: ignore[arg-type]
            # vLLM sees two pipeline stages: this head's layers and the rest of the chain,
            # however many hops that takes now or after a loss (see PipelineExecutor).
            pipeline_parallel_size=len(head.placement.partition),
            distributed_executor_backend=PipelineExecutor,
            enforce_eager=stage_enforce_eager(self.engine_args.enforce_eager),
            scheduler_cls=SCHEDULER_CLS,
            worker_cls=WORKER_CLS,
            additional_config={
                **(self.engine_args.additional_config or {}),
                **head.to_additional_config(),
            },
        )

    def leave(self) -> None:
        """Follower: announce that this node is leaving and wait until the head moved off it.

        The head then rebuilds its chain without this node and recomputes the requests it held
        elsewhere; this node keeps serving meanwhile, for at most ``--leave-timeout`` seconds.
        """
        if self.host is None or self.membership is None:
            return
        self.state = "leaving"
        try:
            self.membership.update(state="leaving")
        except Exception as e:  # noqa: BLE001  # the DHT may be gone; the head still hears below
            logger.warning("could not announce leaving: %s", e)
        if not self.host.announce_leaving():
            return
        logger.info(
            "Leaving: waiting up to %.0f s for the head to move its requests to other nodes",
            self.config.leave_timeout,
        )
        started = time.monotonic()
        if self.host.wait_released(self.config.leave_timeout):
            logger.info("The head moved off this node after %.1f s", time.monotonic() - started)
        else:
            logger.warning("The head still uses this node after %.0f s", self.config.leave_timeout)

    def shutdown(self) -> None:
        """Leave the swarm and stop serving (idempotent); the process ends after this.

        The heap (vLLM, torch) is frozen first: the garbage collections still to come (the
        interpreter's at exit) then skip it, which saves seconds of CPU on every stop.
        """
        self._stopped.set()
        gc.freeze()
        if self.host is not None:
            self.host.shutdown()
        if self.membership is not None:
            self.membership.shutdown()
            self.membership = None
        if self.relay is not None:
            self.relay.close()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=1.0)
            self.grpc_server = None
