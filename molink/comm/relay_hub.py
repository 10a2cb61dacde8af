"""The relay side of tunnels to nodes behind NAT (see :mod:`molink.comm.tunnels`).

Every reachable node runs a :class:`RelayHub` in its gRPC service:

* ``Listen``: a NATed node registers under its node id and receives dial orders on the call. It
  proves the node key the id derives from: a signature of this relay's id and the time (within
  :data:`CLAIM_MAX_AGE_S`), so no other node can take its calls.
* ``Tunnel`` opened with a ``target``: someone wants a connection to that NATed node. The hub
  sends the node a dial order with the tunnel's one-time token and waits for it to open its own
  ``Tunnel`` with that token; then it forwards bytes between the two calls until either ends.
* ``Invite``: a reachable node wants a connection to a NATed node without the relay's leg. The
  hub sends the node a dial order naming the inviter; the node opens its ``Tunnel`` straight to
  the inviter's hub, which carries it to the inviter's own socket (:meth:`RelayHub.await_tunnel`).

The hub never decodes what it forwards: with a swarm key the bytes are a TLS connection between
the two nodes. The calls themselves need the swarm key like every other call (mutual TLS).
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import threading
import time
from collections.abc import Iterator

import grpc
from vllm.logger import init_logger

from molink.comm.announcement import split_host_port
from molink.comm.proto import molink_pb2
from molink.comm.tunnels import CHUNK_BYTES, ChunkQueue, close_socket, listen_claim
from molink.security.node_ids import node_id
from molink.security.node_key import verify_proof
from molink.telemetry import metrics

logger = init_logger(__name__)

#: NATed nodes one relay takes calls for (each holds a few of the gRPC server's threads: a
#: standing call, and two per connection relayed to it).
MAX_LISTENERS = 32
#: Tunnels waiting at once for their NATed node to dial in.
MAX_WAITING = 256
#: Seconds a dialer's tunnel waits for the NATed node to dial in.
PAIR_TIMEOUT_S = 10.0
#: How far a ``Listen`` call's signed time may be from the relay's clock (seconds).
CLAIM_MAX_AGE_S = 120.0
_TOKEN_RE = re.compile(r"[0-9a-f]{16,64}")


class _End:
    """One call of a tunnel: what it receives goes to its partner's outbox."""

    def __init__(self, requests: Iterator[molink_pb2.TunnelChunk]) -> None:
        self.requests = requests
        self.outbox = ChunkQueue()
        self.partner: _End | None = None
        self.paired = threading.Event()
        self.relayed = True  # False: an invited tunnel, carried to this node's own socket

    def pump(self) -> None:
        """Forward this call's chunks to the partner until either side ends."""
        assert self.partner is not None
        try:
            for chunk in self.requests:
                if chunk.data and not self.partner.outbox.put(chunk.data):
                    break
                if self.relayed:
                    metrics.RELAY_BYTES.inc(len(chunk.data))
        except grpc.RpcError:
            pass
        self.close()

    def close(self) -> None:
        self.outbox.close()
        if self.partner is not None:
            self.partner.outbox.close()

    def responses(self) -> Iterator[molink_pb2.TunnelChunk]:
        for data in self.outbox:
            yield molink_pb2.TunnelChunk(data=data)


