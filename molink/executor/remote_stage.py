"""The head's handle on one remote stage: a node serving a span of layers for this head."""

from __future__ import annotations

import secrets
from typing import Any

import grpc
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec

from molink.comm import codec, tunnels
from molink.comm.links import connect
from molink.comm.proto import molink_pb2
from molink.core.hot_standby import Hot
from molink.engine.head_config import RemoteStageSpec
from molink.security.node_key import verify_proof
from molink.security.swarm_security import SwarmSecurity
from molink.stage_spec import StageConfig

#: Seconds a liveness probe (``GetNodeInfo``) may take.
PROBE_TIMEOUT_S = 3.0


class StageImpostor(RuntimeError):
    """The process at a stage's address is not the node that announced it."""


class StageUnreachable(ConnectionError):
    """Nothing answers at a stage's announced address (down, firewalled, or behind NAT)."""


class RemoteStage:
    """gRPC handle on a node serving ``spec``'s layers, and what the head planned for it."""

    def __init__(self, spec: RemoteStageSpec, security: SwarmSecurity, session: str) -> None:
        """``session``: the head's secret session id (the node keeps one session per head)."""
        self.spec = spec
        self.session = session
        self.kv_cache_spec: dict[str, KVCacheSpec] | None = None
        self.available_kv_bytes = 0
        self.kv_cache_config: KVCacheConfig | None = None
        self.results_call: Any = None
        self.hot = False  # started as this head's hot standby (molink.core.hot_standby)
        self._channel, self.stub = connect(spec.address, security)

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def peer_id(self) -> str:
        return self.spec.peer_id

    @property
    def span(self) -> tuple[int, int]:
        return self.spec.start_layer, self.spec.end_layer

    def __str__(self) -> str:
        return f"{self.address} [{self.spec.start_layer}-{self.spec.end_layer}]"

    def init(self, config: StageConfig, timeout: float, head_peer_id: str = "") -> None:
        """Have the node build this span's worker (loads weights unless already built).

        Raises ``StageUnreachable`` if nothing answers at the address, ``StageImpostor`` if the
        process there can't prove it is the node that announced it.
        """
        info, why = self._identify()
        if why is not None:
            raise StageImpostor(why) if info is not None else StageUnreachable(why)
        reply = self.stub.InitStage(
            molink_pb2.InitStageRequest(
                stage_config_json=config.to_json(), session=self.session, head_peer_id=head_peer_id
            ),
            timeout=timeout,
        )
        self.kv_cache_spec = codec.loads(reply.kv_cache_spec)
        self.available_kv_bytes = reply.available_kv_bytes

    def start(
        self,
        epoch: int,
        next_address: str,
        timeout: float,
        standby: bool = False,
        hot: Hot | None = None,
    ) -> list[int]:
        """Claim the planned KV blocks; unless ``standby``, reset and wire it for ``epoch``.

        ``hot``: see :class:`~molink.core.hot_standby.Hot`. Returns, from a node that was this
        head's hot standby, the leading positions its KV cache holds per block of the plan.
        """
        assert self.kv_cache_config is not None
        hot = hot or Hot()
        reply = self.stub.StartStage(
            molink_pb2.StartStageRequest(
                kv_cache_config=codec.dumps(self.kv_cache_config),
                next_address=next_address,
                epoch=epoch,
                standby=standby,
                session=self.session,
                hot=hot.standby or bool(hot.mirror_address),
                mirror_address=hot.mirror_address,
                drain_epoch=hot.drain[0],
                drain_step=hot.drain[1],
                forget_held=hot.forget,
            ),
            timeout=timeout,
        )
        self.hot = hot.standby
        return list(reply.kv_held)

    def subscribe(self, epoch: int) -> Any:
        """Open the stream of this stage's results and errors for ``epoch``."""
        if self.results_call is not None:
            self.results_call.cancel()
        self.results_call = self.stub.Results(
            molink_pb2.ResultsRequest(epoch=epoch, session=self.session)
        )
        return self.results_call

    def probe(self) -> str | None:
        """None if the node answers as itself and isn't leaving; else why it can't serve."""
        info, why = self._identify()
        if why is None and info is not None and info.state == "leaving":
            return f"{self.address} is leaving"
        return why

    def _identify(self) -> tuple[molink_pb2.NodeInfo | None, str | None]:
        """The node's info and, if it isn't the announced node, why (info None: unreachable).

        "The announced node": same peer id, and a fresh nonce signed with the key it announced.
        """
        nonce = secrets.token_bytes(16)
        try:
            info = self.stub.GetNodeInfo(
                molink_pb2.NodeInfoRequest(nonce=nonce), timeout=PROBE_TIMEOUT_S
            )
        except grpc.RpcError as e:
            cause = tunnels.last_error(self.address) if tunnels.is_route(self.address) else ""
            return (
                None,
                f"{self.address} is unreachable ({e.code().name}{': ' if cause else ''}{cause})",
            )
        if info.peer_id != self.peer_id:
            return info, f"{self.address} is now another node ({info.peer_id})"
        if self.spec.node_key and not (
            info.node_key == self.spec.node_key
            and verify_proof(self.spec.node_key, nonce, info.proof)
        ):
            return info, f"{self.address} can't prove it holds the key {self.peer_id} announced"
        return info, None

    def release(self) -> None:
        """Stop listening to this stage (it learns that this head no longer uses it)."""
        if self.results_call is not None:
            self.results_call.cancel()
            self.results_call = None

    def close(self) -> None:
        self.release()
        self._channel.close()
