"""Connections to nodes behind NAT, carried over gRPC streams that both ends dial out.

A node that can't be dialed keeps a ``Listen`` call open to a reachable node of the swarm, its
relay, and announces that relay; others reach it by the route ``node_id@relay_host:port``, where
``node_id`` comes from the node key of its signed announcement. The ``Listen`` call proves that
key (a fresh signature bound to the relay), so nobody else can take the node's calls. Any
node that wants a connection to it opens a ``Tunnel`` call to the relay; the relay tells the
NATed node (on its ``Listen`` call) to open a ``Tunnel`` too, pairs the two calls and forwards
their bytes (:mod:`molink.comm.relay_hub`). The tunnelled bytes are an ordinary gRPC connection
between the two nodes, with mutual TLS end to end when the swarm has a key: the relay forwards
ciphertext it can't read.

* :func:`local_endpoint` turns a route into a loopback address that a gRPC channel can use: each
  TCP connection made to it becomes one tunnel (:func:`molink.comm.links.connect` does this).
  In a reachable node's own process (:func:`take_invited_tunnels`) the tunnel skips the relay's
  leg: the relay only passes on an invitation, and the NATed node opens its tunnel straight to
  this node, whose hub carries it to the connection. The hop then rides on a connection the
  NATed node opened to its upstream, as when the relay is the upstream itself.
* :class:`RelayListener` is the NATed node's side: each dial order becomes a tunnel to the relay,
  spliced to the node's own gRPC port.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import grpc
from vllm.logger import init_logger

from molink.comm.announcement import split_host_port
from molink.comm.grpc_options import CHANNEL_OPTIONS
from molink.comm.proto import molink_pb2, molink_pb2_grpc
from molink.security.node_ids import is_node_id, node_id
from molink.security.node_key import NodeKey
from molink.security.swarm_security import SwarmSecurity

logger = init_logger(__name__)

#: Bytes read from a socket per tunnel message.
CHUNK_BYTES = 256 * 1024
#: Messages a tunnel end buffers before it stops reading (back-pressure through gRPC).
QUEUE_CHUNKS = 64
#: Seconds a queued chunk waits for room before the tunnel counts as stuck and closes.
STUCK_S = 60.0
#: Seconds an invited NATed node gets to dial in before its connection goes through the relay.
INVITE_TIMEOUT_S = 5.0


class Inviter(Protocol):
    """Where invited tunnels arrive: a reachable node's hub (:class:`~.relay_hub.RelayHub`)."""

    def await_tunnel(self, token: str, sock: socket.socket) -> threading.Event: ...

    def forget(self, token: str) -> None: ...


def is_route(address: str) -> bool:
    """Whether ``address`` is a route through a relay rather than ``host:port``."""
    return "@" in address


def parse_route(route: str) -> tuple[str, str]:
    """``(node id, relay address)`` of a route; raises ``ValueError`` if it isn't one."""
    target, sep, relay = route.partition("@")
    if not sep or not is_node_id(target):
        raise ValueError(f"{route!r} is not a route NODE_ID@host:port")
    split_host_port(relay)
    return target, relay


def listen_claim(relay_node_id: str, unix_time: float) -> bytes:
    """What a NATed node signs to take its calls at the relay with id ``relay_node_id``."""
    return f"listen|{relay_node_id}|{unix_time:.3f}".encode()


class ChunkQueue:
    """Bounded queue of byte chunks for one direction of a tunnel, until :meth:`close`."""

    def __init__(self) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_CHUNKS)
        self.closed = threading.Event()

    def put(self, data: bytes) -> bool:
        """Queue ``data``; False if the tunnel closed (or stayed full for :data:`STUCK_S`)."""
        waited = 0.0
        while not self.closed.is_set():
            try:
                self._queue.put(data, timeout=0.5)
                return True
            except queue.Full:
                waited += 0.5
                if waited > STUCK_S:
                    self.close()
        return False

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            with contextlib.suppress(queue.Full):  # (the reader sees ``closed`` on its next get)
                self._queue.put_nowait(None)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                data = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self.closed.is_set():
                    return
                continue
            if data is None:
                return
            yield data


