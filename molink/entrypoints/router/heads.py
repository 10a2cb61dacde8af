"""The heads a router can send requests to: found in the DHT, checked at ``/ready``.

:class:`HeadDirectory` follows the heads the swarm announces (each head announces its API URL),
plus any given with ``--head URL``. Every ``poll_s`` it asks each head's ``/ready`` (and it
reads the DHT again every :data:`DISCOVER_PERIOD_S`); a head that is not ready (or not
reachable) gets no new request until it is again; one whose ``/ready`` only times out keeps its
last answer for :data:`READY_GRACE_S` (a head stepping a heavy batch is busy, not gone).
:meth:`HeadDirectory.pick` chooses the ready head with the fewest requests outstanding from this
router (then the one that got the fewest so far).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from vllm.logger import init_logger

from molink.comm.announcement import NodeAnnouncement

logger = init_logger(__name__)

#: How long a head's ``/ready`` may take to answer.
READY_TIMEOUT_S = 2.0
#: A head whose ``/ready`` times out (busy, not gone) keeps its last answer this long.
READY_GRACE_S = 10.0
#: The DHT is read this often for heads that came or went (reads cost the swarm's DHT peers CPU).
DISCOVER_PERIOD_S = 5.0


@dataclass
class Head:
    """One head's OpenAI endpoint, as this router sees it."""

    url: str  # "http://host:port"
    peer_id: str = ""  # "" for a head named on the command line
    model: str = ""
    ready: bool = False
    cause: str = "not checked yet"
    outstanding: int = 0  # requests this router has in flight on it
    sent: int = 0  # requests this router sent it
    resumed_from: int = 0  # streams continued elsewhere after this head failed them
    answered_at: float = float("-inf")  # when its /ready last answered (monotonic)
    # Set when the head stops accepting connections (it exits, or is shutting down): streams
    # still open on it are given up and continued elsewhere.
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "peer_id": self.peer_id or None,
            "model": self.model or None,
            "ready": self.ready,
            "cause": None if self.ready else self.cause,
            "outstanding": self.outstanding,
            "sent": self.sent,
            "streams_moved_off": self.resumed_from,
        }


class HeadDirectory:
    """The heads of one model, followed in the DHT and checked at ``/ready``."""

    def __init__(
        self,
        discover: Callable[[], list[NodeAnnouncement]] | None,
        static_urls: Sequence[str] = (),
        model: str | None = None,
        headers: dict[str, str] | None = None,
        poll_s: float = 1.0,
    ) -> None:
        """``discover``: reads the swarm's announcements (blocking; run in a thread), or None
        for only ``static_urls``. ``model``: only heads announcing this model name; default:
        the model most heads serve. ``headers``: sent with ``/ready`` (the heads' API key)."""
        self._discover = discover
        self._model = model
        self._headers = headers or {}
        self.poll_s = poll_s
        self.heads: dict[str, Head] = {
            url.rstrip("/"): Head(url.rstrip("/")) for url in static_urls
        }
        self._static = set(self.heads)
        self.swarm_error = ""  # why the DHT could not be read last time ("" when it could)
        self._discovered_at = float("-inf")

    # ------------------------------------------------------------------ choice
    def pick(self, exclude: Container[str] = ()) -> Head | None:
        """The ready head (not in ``exclude``, by URL) with the least outstanding work."""
        ready = [h for h in self.heads.values() if h.ready and h.url not in exclude]
        if not ready:
            return None
        return min(ready, key=lambda h: (h.outstanding, h.sent, h.url))

    def ready_heads(self) -> list[Head]:
        return [h for h in self.heads.values() if h.ready]

    def failed(self, head: Head, why: str) -> None:
        """``head`` failed a request: no new ones until its ``/ready`` says otherwise."""
        if head.ready:
            logger.warning(
                "Head %s failed (%s): sending it nothing until it is ready", head.url, why
            )
        head.ready = False
        head.cause = why

    def unavailable_cause(self) -> str:
        """Why no head can take a request (for a 503)."""
        if not self.heads:
            found = f"the swarm can't be read ({self.swarm_error})" if self.swarm_error else ""
            return found or "no head of the model is announced in the swarm"
        causes = "; ".join(f"{h.url}: {h.cause}" for h in self.heads.values())
        return f"no head is ready ({causes})"

    # ------------------------------------------------------------------ following
    async def run(self, session: aiohttp.ClientSession) -> None:
        """Refresh forever (cancel to stop)."""
        while True:
            started = time.monotonic()
            try:
                await self.refresh(session)
            except Exception as e:  # noqa: BLE001  # keep following the swarm
                logger.warning("Could not refresh the heads: %s", e)
            await asyncio.sleep(max(0.0, self.poll_s - (time.monotonic() - started)))

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        """Read the swarm's heads (every :data:`DISCOVER_PERIOD_S`), then ask every head whether
        it is ready."""
        now = time.monotonic()
        if self._discover is not None and now - self._discovered_at >= DISCOVER_PERIOD_S:
            self._discovered_at = now
            try:
                nodes = await asyncio.to_thread(self._discover)
                self.swarm_error = ""
            except Exception as e:  # noqa: BLE001  # a DHT hiccup: keep the heads known
                self.swarm_error = f"{type(e).__name__}: {e}"
            else:
                self._follow(nodes)
        await asyncio.gather(*(self._check(session, h) for h in list(self.heads.values())))

    def _follow(self, nodes: list[NodeAnnouncement]) -> None:
        heads = [n for n in nodes if n.is_head and n.api_url and n.state == "online"]
        if self._model is not None:
            heads = [n for n in heads if n.model_name == self._model]
        elif heads:
            counts: dict[str, int] = {}
            for n in heads:
                counts[n.model_hash] = counts.get(n.model_hash, 0) + 1
            common = max(sorted(counts), key=counts.__getitem__)
            heads = [n for n in heads if n.model_hash == common]
        seen = set()
        for n in heads:
            url = n.api_url.rstrip("/")
            seen.add(url)
            if url not in self.heads:
                logger.info("Found head %s (%s) at %s", n.peer_id, n.model_name, url)
                self.heads[url] = Head(url, n.peer_id, n.model_name)
        for url in [u for u in self.heads if u not in seen and u not in self._static]:
            logger.info("Head %s left the swarm", url)
            del self.heads[url]

    async def _check(self, session: aiohttp.ClientSession, head: Head) -> None:
        try:
            async with session.get(
                f"{head.url}/ready",
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=READY_TIMEOUT_S),
            ) as resp:
                body: Any = await resp.json(content_type=None)
                ready = resp.status == 200
                cause = "" if ready else str((body or {}).get("cause") or f"HTTP {resp.status}")
        except aiohttp.ClientConnectorError as e:  # nothing listens: it exited or is exiting
            ready, cause = False, f"unreachable ({type(e).__name__}: {e})"[:300]
            if not head.gone.is_set():
                logger.warning("Head %s accepts no connections: its streams move on", head.url)
            head.gone.set()
        except TimeoutError as e:  # busy rather than gone: its last answer stands a while
            if time.monotonic() - head.answered_at <= READY_GRACE_S:
                return
            ready, cause = False, f"unreachable ({type(e).__name__}: {e})"[:300]
        except (aiohttp.ClientError, ValueError) as e:
            ready, cause = False, f"unreachable ({type(e).__name__}: {e})"[:300]
        else:
            head.answered_at = time.monotonic()
        if ready and not head.ready:
            logger.info("Head %s is ready", head.url)
            if head.gone.is_set():  # back after it exited: new streams watch a new event
                head.gone = asyncio.Event()
        head.ready, head.cause = ready, cause
