"""The gRPC service every MoLink node runs.

* ``GetNodeInfo``: who this node is (model, layers, DHT addresses), and with a nonce, proof that
  it holds the node key of its announcement. A new node given ``--initial_peer HOST:PORT`` asks
  this to learn the swarm's DHT multiaddrs.
* ``InitStage`` / ``StartStage`` / ``Steps`` / ``Results``: heads driving this node's stage, each
  in its own session (followers only; a head answers them with FAILED_PRECONDITION).
* ``Listen`` / ``Tunnel`` / ``Invite``: connections to nodes behind NAT, relayed or invited
  (:mod:`molink.comm.relay_hub`; refused by a node that is behind NAT itself).
* ``DialBack``: tells a joining node whether it can be dialed at the address it would announce.
Requests are validated here; payloads from peers only ever go through ``molink.comm.codec``.
The stage itself is whatever :class:`StageBackend` the node hands in (its
:class:`~molink.engine.stage_host.StageHost`); this layer never imports the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, Protocol

import grpc
from vllm.logger import init_logger

from molink.comm import codec
from molink.comm.announcement import split_host_port
from molink.comm.grpc_options import SERVER_OPTIONS
from molink.comm.links import ResultStream, connect
from molink.comm.proto import molink_pb2, molink_pb2_grpc
from molink.comm.relay_hub import RelayHub
from molink.core.hot_standby import Hot
from molink.security.swarm_security import SwarmSecurity
from molink.stage_spec import StageConfig
from molink.telemetry import metrics

logger = init_logger(__name__)

#: Longest identity-proof nonce a node signs.
MAX_NONCE_BYTES = 64
#: Seconds a dial-back waits for the asker to answer at its address.
DIAL_BACK_TIMEOUT_S = 3.0
#: Sessions a step stream's break is reported for (a stream carries one head's steps).
MAX_STREAM_SESSIONS = 16


class StageNotReady(RuntimeError):
    """A call arrived in the wrong order (e.g. steps before ``StartStage``)."""


class StageBackend(Protocol):
    """What the service calls on a follower's stage (raising :class:`StageNotReady` for calls
    out of order and ``ValueError`` for requests it refuses)."""

    def init_stage(
        self, config: StageConfig, session_id: str, label: str = ""
    ) -> tuple[bytes, int]: ...

    def start_stage(
        self,
        session_id: str,
        kv_cache_config: Any,
        next_address: str,
        epoch: int,
        standby: bool = False,
        hot: Hot | None = None,
    ) -> list[int]: ...

    def submit(self, msg: molink_pb2.Step) -> None: ...

    def steps_broken(self, session_ids: set[str]) -> None: ...

    def result_stream(self, session_id: str, epoch: int) -> ResultStream: ...

    def release(self, session_id: str, results: ResultStream) -> None: ...


class StageService(molink_pb2_grpc.MoLinkNodeServicer):
    """gRPC front of a node: node info for everyone, stage control for the head."""

    def __init__(
        self,
        node_info: Callable[[], molink_pb2.NodeInfo],
        host: StageBackend | None,
        security: SwarmSecurity,
    ) -> None:
        self._node_info = node_info
        self._host = host
        self.security = security
        #: Relays calls to NATed nodes; None on a node that is behind NAT itself.
        self.relay: RelayHub | None = RelayHub(security.node_key.node_id)

    def GetNodeInfo(self, request, context) -> molink_pb2.NodeInfo:  # noqa: N802
        info = self._node_info()
        info.node_key = self.security.node_key.public_key
        if request.nonce:
            if len(request.nonce) > MAX_NONCE_BYTES:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "nonce too long")
            info.proof = self.security.node_key.prove(request.nonce)
        return info

    def _require_host(self, context) -> StageBackend:
        if self._host is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this node is a head, not a stage")
        return self._host  # type: ignore[return-value]

    def InitStage(self, request, context) -> molink_pb2.InitStageReply:  # noqa: N802
        host = self._require_host(context)
        try:
            config = StageConfig.from_json(request.stage_config_json)
        except (ValueError, KeyError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad stage config: {e}")
        try:
            spec, available = host.init_stage(config, request.session, request.head_peer_id)
        except ValueError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except Exception as e:
            logger.exception("InitStage failed")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        return molink_pb2.InitStageReply(kv_cache_spec=spec, available_kv_bytes=available)

    def StartStage(self, request, context) -> molink_pb2.StartStageReply:  # noqa: N802
        host = self._require_host(context)
        held: list[int] = []
        try:
            kv_cache_config = codec.loads(request.kv_cache_config)
            hot = Hot(
                standby=request.hot and request.standby,
                mirror_address=request.mirror_address if request.hot else "",
                drain=(request.drain_epoch, request.drain_step),
                forget=request.forget_held,
            )
            held = host.start_stage(
                request.session,
                kv_cache_config,
                request.next_address,
                request.epoch,
                standby=request.standby,
                hot=hot,
            )
        except (StageNotReady, ValueError) as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except Exception as e:
            logger.exception("StartStage failed")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        return molink_pb2.StartStageReply(kv_held=held)

    def Steps(self, request_iterator, context) -> molink_pb2.Empty:  # noqa: N802
        host = self._require_host(context)
        sessions: set[str] = set()  # whose steps this stream carried
        try:
            received = metrics.BYTES_RECEIVED.labels("steps")
            for step in request_iterator:
                received.inc(step.ByteSize())
                if len(sessions) < MAX_STREAM_SESSIONS:
                    sessions.add(step.session)
                host.submit(step)
        except StageNotReady as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except grpc.RpcError:
            logger.info("previous stage closed its step stream")
            host.steps_broken(sessions)
        except Exception as e:
            logger.exception("bad step from the previous stage")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")
        return molink_pb2.Empty()

    def Results(self, request, context) -> Iterator[molink_pb2.StepResult]:  # noqa: N802
        host = self._require_host(context)
        try:
            stream = host.result_stream(request.session, request.epoch)
        except StageNotReady as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

        def head_gone() -> None:
            stream.close()
            host.release(request.session, stream)

        context.add_callback(head_gone)
        yield from stream

    def _require_relay(self, context) -> RelayHub:
        if self.relay is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this node can't relay: it is behind NAT"
            )
        return self.relay  # type: ignore[return-value]

    def Listen(self, request, context) -> Iterator[molink_pb2.DialOrder]:  # noqa: N802
        yield from self._require_relay(context).listen(request, context)

    def Tunnel(self, request_iterator, context) -> Iterator[molink_pb2.TunnelChunk]:  # noqa: N802
        yield from self._require_relay(context).tunnel(request_iterator, context)

    def Invite(self, request, context) -> molink_pb2.Empty:  # noqa: N802
        return self._require_relay(context).invite(request, context)

    def DialBack(self, request, context) -> molink_pb2.DialBackReply:  # noqa: N802
        try:
            split_host_port(request.address)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if len(request.nonce) > MAX_NONCE_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "nonce too long")
        channel, stub = connect(request.address, self.security)
        try:
            info = stub.GetNodeInfo(
                molink_pb2.NodeInfoRequest(nonce=request.nonce), timeout=DIAL_BACK_TIMEOUT_S
            )
        except grpc.RpcError as e:
            return molink_pb2.DialBackReply(error=f"{e.code().name}: {e.details()}")
        finally:
            channel.close()
        return molink_pb2.DialBackReply(proof=info.proof)


def start_grpc_server(
    service: StageService, host: str, port: int, max_workers: int = 256
) -> tuple[grpc.Server, int]:
    """Serve ``service`` on ``host:port`` (port 0 picks a free one); returns (server, port).

    Every streaming call (steps, results, a NATed node's relay call, each side of a tunnel)
    holds one of the ``max_workers`` threads while it lasts.

    With a swarm key (``service.security``) every call needs a client certificate derived from
    it (mutual TLS).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_OPTIONS
    )
    molink_pb2_grpc.add_MoLinkNodeServicer_to_server(service, server)
    bound = service.security.add_port(server, f"{host}:{port}")
    if bound == 0:
        raise OSError(f"can't listen for gRPC on {host}:{port}")
    server.start()
    return server, bound