def splice(
    sock: socket.socket, stub: molink_pb2_grpc.MoLinkNodeStub, first: molink_pb2.TunnelChunk
) -> str:
    """Carry ``sock``'s bytes both ways over a ``Tunnel`` call opened with ``first``.

    Returns when either side ends, with both closed; the return value says why ("" when the
    connection ended cleanly).
    """
    # Both ends carry gRPC's small frames: no Nagle delay on top of the relay's hop.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    outbox = ChunkQueue()

    def requests() -> Iterator[molink_pb2.TunnelChunk]:
        yield first
        for data in outbox:
            yield molink_pb2.TunnelChunk(data=data)

    def read_socket() -> None:
        try:
            while data := sock.recv(CHUNK_BYTES):
                if not outbox.put(data):
                    break
        except OSError:
            pass
        outbox.close()

    call = stub.Tunnel(requests())
    threading.Thread(target=read_socket, name="molink-tunnel-read", daemon=True).start()
    why = ""
    try:
        for chunk in call:
            sock.sendall(chunk.data)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            why = f"{e.code().name}: {e.details()}"
    except OSError as e:
        why = f"local connection: {e}"
    finally:
        outbox.close()
        call.cancel()
        close_socket(sock)
    return why


def close_socket(sock: socket.socket) -> None:
    """Shut ``sock`` down and close it (a thread blocked reading it wakes up)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _RouteEndpoint:
    """A loopback listener whose every connection is tunnelled to one route's node."""

    def __init__(self, route: str, security: SwarmSecurity) -> None:
        self.target, self.relay = parse_route(route)
        self.last_error = ""
        self._channel = security.channel(self.relay, CHANNEL_OPTIONS)
        self._stub = molink_pb2_grpc.MoLinkNodeStub(self._channel)
        self._invites_fail = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="molink-tunnel-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._carry, args=(sock,), name="molink-tunnel", daemon=True
            ).start()

    def _carry(self, sock: socket.socket) -> None:
        token = secrets.token_hex(16)
        if self._invited(token, sock):
            return
        first = molink_pb2.TunnelChunk(token=token, target=self.target)
        why = splice(sock, self._stub, first)
        if why:
            self.last_error = f"relay {self.relay}: {why}"
            logger.info("Tunnel to %s via %s ended: %s", self.target, self.relay, why)

    def _invited(self, token: str, sock: socket.socket) -> bool:
        """Whether the node took ``sock``'s connection straight from this node: invited through
        its relay, it opened a tunnel to this node's own hub (no relay leg). Needs this process
        to serve a reachable node's gRPC (:func:`take_invited_tunnels`); once the node could not
        come, this endpoint stops asking."""
        hub = _invited_to
        if hub is None or self._invites_fail:
            return False
        arrived = hub.inviter.await_tunnel(token, sock)
        try:
            self._stub.Invite(
                molink_pb2.InviteRequest(target=self.target, token=token, via=hub.address),
                timeout=INVITE_TIMEOUT_S,
            )
        except grpc.RpcError as e:
            hub.inviter.forget(token)
            self.last_error = f"relay {self.relay}: {e.code().name}: {e.details()}"
            return False
        if arrived.wait(INVITE_TIMEOUT_S):
            logger.info("Reached %s straight: it dialed this node when invited", self.target)
            return True
        hub.inviter.forget(token)
        self._invites_fail = True
        logger.warning(
            "%s did not dial %s when invited: its connections go through relay %s",
            self.target,
            hub.address,
            self.relay,
        )
        return arrived.is_set()  # (it came just now)


class _InvitedTo(NamedTuple):
    inviter: Inviter
    address: str


_invited_to: _InvitedTo | None = None


def take_invited_tunnels(inviter: Inviter | None, address: str = "") -> None:
    """This process serves a reachable node at ``address`` whose hub is ``inviter``: connections
    to NATed nodes ask them to dial here instead of going through their relay (None: stop)."""
    global _invited_to
    _invited_to = _InvitedTo(inviter, address) if inviter is not None else None


_endpoints: dict[str, _RouteEndpoint] = {}
_endpoints_lock = threading.Lock()


