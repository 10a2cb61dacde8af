"""Where a stage sends one head's steps, per epoch: the head's next hop (mirrored to its hot
standby, if it has one), its result stream, or nowhere on a hot standby; and how a head's use
of the stage reads in ``/status``.

:class:`~molink.engine.stage_host.StageHost` decides when (``StartStage``, a head leaving);
this module builds and closes each :class:`~molink.core.head_session.HeadSession`'s links.
"""

from __future__ import annotations

import hashlib
from typing import Any

from vllm.logger import init_logger

from molink.comm import codec
from molink.comm.links import NextHopLink, ResultStream, standby_link
from molink.core.head_session import HeadSession
from molink.core.hot_standby import KVValidity, StandbyMirror, StandbySink
from molink.engine.stage_engine import StageEngine
from molink.security.swarm_security import SwarmSecurity

logger = init_logger(__name__)


def wire_next_hop(
    session: HeadSession,
    results: ResultStream,
    next_address: str,
    mirror_address: str,
    security: SwarmSecurity,
) -> Any:
    """The sink of ``session``'s steps: a link to ``next_address`` (mirrored to the hot standby
    at ``mirror_address``, if any), or ``results`` on the last stage. Sets its ``next_link``."""
    if not next_address:
        return results
    assert session.config is not None
    wire = codec.WireFormat.from_names(session.config.wire_dtype, session.config.wire_compression)
    sink: Any = NextHopLink(
        next_address,
        wire,
        on_broken=lambda reason: results.report(f"lost the next stage {next_address} ({reason})"),
        security=security,
    )
    if mirror_address:
        sink = StandbyMirror(sink, standby_link(mirror_address, wire, security))
    session.next_link = sink
    return sink


def stand_by_hot(
    engine: StageEngine, session: HeadSession, epoch: int, span: tuple[int, int], block_size: int
) -> None:
    """Make this stage ``session``'s hot standby for ``epoch``: it computes the steps mirrored to
    it into the head's claimed blocks and sends nothing on (what it knew, it keeps)."""
    assert session.region is not None
    name = f"layers {span[0]}-{span[1]} for head {session.label or '?'}"
    if session.hot is None:
        session.hot = KVValidity(block_size, name)
    session.hot.follow()
    engine.start_epoch(session, epoch, StandbySink(session.hot))
    logger.info(
        "Hot standby for %s, epoch %d: computing the steps the stage before it mirrors (%d KV "
        "blocks)",
        name,
        epoch,
        session.region.blocks,
    )


def close_links(session: HeadSession) -> None:
    """Close ``session``'s next hop and result stream."""
    if session.next_link is not None:
        session.next_link.close()
        session.next_link = None
    if session.results is not None:
        session.results.close()
        session.results = None


def describe(session: HeadSession, engine: StageEngine | None, block_bytes: int) -> dict | None:
    """``session`` as ``/status`` lists it (no secrets); None when it holds no KV blocks."""
    region, link = session.region, session.next_link
    if region is None:
        return None
    return {
        "head": session.label,
        "session": hashlib.sha256(session.id.encode()).hexdigest()[:12],
        "epoch": session.epoch,
        "kv_blocks": region.blocks,
        "kv_bytes": region.blocks * block_bytes,
        "kv_block_runs": region.runs(),
        "requests": engine.requests_of(session.id) if engine else 0,
        "hot_standby": session.hot is not None,
        "next_hop": link.stats() if link else None,
    }