class _SocketEnd(_End):
    """This node's own side of an invited tunnel: a local socket (one of its gRPC channels'
    connections), carried to the NATed node's call once that arrives."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(iter(()))
        self.sock = sock

    def start(self) -> None:
        """Carry bytes both ways (called once paired)."""
        threading.Thread(target=self._write, name="molink-invited-write", daemon=True).start()
        threading.Thread(target=self.pump, name="molink-invited-read", daemon=True).start()

    def pump(self) -> None:
        assert self.partner is not None
        with contextlib.suppress(OSError):
            while data := self.sock.recv(CHUNK_BYTES):
                if not self.partner.outbox.put(data):
                    break
        self.close()

    def _write(self) -> None:
        with contextlib.suppress(OSError):
            for data in self.outbox:
                self.sock.sendall(data)
        self.close()

    def close(self) -> None:
        super().close()
        close_socket(self.sock)


class RelayHub:
    """Pairs tunnels to the NATed nodes that keep a ``Listen`` call open here."""

    def __init__(self, own_node_id: str) -> None:
        """``own_node_id``: this relay's node id, which a ``Listen`` call must have signed."""
        self._own_node_id = own_node_id
        self._lock = threading.Lock()
        self._listeners: dict[str, ChunkQueue] = {}  # node id -> its dial orders (tokens)
        self._waiting: dict[str, _End] = {}  # token -> the dialer's end

    def await_tunnel(self, token: str, sock: socket.socket) -> threading.Event:
        """Carry ``sock`` over the tunnel that a NATed node will open here with ``token`` (see
        :meth:`invite`); the event is set once it did. :meth:`forget` the token to give up."""
        end = _SocketEnd(sock)
        with self._lock:
            self._waiting[token] = end
        return end.paired

    def forget(self, token: str) -> None:
        """Stop waiting for the tunnel of ``token``."""
        with self._lock:
            self._waiting.pop(token, None)

    def invite(self, request: molink_pb2.InviteRequest, context) -> molink_pb2.Empty:
        """Tell NATed node ``request.target`` to open a tunnel straight to ``request.via``."""
        if not _TOKEN_RE.fullmatch(request.token):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad tunnel token")
        try:
            split_host_port(request.via)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"via: {e}")
        with self._lock:
            orders = self._listeners.get(request.target)
        if orders is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"{request.target} takes no calls through this relay"
            )
        order = molink_pb2.DialOrder(token=request.token, via=request.via)
        orders.put(order.SerializeToString())
        return molink_pb2.Empty()

    def listeners(self) -> list[str]:
        """Node ids that take calls through this relay now."""
        with self._lock:
            return sorted(self._listeners)

    def listen(self, request: molink_pb2.ListenRequest, context) -> Iterator[molink_pb2.DialOrder]:
        """A NATed node's standing call: yields its dial orders (the first one empty: taken).

        A second call for the same node replaces the first (the node reconnected).
        """
        claim = listen_claim(self._own_node_id, request.unix_time)
        if not math.isfinite(request.unix_time) or not verify_proof(
            request.node_key, claim, request.proof
        ):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "the call is not signed by its node key"
            )
        if abs(time.time() - request.unix_time) > CLAIM_MAX_AGE_S:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the call was signed more than {CLAIM_MAX_AGE_S:.0f} s from this relay's time",
            )
        node = node_id(request.node_key)
        orders = ChunkQueue()
        with self._lock:
            if node not in self._listeners and len(self._listeners) >= MAX_LISTENERS:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this relay already takes calls for {MAX_LISTENERS} nodes",
                )
            old, self._listeners[node] = self._listeners.get(node), orders
        if old is not None:
            old.close()
        context.add_callback(orders.close)
        logger.info("Relaying calls to node %s (behind NAT)", node)
        metrics.RELAY_NODES.inc()
        try:
            yield molink_pb2.DialOrder()
            for order in orders:
                yield molink_pb2.DialOrder.FromString(order)
        finally:
            with self._lock:
                if self._listeners.get(node) is orders:
                    del self._listeners[node]
            metrics.RELAY_NODES.dec()
            logger.info("No longer relaying calls to node %s", node)

    def tunnel(
        self, requests: Iterator[molink_pb2.TunnelChunk], context
    ) -> Iterator[molink_pb2.TunnelChunk]:
        """One side of a tunnel: the dialer's (first chunk names a target) or the NATed node's."""
        try:
            first = next(requests)
        except (StopIteration, grpc.RpcError):
            return
        token = first.token
        if not _TOKEN_RE.fullmatch(token):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad tunnel token")
        end = _End(requests)
        context.add_callback(end.close)
        if first.target:
            self._wait_for_target(first.target, token, end, context)
        else:
            with self._lock:
                partner = self._waiting.pop(token, None)
            if partner is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "no tunnel waits for this token")
            end.partner, partner.partner = partner, end
            partner.paired.set()
            if isinstance(partner, _SocketEnd):
                end.relayed = False
                partner.start()
        if first.data:
            end.partner.outbox.put(first.data)  # type: ignore[union-attr]
        threading.Thread(target=end.pump, name="molink-relay-pump", daemon=True).start()
        if first.target:  # count each tunnel once, on its dialer's side
            metrics.RELAY_TUNNELS.inc()
        try:
            yield from end.responses()
        finally:
            if first.target:
                metrics.RELAY_TUNNELS.dec()

    def _wait_for_target(self, target: str, token: str, end: _End, context) -> None:
        with self._lock:
            orders = self._listeners.get(target)
            if orders is not None:
                if token in self._waiting or len(self._waiting) >= MAX_WAITING:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many tunnels waiting")
                self._waiting[token] = end
        if orders is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{target} takes no calls through this relay")
        orders.put(molink_pb2.DialOrder(token=token).SerializeToString())
        if not end.paired.wait(PAIR_TIMEOUT_S):
            with self._lock:
                self._waiting.pop(token, None)
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{target} did not dial in within {PAIR_TIMEOUT_S:.0f} s",
            )
