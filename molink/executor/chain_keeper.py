"""Which nodes serve the head's pipeline: the current chain, its alternatives, and the next chain.

The :class:`ChainKeeper` owns the head's remote stages. It watches the swarm through a
:class:`~molink.comm.swarm_view.SwarmView`, prepares nodes that could replace a stage of the
current chain (they load their span's weights and KV cache ahead of need, *standby*), and when a
stage is lost or leaving, plans the next chain from what the swarm announces
(:func:`~molink.comm.chain.assemble_chain`: the lowest RTT plus announced compute time, shared
by the heads a node serves, preferring nodes that already hold the span) and gets its stages
ready. Wiring the chain for a new epoch and moving steps through it stays with the executor.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import KVCacheConfig

from molink.comm.announcement import NodeAnnouncement
from molink.comm.chain import Chain, ChainError, Hop, assemble_chain
from molink.comm.swarm_view import SwarmView
from molink.core.rebalance import first_in_line
from molink.engine.head_config import HeadConfig, RemoteStageSpec
from molink.executor.remote_stage import RemoteStage
from molink.security.swarm_security import SwarmSecurity
from molink.stage_spec import StageConfig

logger = init_logger(__name__)

#: A node found dead is left out of chains this long (its DHT entry may outlive it).
EXCLUDE_S = 30.0


def _describe(remote: RemoteStage) -> dict[str, Any]:
    return {"peer_id": remote.peer_id, "address": remote.address, "layers": list(remote.span)}


def _cause(error: BaseException) -> str:
    """Why a node failed to start its stage, in one line."""
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
    return f"{type(error).__name__}: {error}"


class ChainKeeper:
    """The remote stages of the head's chain, and the nodes ready to replace them."""

    def __init__(
        self,
        head: HeadConfig,
        stage_config: Callable[[RemoteStage], StageConfig],
        plan_kv: Callable[[RemoteStage, list[RemoteStage]], KVCacheConfig],
        session: str,
    ) -> None:
        """``session``: this head's secret session id, sent with every stage call."""
        self.head = head
        self.session = session
        self.head_node: NodeAnnouncement = head.head_node
        self.weights = head.weight_digests
        self._stage_config = stage_config
        self._plan_kv = plan_kv
        self.security = SwarmSecurity.from_files(head.security)
        self.remotes = [RemoteStage(spec, self.security, session) for spec in head.stages]
        self._standby: dict[str, RemoteStage] = {}  # peer -> prepared stage not in the chain
        self._excluded: dict[str, tuple[float, str]] = {}  # peer -> (until (monotonic), why)
        self._leaving: set[str] = set()
        self._view: SwarmView | None = None

    # ------------------------------------------------------------------ set-up
    def init_stages(self) -> None:
        """Build the first chain's stages (``InitStage`` on every node at once).

        A node that can't be reached or refuses is left out, with its cause in the log, and the
        chain is planned again without it: one bad node never stops the head. Waits up to
        ``--chain-timeout`` for a chain whose nodes all start, then raises ``ChainIncomplete``.
        """
        deadline = time.monotonic() + self.head.chain_timeout
        while self.remotes:
            with ThreadPoolExecutor(max_workers=len(self.remotes)) as pool:
                started = [(r, pool.submit(self._init, r)) for r in self.remotes]
            failed = {r.peer_id: _cause(f.exception()) for r, f in started if f.exception()}
            if not failed:
                return
            for peer_id, why in failed.items():
                self.exclude(peer_id, why)
            previous = self.remotes
            kept = {(r.peer_id, r.span): r for r in previous if r.peer_id not in failed}
            self.remotes = [
                kept.pop((hop.peer_id, (hop.start_layer, hop.end_layer)), None)
                or RemoteStage(RemoteStageSpec.from_hop(hop), self.security, self.session)
                for hop in self._wait_for_plan(deadline).stages[1:]
            ]
            for remote in previous:
                if not any(remote is r for r in self.remotes):
                    remote.close()

    def _wait_for_plan(self, deadline: float) -> Chain:
        """The best chain without the nodes left out, once the swarm offers one (polled)."""
        next_log = 0.0
        while True:
            try:
                self.view.refresh()
                return self.plan()
            except ChainError as e:
                now = time.monotonic()
                if now >= deadline:
                    raise
                if now >= next_log:
                    left_out = "; ".join(
                        f"{p}: {why}" for p, why in self.describe_exclusions().items()
                    )
                    logger.info(
                        "Waiting for a chain without the nodes left out (%s): %s", left_out, e
                    )
                    next_log = now + 10.0
            except Exception as e:  # noqa: BLE001  # a DHT hiccup must not end the wait
                logger.warning("Could not read the swarm: %s", e)
                if time.monotonic() >= deadline:
                    raise
            time.sleep(1.0)

    def _init(self, remote: RemoteStage) -> None:
        logger.info("Initializing stage %s", remote)
        remote.init(
            self._stage_config(remote),
            timeout=self.head.stage_init_timeout,
            head_peer_id=self.head_node.peer_id,
        )

    def refresh_offers(self) -> None:
        """Ask every stage of the chain again how much KV cache this head may hold there."""
        for remote in self.remotes:
            self._init(remote)

    @property
    def view(self) -> SwarmView:
        if self._view is None:
            self._view = SwarmView(self.head.dht_maddrs, self.security)
        return self._view

    # ------------------------------------------------------------------ state
    def mark_leaving(self, peer_id: str) -> None:
        """A node said it is leaving: don't use it in any new chain."""
        self._leaving.add(peer_id)

    def leaving_in_chain(self) -> list[RemoteStage]:
        return [r for r in self.remotes if r.peer_id in self._leaving]

    def _exclusions(self) -> set[str]:
        now = time.monotonic()
        self._excluded = {p: e for p, e in self._excluded.items() if e[0] > now}
        return set(self._excluded) | self._leaving

    def exclude(self, peer_id: str, why: str) -> None:
        """Leave ``peer_id`` out of chains for :data:`EXCLUDE_S` (logged once per exclusion)."""
        if peer_id not in self._exclusions():
            logger.warning("Leaving node %s out of chains for %.0f s: %s", peer_id, EXCLUDE_S, why)
        self._excluded[peer_id] = (time.monotonic() + EXCLUDE_S, why)

    def standbys(self) -> list[RemoteStage]:
        """Nodes holding a span for this head outside the chain."""
        return list(self._standby.values())

    def held(self) -> list[RemoteStage]:
        """Every stage that holds a span for this head: the chain's, then the standbys'."""
        return [*self.remotes, *self._standby.values()]

    def _loaded(self) -> dict[str, tuple[int, int]]:
        """Spans nodes hold for this head, by peer (the chain's win over standbys')."""
        return {r.peer_id: r.span for r in reversed(self.held())}

    # ------------------------------------------------------------------ reporting
    def describe_remotes(self) -> list[dict[str, Any]]:
        """The chain's remote stages, in order, as plain data."""
        return [_describe(r) for r in list(self.remotes)]

    def describe_standbys(self) -> list[dict[str, Any]]:
        """Nodes holding a span for this head outside the chain, ready to replace a stage."""
        return [_describe(r) for r in list(self._standby.values())]

    def describe_exclusions(self) -> dict[str, str]:
        """Peers left out of chains now, and why (dead, refused, or leaving)."""
        now = time.monotonic()
        found = {p: why for p, (until, why) in list(self._excluded.items()) if until > now}
        found.update(dict.fromkeys(list(self._leaving), "leaving"))
        return found

    def view_rtt_s(self) -> dict[str, float]:
        """Measured round-trip times by peer id (empty before the swarm was first read)."""
        return self._view.rtt_s() if self._view is not None else {}

    # ------------------------------------------------------------------ planning
    def plan(self, without: str | None = None, only: set[str] | None = None) -> Chain:
        """The best chain the swarm offers now, optionally without node ``without`` or with
        ``only`` those nodes.

        Raises ``ChainIncomplete`` naming the layers nobody usable serves.
        """
        excluded = self._exclusions() | ({without} if without else set())
        if only is not None:
            excluded |= {n.peer_id for n in self.view.nodes} - only
        return assemble_chain(
            self.head_node,
            self.view.nodes,
            exclude_peers=excluded,
            rtt_s=self.view.rtt_s(),
            loaded=self._loaded(),
            weights=self.weights,
            serving_me={r.peer_id for r in self.remotes},
        )

    def shares_stages(self) -> bool:
        """Whether a node of the chain runs other heads' sequences too, by its announcement as
        last read (another head that only holds KV there, idle, takes none of its time)."""
        if self._view is None:
            return False
        mine = {r.peer_id for r in self.remotes}
        me = self.head_node.peer_id
        return any(
            node.peer_id in mine and any(h != me for h in node.running_head_ids)
            for node in self._view.nodes
        )

    def rebalance_option(self) -> tuple[float, Chain] | None:
        """A cheaper chain over the same spans as the current one, on other replicas, that this
        head may move to now, with the current chain's cost in the same view. None when there
        is none, or when a node it would leave serves no other head (a head alone on its nodes
        stays: speeds measured on shared machines are noisy), or when this head is not first in
        line on it (:func:`~molink.core.rebalance.first_in_line`). Reads the view as last
        refreshed.
        """
        mine = [r.peer_id for r in self.remotes]
        if not mine or self._view is None:
            return None
        try:
            best = self.plan()
            current = self.plan(only=set(mine))
        except ChainError:
            return None
        hops = best.stages[1:]
        if [h.span for h in hops] != [r.span for r in self.remotes] or best.peer_ids[1:] == mine:
            return None
        announced = {n.peer_id: n for n in self.view.nodes}
        for remote, hop in zip(self.remotes, hops, strict=True):
            node = announced.get(remote.peer_id)
            if hop.peer_id != remote.peer_id and not (
                node is not None
                and len(node.head_ids) > 1  # only a node shared with other heads is left
                and first_in_line(node.peer_id, node.head_ids, self.head_node.peer_id)
            ):
                return None
        return current.cost, best

    def prepare_next_chain(self, keep: bool = False) -> tuple[list[RemoteStage], Chain]:
        """Probe the current stages, plan a chain without the dead ones, get its stages ready;
        with ``keep``, the current chain's nodes while they all serve.

        Returns the remote stages of the new chain (not yet wired). Raises ``ChainError`` when
        the swarm can't cover the layers, or another error when a chosen node fails to start
        (it is then left out, and the next call plans around it).
        """
        for remote in self.held():
            dead = remote.probe()
            if dead is not None:
                self.exclude(remote.peer_id, dead)
        self.view.refresh()
        chain = None
        if keep and self.remotes:
            with contextlib.suppress(ChainError):
                chain = self.plan(only={r.peer_id for r in self.remotes})
        chain = chain or self.plan()
        return [self._ready(hop) for hop in chain.stages[1:]], chain

    def _ready(self, hop: Hop) -> RemoteStage:
        """A stage for ``hop``: the one already serving or on standby, else a new one."""
        for remote in self.held():
            if remote.peer_id == hop.peer_id and remote.span == hop.span:
                return remote
        remote = RemoteStage(RemoteStageSpec.from_hop(hop), self.security, self.session)
        try:
            self._init(remote)
            remote.kv_cache_config = self._plan_kv(remote, self.remotes)
        except Exception as e:
            remote.close()
            self.exclude(hop.peer_id, f"{type(e).__name__}: {e}")
            raise
        return remote

    def commit(self, remotes: list[RemoteStage]) -> None:
        """Make ``remotes`` the chain; stages no longer in it are released or kept on standby."""
        chosen = {id(r) for r in remotes}
        peers = {r.peer_id for r in remotes}
        excluded = self._exclusions()
        standby: dict[str, RemoteStage] = {}
        for remote in self.held():
            if id(remote) in chosen:
                continue
            if remote.peer_id in peers or remote.peer_id in excluded:
                remote.close()  # gone, leaving, or now serving another span for this head
            else:
                if not remote.hot:  # a hot standby keeps its KV blocks into the next epoch
                    remote.release()
                standby[remote.peer_id] = remote
        self._standby = standby
        self.remotes = list(remotes)

    # ------------------------------------------------------------------ standbys
    def hot_standbys(self) -> dict[int, RemoteStage]:
        """For each stage of the chain that has one, a standby holding exactly its span, by the
        stage's index (what ``--hot-standby`` makes hot; one already hot first)."""
        chosen: dict[int, RemoteStage] = {}
        standbys = sorted(self._standby.values(), key=lambda r: not r.hot)
        for index, remote in enumerate(self.remotes):
            for standby in standbys:
                if standby.span == remote.span and standby not in chosen.values():
                    chosen[index] = standby
                    break
        return chosen

    def prepare_standbys(self, epoch: int) -> None:
        """Get replacements ready for each stage of the chain (weights and KV cache loaded).

        For every stage, the chain the swarm would offer without it is planned; nodes of that
        chain that hold nothing for this head yet build their span now, so a loss later only
        costs the rewiring and the re-prefill.
        """
        try:
            self.view.refresh()
        except Exception as e:  # noqa: BLE001  # the DHT may hiccup; try again later
            logger.debug("swarm refresh failed: %s", e)
            return
        in_chain = {r.peer_id for r in self.remotes}
        for remote in list(self.remotes):
            try:
                chain = self.plan(without=remote.peer_id)
            except ChainError:  # no alternative for this stage (yet)
                continue
            for hop in chain.stages[1:]:
                held = self._loaded().get(hop.peer_id)
                if hop.peer_id in in_chain or held is not None:
                    continue
                try:
                    standby = self._ready(hop)
                except Exception as e:  # noqa: BLE001  # left out by _ready; not fatal
                    logger.warning("Could not prepare %s as a standby: %s", hop, e)
                    continue
                try:
                    standby.start(epoch, "", self.head.stage_init_timeout, standby=True)
                except Exception as e:  # noqa: BLE001
                    standby.close()
                    self.exclude(hop.peer_id, f"standby start failed: {e}")
                    continue
                self._standby[hop.peer_id] = standby
                logger.info("Standby for %s: %s", remote, standby)

    def shutdown(self) -> None:
        for remote in self.held():
            remote.close()
        if self._view is not None:
            self._view.shutdown()
