"""Whether other nodes can dial this one, and if not, staying reachable through a relay.

A joining node asks its initial peer to dial it back at the address it would announce
(:func:`check_reachable`, the ``DialBack`` call, answered with a proof signed by this node's
key). A node that can't be dialed (behind NAT or a firewall) joins the DHT as a client, relays
nothing itself, and keeps a :class:`RelayPresence`: a standing ``Listen`` call to the reachable
node with the lowest RTT, re-chosen when that relay goes away. It announces ``reachable=False``
and its relay; others then reach it by the route ``peer_id@relay`` (:mod:`molink.comm.tunnels`).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable

import grpc
from vllm.logger import init_logger

from molink.comm.links import connect
from molink.comm.proto import molink_pb2
from molink.comm.swarm_view import ping
from molink.comm.tunnels import RelayListener
from molink.security.node_key import NodeKey, verify_proof
from molink.security.swarm_security import SwarmSecurity

logger = init_logger(__name__)

#: Seconds one dial-back may take, the answerer's own dial included.
DIAL_BACK_CALL_TIMEOUT_S = 10.0
#: Seconds between attempts to find a new relay after the last one went away.
RELAY_RETRY_S = 2.0


def dialed_back(peer: str, address: str, security: SwarmSecurity) -> tuple[bool | None, str]:
    """Ask ``peer`` (a node's gRPC ``host:port``) to dial this node at ``address``.

    ``(True, how)`` if this node answered there as itself, ``(False, why not)`` if not, and
    ``(None, why)`` if ``peer`` couldn't be asked.
    """
    nonce = secrets.token_bytes(16)
    channel, stub = connect(peer, security)
    try:
        reply = stub.DialBack(
            molink_pb2.DialBackRequest(address=address, nonce=nonce),
            timeout=DIAL_BACK_CALL_TIMEOUT_S,
        )
    except grpc.RpcError as e:
        return None, f"{peer} could not be asked ({e.code().name})"
    finally:
        channel.close()
    if reply.error:
        return False, f"{peer} can't dial {address} ({reply.error})"
    if not verify_proof(security.node_key.public_key, nonce, reply.proof):
        return False, f"another node answers at {address}"
    return True, f"{peer} dialed it back at {address}"


def check_reachable(
    setting: str, initial_peers: tuple[str, ...], address: str, security: SwarmSecurity
) -> tuple[bool, str]:
    """Whether others can dial this node at ``address``, and how that was decided.

    ``setting`` is ``--reachable``: "yes", "no" or "auto" (asks each ``HOST:PORT`` initial peer
    in turn to dial back; a node with none, or whose peers can't be asked, counts as reachable).
    """
    if setting in ("yes", "no"):
        return setting == "yes", f"--reachable {setting}"
    why = "no --initial-peer HOST:PORT to check with"
    for peer in (p for p in initial_peers if not p.startswith("/")):
        reachable, why = dialed_back(peer, address, security)
        if reachable is not None:
            return reachable, why
    return True, f"assumed: {why}"


class RelayPresence:
    """Keeps this NATed node reachable: a :class:`~molink.comm.tunnels.RelayListener` at the
    candidate relay with the lowest RTT, replaced when it goes away.

    ``candidates()`` lists addresses where this node may reach a relay: reachable nodes'
    announced gRPC addresses, and its initial peers, which may be other paths to them (a DNS
    name, a port forward). The relay it announces is the one the relay itself announces
    (``public_address(peer_id)``), else the address it dialed. ``on_change(relay)`` is called
    when the node moved to another relay (announce it); ``may_dial`` vets the nodes that invite
    it (see :class:`~molink.comm.tunnels.RelayListener`). Raises ``ConnectionError`` if no
    candidate takes this node's calls at start.
    """

    def __init__(
        self,
        node_key: NodeKey,
        local_address: str,
        security: SwarmSecurity,
        candidates: Callable[[], list[str]],
        public_address: Callable[[str], str | None],
        on_change: Callable[[str], None],
        may_dial: Callable[[str], bool] = lambda address: True,
    ) -> None:
        self._node_key = node_key
        self._local = local_address
        self._security = security
        self._candidates = candidates
        self._public_address = public_address
        self._on_change = on_change
        self._may_dial = may_dial
        self._relay = ""
        self._closed = threading.Event()
        self._listener: RelayListener | None = None
        why = self._connect()
        if self._listener is None:
            raise ConnectionError(f"no relay takes this node's calls: {why}")

    @property
    def relay(self) -> str:
        """The relay's announced gRPC address (empty while looking for a new one)."""
        return self._relay if self._listener is not None else ""

    def _connect(self, exclude: str = "") -> str:
        """Listen at the best candidate; "" or why none took it."""
        answers = {}  # address -> (rtt, what the relay says about itself)
        for address in dict.fromkeys(self._candidates()):
            if address != exclude and (answer := ping(address, self._security)) is not None:
                answers[address] = answer
        why = "no reachable node answers"
        for address in sorted(answers, key=lambda a: answers[a][0]):
            rtt, info = answers[address]
            try:
                self._listener = RelayListener(
                    self._node_key,
                    address,
                    info.node_key,
                    self._local,
                    self._security,
                    self._lost,
                    may_dial=self._may_dial,
                )
            except ConnectionError as e:
                why = str(e)
                continue
            self._relay = self._public_address(info.peer_id) or address
            via = f" (reached at {address})" if address != self._relay else ""
            logger.info(
                "Behind NAT: calls to this node go through relay %s%s (RTT %.1f ms)",
                self._relay,
                via,
                rtt * 1e3,
            )
            return ""
        return why

    def _lost(self, reason: str) -> None:
        lost = self._listener.relay if self._listener is not None else ""
        self._listener = None
        threading.Thread(
            target=self._reconnect, args=(lost,), name="molink-relay-find", daemon=True
        ).start()

    def _reconnect(self, lost: str) -> None:
        attempt = 0
        while not self._closed.is_set():
            # Another relay first; the lost one again after a few tries (it may have restarted).
            why = self._connect(exclude=lost if attempt < 3 else "")
            if self._listener is not None:
                self._on_change(self._relay)
                return
            if attempt == 0:
                logger.warning("Looking for a new relay: %s", why)
            attempt += 1
            self._closed.wait(RELAY_RETRY_S)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