def local_endpoint(route: str, security: SwarmSecurity) -> str:
    """A loopback ``host:port`` whose connections reach ``route``'s node through its relay.

    One endpoint per route and process, kept for the life of the process (a channel closes and
    reopens often; the endpoint stays).
    """
    with _endpoints_lock:
        endpoint = _endpoints.get(route)
        if endpoint is None:
            endpoint = _endpoints[route] = _RouteEndpoint(route, security)
        return endpoint.address


def last_error(route: str) -> str:
    """Why the last tunnel to ``route`` failed, if one did (for "unreachable" messages)."""
    endpoint = _endpoints.get(route)
    return endpoint.last_error if endpoint is not None else ""


class RelayListener:
    """A NATed node's standing ``Listen`` call to its relay: every dial order on it becomes a
    tunnel to the relay, spliced to this node's own gRPC service at ``local_address``. The call
    is signed with ``node_key`` for the relay whose public key is ``relay_key``.

    ``on_lost(reason)`` is called once if the call ends while not closed (the relay went away).
    An invitation to dial some node is followed only if ``may_dial(address)`` (a node of the
    swarm, not any address someone names). Raises ``ConnectionError`` if the relay doesn't take
    the call within ``timeout`` seconds.
    """

    def __init__(
        self,
        node_key: NodeKey,
        relay: str,
        relay_key: str,
        local_address: str,
        security: SwarmSecurity,
        on_lost: Callable[[str], None],
        timeout: float = 10.0,
        may_dial: Callable[[str], bool] = lambda address: True,
    ) -> None:
        self.relay = relay
        self._local = split_host_port(local_address)
        self._on_lost = on_lost
        self._closed = False
        self._taken = threading.Event()
        self._reason = "no answer"
        self._security = security
        self._may_dial = may_dial
        self._channel = security.channel(relay, CHANNEL_OPTIONS)
        self._stub = molink_pb2_grpc.MoLinkNodeStub(self._channel)
        now = round(time.time(), 3)
        self._call = self._stub.Listen(
            molink_pb2.ListenRequest(
                node_key=node_key.public_key,
                unix_time=now,
                proof=node_key.prove(listen_claim(node_id(relay_key), now)),
            )
        )
        threading.Thread(target=self._serve, name="molink-relay-listen", daemon=True).start()
        if not self._taken.wait(timeout):
            self.close()
            raise ConnectionError(f"relay {relay} did not take this node's calls: {self._reason}")

    def _serve(self) -> None:
        reason = "the relay ended the call"
        try:
            for order in self._call:
                if not order.token:  # the relay's first message: it took the call
                    self._taken.set()
                    continue
                threading.Thread(
                    target=self._take, args=(order,), name="molink-tunnel", daemon=True
                ).start()
        except grpc.RpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        self._reason = reason
        if not self._closed and self._taken.is_set():
            logger.warning("Lost relay %s (%s)", self.relay, reason)
            self._on_lost(reason)

    def _take(self, order: molink_pb2.DialOrder) -> None:
        """Open the tunnel of ``order`` (to the relay, or to the node that invited this one)."""
        if order.via:
            try:
                split_host_port(order.via)
            except ValueError:
                return
            if not self._may_dial(order.via):
                logger.warning(
                    "Not dialing %s when invited: no reachable node of the swarm", order.via
                )
                return
        try:
            sock = socket.create_connection(self._local, timeout=5.0)
        except OSError as e:
            logger.warning("Can't reach this node's own gRPC port for a tunnel: %s", e)
            return
        sock.settimeout(None)
        first = molink_pb2.TunnelChunk(token=order.token)
        if not order.via:
            why = splice(sock, self._stub, first)
        else:
            channel = self._security.channel(order.via, CHANNEL_OPTIONS)
            try:
                why = splice(sock, molink_pb2_grpc.MoLinkNodeStub(channel), first)
            finally:
                channel.close()
        if why:
            logger.debug("Tunnel to %s ended: %s", order.via or self.relay, why)

    def close(self) -> None:
        self._closed = True
        self._call.cancel()
        self._channel.close()
