"""Swarm membership over a hivemind DHT.

Every MoLink node runs one :class:`Membership`: a hivemind DHT peer (a forked process that drives
the bundled ``p2pd`` binary) plus a daemon thread that re-announces the node's
:class:`~molink.comm.announcement.NodeAnnouncement` every few seconds. All announcements live
under one DHT key, one subkey per node, with an expiration of about twice the refresh period, so
a node that dies disappears from everyone's view on its own.

Announcements are signed: the subkey is hivemind's owner marker for the node's key
(:mod:`molink.security.node_key`), so every DHT peer refuses a store under it that the key did not
sign (expiration included: an old record can't be replayed past its end), and readers skip
entries without an owner marker, entries whose ``node_key`` is not the owner, and (with an
allowlist) nodes not on it. With a swarm key, DHT requests also need admission tokens
(:mod:`molink.security.dht_admission`).

The announcement itself is :mod:`molink.comm.announcement`; starting the DHT process and reaping
its ``p2pd`` is :mod:`molink.comm.dht_process`. hivemind is imported lazily.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from vllm.logger import init_logger

from molink.comm.announcement import NodeAnnouncement
from molink.comm.dht_process import (
    free_port,
    maddr,
    proc_children,
    reap_p2pd,
    start_dht,
)
from molink.security.swarm_security import SwarmSecurity

logger = init_logger(__name__)

#: DHT key under which every node stores its announcement (subkey = the node's PeerID).
NODES_KEY = "molink/nodes/v1"

#: Seconds added to ``2 * period`` when computing an announcement's expiration.
EXPIRATION_MARGIN = 1.0
#: Nodes re-store their announcement this often (seconds); readers assume it to tell how long
#: ago a node last did.
ANNOUNCE_PERIOD_S = 5.0

_OWNER_RE = re.compile(rb"\[owner:(ssh-rsa [A-Za-z0-9+/=]{1,1000})\]")
# How long a single DHT get/store may take before we give up on it.
_DHT_CALL_TIMEOUT = 30.0


class Membership:
    """One node's membership in the swarm: a hivemind DHT peer plus a refresh thread."""

    def __init__(
        self,
        initial_peers: Sequence[str] = (),
        host: str = "0.0.0.0",
        port: int = 0,
        announce_host: str | None = None,
        startup_timeout: float = 60.0,
        security: SwarmSecurity | None = None,
        **dht_kwargs: Any,
    ) -> None:
        """Start a DHT peer listening on ``host:port`` and join the swarm via ``initial_peers``.

        ``initial_peers`` are full multiaddrs (``/ip4/…/tcp/…/p2p/<PeerID>``). With
        ``announce_host`` the peer advertises ``announce_host:<port>`` to others (a free port is
        picked first when ``port`` is 0, because p2pd needs the real port up front). ``security``
        signs this node's announcements, filters others' and, with a swarm key, admits only its
        holders (default: a new node key, no swarm key). Extra keyword arguments go to
        ``hivemind.DHT`` (e.g. ``wait_timeout``, ``identity_path``).
        Raises hivemind's ``P2PDaemonError`` if p2pd cannot start or reach the initial peers.
        """
        self._owner_pid = os.getpid()
        self._security = security or SwarmSecurity.open()
        self._node_key = self._security.node_key.public_key
        self._subkey = f"[owner:{self._node_key}]".encode()  # hivemind's owner marker
        self._lock = threading.RLock()  # guards the fields below
        self._dht_lock = threading.Lock()  # serializes sends on hivemind's command pipe
        self._current: NodeAnnouncement | None = None
        self._period = ANNOUNCE_PERIOD_S
        self._last_expiration = float("-inf")
        self._last_store_ok = True
        self._last_stored_at: float | None = None  # DHT time of our last accepted store
        self._stored_at: dict[str, float] = {}  # peer -> DHT time it last stored (estimated)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

        if announce_host is not None and port == 0:
            port = free_port(host)
        dht_args: dict[str, Any] = {
            "initial_peers": list(initial_peers),
            "host_maddrs": [maddr(host, port)],
            "start": False,
            "startup_timeout": startup_timeout,
        }
        if announce_host is not None:
            dht_args["announce_maddrs"] = [maddr(announce_host, port)]
        dht_args.update(self._security.dht_kwargs())
        dht_args.update(dht_kwargs)
        # The multiaddrs are read once, at start: they are fixed by the listen and announce
        # addresses, and asking later would wait on the DHT process (unbounded in hivemind).
        self._dht, self._maddrs = start_dht(dht_args, startup_timeout)
        self._p2pd = proc_children(self._dht.pid, "p2pd") if self._dht.pid else []
        atexit.register(self._atexit)
        try:
            self._peer_id: str = self._dht.peer_id.to_base58()
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            "DHT peer %s started, listening on %s", self._peer_id, ", ".join(self.visible_maddrs())
        )

    @property
    def peer_id(self) -> str:
        """This node's hivemind PeerID (base58)."""
        return self._peer_id

    @property
    def period(self) -> float:
        """The refresh period of the current announcement, in seconds."""
        return self._period

    @property
    def announcement(self) -> NodeAnnouncement | None:
        """The announcement this node currently publishes, if any."""
        return self._current

    def visible_maddrs(self) -> list[str]:
        """Multiaddrs (``/ip4/…/tcp/…/p2p/<id>``) other peers can use as ``initial_peers``
        (read at start: answering never waits on the DHT process)."""
        return list(self._maddrs)

    def announce(self, ann: NodeAnnouncement, period: float = ANNOUNCE_PERIOD_S) -> None:
        """Publish ``ann`` now and re-publish it every ``period`` seconds until withdrawn.

        Each store expires ``2 * period`` (+ a small margin) seconds later, so the entry vanishes
        on its own if this node dies. ``ann.peer_id`` must be this node's :attr:`peer_id`; its
        ``node_key`` is set to this node's key, which signs every store.
        """
        if ann.peer_id != self._peer_id:
            raise ValueError(
                f"announcement is for peer {ann.peer_id}, this node is {self._peer_id}"
            )
        ann = dataclasses.replace(ann, node_key=self._node_key)
        if not period > 0:
            raise ValueError(f"period must be positive, got {period}")
        with self._lock:
            if self._closed:
                raise RuntimeError("membership is shut down")
            self._current = ann
            self._period = float(period)
            future = self._send_store(ann.to_dict())
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._refresh_loop, name="molink-dht-refresh", daemon=True
                )
                self._thread.start()
        self._finish_store(future)

    def update(self, **changes: Any) -> None:
        """Replace fields of the current announcement (e.g. ``state="online"``) and store it now."""
        with self._lock:
            if self._current is None:
                raise RuntimeError("nothing announced yet: call announce() first")
            for name, mine in (("peer_id", self._peer_id), ("node_key", self._node_key)):
                if name in changes and changes[name] != mine:
                    raise ValueError(f"{name} of an announcement cannot change")
            self._current = dataclasses.replace(self._current, **changes)
            future = self._send_store(self._current.to_dict())
        self._finish_store(future)

    def nodes(self) -> list[NodeAnnouncement]:
        """Unexpired, signed announcements of every node in the swarm (including this one).

        Unsigned, malformed and disallowed entries are logged at debug level and skipped; so are
        peer ids that several keys claim. Sorted by (start_layer, peer_id).
        """
        from hivemind.utils import get_dht_time

        found = self._call(self._dht.get, NODES_KEY, latest=True)
        by_peer: dict[str, NodeAnnouncement] = {}
        claimed_twice: set[str] = set()
        entries = getattr(found, "value", None)
        if found is not None and not isinstance(entries, dict):
            logger.debug("ignoring non-dictionary DHT value under %s", NODES_KEY)
        now = get_dht_time()
        stored_at: dict[str, float] = {}
        ttl = 2 * ANNOUNCE_PERIOD_S + EXPIRATION_MARGIN
        for subkey, item in (entries or {}).items() if isinstance(entries, dict) else ():
            value = getattr(item, "value", None)
            expiration = getattr(item, "expiration_time", None)
            if value is None or not isinstance(expiration, (int, float)) or expiration < now:
                continue  # withdrawn (tombstone) or expired
            ann = self._read_entry(subkey, value)
            if ann is None:
                continue
            if ann.peer_id in by_peer or ann.peer_id in claimed_twice:
                logger.debug("skipping peer %s: several node keys claim it", ann.peer_id)
                by_peer.pop(ann.peer_id, None)
                claimed_twice.add(ann.peer_id)
                continue
            by_peer[ann.peer_id] = ann
            stored_at[ann.peer_id] = min(now, expiration - ttl)
        with self._lock:
            if self._current is not None:  # our own view of ourselves is authoritative
                by_peer[self._peer_id] = self._current
                if self._last_stored_at is not None:
                    stored_at[self._peer_id] = self._last_stored_at
            else:
                by_peer.pop(self._peer_id, None)
            self._stored_at = stored_at
        return sorted(by_peer.values(), key=lambda a: (a.start_layer, a.peer_id))

    def seconds_since_stored(self) -> dict[str, float]:
        """Per peer seen by the last :meth:`nodes`, seconds since its announcement was stored.

        Estimated from the entry's expiration for nodes refreshing every
        :data:`ANNOUNCE_PERIOD_S`; exact for this node.
        """
        from hivemind.utils import get_dht_time

        now = get_dht_time()
        with self._lock:
            return {peer: max(0.0, now - at) for peer, at in self._stored_at.items()}

    def _read_entry(self, subkey: Any, value: Any) -> NodeAnnouncement | None:
        """The announcement in one DHT entry, if it is signed, well formed and allowed."""
        owner = _OWNER_RE.fullmatch(subkey) if isinstance(subkey, bytes) else None
        if owner is None:
            logger.debug("skipping an unsigned entry under %s", NODES_KEY)
            return None
        try:
            ann = NodeAnnouncement.from_dict(value)
        except ValueError as e:
            logger.debug("skipping a malformed announcement: %s", e)
            return None
        if ann.node_key.encode() != owner.group(1):
            logger.debug("skipping announcement of %s: not signed by its own key", ann.peer_id)
            return None
        if not self._security.allows(ann.node_key):
            logger.debug("skipping announcement of %s: not on the allowlist", ann.peer_id)
            return None
        return ann

    def withdraw(self) -> None:
        """Stop refreshing and remove this node's entry from the swarm as soon as possible.

        hivemind refuses stores that expire earlier than the value they would replace, so the
        entry is overwritten by a tombstone (``None``) that expires slightly later; :meth:`nodes`
        skips tombstones. Idempotent.
        """
        self._stop_refresh()
        with self._lock:
            if self._current is None:
                return
            self._current = None
            try:
                future = self._send_store(None, short=True)
            except Exception as e:  # noqa: BLE001  # the DHT may already be gone
                logger.warning("could not withdraw announcement of %s: %s", self._peer_id, e)
                return
        try:
            self._finish_store(future)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not withdraw announcement of %s: %s", self._peer_id, e)
            return
        logger.info("withdrew announcement of %s", self._peer_id)

    def shutdown(self) -> None:
        """Withdraw, stop the DHT process and make sure its p2pd is gone. Idempotent."""
        if os.getpid() != self._owner_pid:
            return  # a forked child must not tear down its parent's DHT
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._atexit)
        try:
            if self._dht.is_alive():
                self.withdraw()
        finally:
            self._stop_refresh()
            self._dht.shutdown()
            self._dht.join(timeout=5.0)
            reap_p2pd(self._p2pd)
        logger.info("DHT peer %s shut down", getattr(self, "_peer_id", "?"))

    # -- internals ------------------------------------------------------------------------------

    def _atexit(self) -> None:
        try:
            self.shutdown()
        except Exception as e:  # noqa: BLE001  # never raise at interpreter exit
            logger.debug("DHT shutdown at exit failed: %s", e)

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a hivemind.DHT method from any thread and wait (bounded) for its result."""
        return self._wait(self._send(method, *args, **kwargs))

    def _wait(self, future: Any) -> Any:
        """Wait for an MPFuture; give up after a timeout or as soon as the DHT process is gone.

        (hivemind never resolves the futures of a DHT process that died.)
        """
        deadline = time.monotonic() + _DHT_CALL_TIMEOUT
        while True:
            try:
                return future.result(timeout=0.5)
            except TimeoutError:
                if not self._dht.is_alive():
                    raise RuntimeError("the DHT process died") from None
                if time.monotonic() > deadline:
                    raise

    def _send(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """Send a hivemind.DHT call over its command pipe; returns its MPFuture."""
        with self._dht_lock:
            if not self._dht.is_alive():
                raise RuntimeError("the DHT process is not running")
            return method(*args, return_future=True, **kwargs)

    def _next_expiration(self, short: bool = False) -> float:
        """A strictly increasing expiration time (hivemind rejects stores older than the value)."""
        from hivemind.utils import get_dht_time

        ttl = 0.0 if short else 2 * self._period + EXPIRATION_MARGIN
        expiration = max(get_dht_time() + ttl, self._last_expiration + 1e-3)
        self._last_expiration = expiration
        return expiration

    def _send_store(self, value: Any, short: bool = False) -> Any:
        """Send a store of our subkey (caller holds ``_lock``, which keeps expirations ordered)."""
        expiration = self._next_expiration(short)
        return self._send(self._dht.store, NODES_KEY, value, expiration, subkey=self._subkey)

    def _finish_store(self, future: Any) -> bool:
        from hivemind.utils import get_dht_time

        ok = bool(self._wait(future))
        if ok:
            self._last_stored_at = get_dht_time()
        if not ok and self._last_store_ok:
            logger.warning("no DHT peer accepted the announcement of %s", self._peer_id)
        self._last_store_ok = ok
        return ok

    def _store_current(self) -> None:
        with self._lock:
            if self._current is None:
                return
            future = self._send_store(self._current.to_dict())
        self._finish_store(future)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._store_current()
            except Exception as e:  # noqa: BLE001  # the refresh thread must survive DHT hiccups
                logger.warning("refreshing the announcement of %s failed: %s", self._peer_id, e)

    def _stop_refresh(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_DHT_CALL_TIMEOUT + 1.0)
