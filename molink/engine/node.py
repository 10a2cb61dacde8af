"""One MoLink node: its gRPC service, its DHT membership, and (on a head) the engine arguments.

Start-up order, the same on every node: read the model's identity, open the gRPC service (so
others can resolve ``HOST:PORT`` to DHT addresses), join the DHT (retrying while the initial peer
is not up yet), announce. A head then waits for stages covering every layer and builds vLLM engine
arguments that drive them; a follower waits for a head to call ``InitStage``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import grpc
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.logger import init_logger

import molink
from molink.comm.chain import Chain, wait_for_chain
from molink.comm.dht import Membership, NodeAnnouncement
from molink.comm.links import connect
from molink.comm.proto import molink_pb2
from molink.comm.stage_service import StageService, start_grpc_server
from molink.config import MoLinkConfig, model_identity
from molink.core.scheduler import SCHEDULER_CLS
from molink.engine.head_config import HeadConfig, RemoteStageSpec
from molink.engine.stage_host import StageHost
from molink.worker.stage_worker import WORKER_CLS

logger = init_logger(__name__)


def _ask_dht_maddrs(peer: str) -> tuple[list[str], str]:
    """(DHT multiaddrs, "") from a node's gRPC service, or ([], why not)."""
    channel, stub = connect(peer)
    try:
        info = stub.GetNodeInfo(molink_pb2.Empty(), timeout=5.0)
    except grpc.RpcError as e:
        return [], e.code().name
    finally:
        channel.close()
    if not info.dht_maddrs:
        return [], "its DHT is not up yet"
    return list(info.dht_maddrs), ""


def resolve_initial_peers(peers: tuple[str, ...], timeout: float) -> list[str]:
    """DHT multiaddrs for ``--initial_peer`` values (multiaddrs pass through; HOST:PORT is asked).

    Retries until ``timeout``, so a node may start before the peer it names.
    """
    maddrs: list[str] = []
    for peer in peers:
        if peer.startswith("/"):
            maddrs.append(peer)
            continue
        deadline = time.monotonic() + timeout
        next_log = 0.0
        while True:
            found, error = _ask_dht_maddrs(peer)
            if found:
                maddrs.extend(found)
                break
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"--initial_peer {peer}: no MoLink node answered within {timeout:.0f} s "
                    f"({error})"
                )
            if time.monotonic() > next_log:
                logger.info("Waiting for initial peer %s (%s)...", peer, error)
                next_log = time.monotonic() + 10
            time.sleep(1.0)
    return maddrs


class Node:
    """A running MoLink node (head or follower)."""

    def __init__(self, engine_args: EngineArgs, config: MoLinkConfig) -> None:
        self.engine_args = engine_args
        self.config = config
        self.identity = model_identity(engine_args.model, engine_args.trust_remote_code)
        self.start_layer, self.end_layer = config.layers_for(self.identity.num_layers)
        self.is_head = self.start_layer == 0
        self.host = None if self.is_head else StageHost(engine_args, self.identity.config_hash)
        self.membership: Membership | None = None
        self.grpc_server: grpc.Server | None = None
        self.grpc_port = config.grpc_port

    @property
    def grpc_address(self) -> str:
        return f"{self.config.announce_host}:{self.config.announce_port or self.grpc_port}"

    def start(self, join_timeout: float = 600.0) -> None:
        """Open the gRPC service, join the DHT and announce this node."""
        service = StageService(self.node_info, self.host)
        self.grpc_server, self.grpc_port = start_grpc_server(
            service, self.config.listen_host, self.config.grpc_port
        )
        initial = resolve_initial_peers(self.config.initial_peers, join_timeout)
        self.membership = Membership(
            initial_peers=initial,
            host=self.config.listen_host,
            port=self.config.dht_port,
            announce_host=self.config.announce_host,
        )
        self.membership.announce(self.announcement())
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

    def announcement(self) -> NodeAnnouncement:
        assert self.membership is not None
        kv_bytes = int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "0") or 0) * 2**30)
        return NodeAnnouncement(
            peer_id=self.membership.peer_id,
            model_name=self.identity.name,
            model_hash=self.identity.config_hash,
            num_layers=self.identity.num_layers,
            start_layer=self.start_layer,
            end_layer=self.end_layer,
            grpc_address=self.grpc_address,
            state="online",
            version=molink.__version__,
            kv_capacity_bytes=kv_bytes,
            is_head=self.is_head,
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
            state=self.host.state if self.host else "head",
            version=molink.__version__,
            is_head=self.is_head,
        )

    def wait_for_chain(self) -> Chain:
        """Head: block until nodes cover every layer once (raises ChainError otherwise)."""
        assert self.membership is not None and self.is_head
        if self.end_layer == self.identity.num_layers - 1:
            return Chain(stages=(self.announcement(),))
        logger.info(
            "Waiting up to %.0f s for nodes serving layers %d-%d",
            self.config.chain_timeout,
            self.end_layer + 1,
            self.identity.num_layers - 1,
        )
        return wait_for_chain(self.membership, self.announcement(), self.config.chain_timeout)

    def head_engine_args(self, chain: Chain) -> AsyncEngineArgs:
        """vLLM engine arguments that run this head's chain as a pipeline."""
        from molink.executor.pipeline_executor import PipelineExecutor

        assert self.membership is not None
        head = HeadConfig(
            partition=tuple(chain.partition),
            stages=tuple(
                RemoteStageSpec(
                    address=s.grpc_address,
                    peer_id=s.peer_id,
                    start_layer=s.start_layer,
                    end_layer=s.end_layer,
                )
                for s in chain.stages[1:]
            ),
            model_hash=self.identity.config_hash,
            dht_maddrs=tuple(self.membership.visible_maddrs()),
            head_host=self.config.announce_host or "",
            wire_dtype=self.config.wire_dtype,
            wire_compression=self.config.wire_compression,
            max_micro_batches=self.config.max_micro_batches,
            step_timeout=self.config.step_timeout,
            outage_timeout=self.config.outage_timeout,
        )
        return dataclasses.replace(
            self.engine_args,  # type: ignore[arg-type]
            pipeline_parallel_size=len(chain.stages),
            distributed_executor_backend=PipelineExecutor,
            scheduler_cls=SCHEDULER_CLS,
            worker_cls=WORKER_CLS,
            additional_config={
                **(self.engine_args.additional_config or {}),
                **head.to_additional_config(),
            },
        )

    def shutdown(self) -> None:
        """Leave the swarm and stop serving (idempotent)."""
        if self.host is not None:
            self.host.shutdown()
        if self.membership is not None:
            self.membership.shutdown()
            self.membership = None
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=1.0)
            self.grpc_server = None
