"""A hot standby (``--hot-standby``): a replica of a chain's span that computes every step beside
the serving node, keeps its KV cache, and sends nothing on.

The stage before the span mirrors each step to the standby (:class:`StandbyMirror`), which runs
it into a :class:`StandbySink`. When the serving node is lost and the standby takes the span, the
head asks it what its KV cache holds and replays only the positions it lacks
(:mod:`molink.executor.span_replay`): usually none, so a loss costs the rewiring and the steps in
flight.

What the standby's blocks hold is tracked per block (:class:`KVValidity`), from the steps it ran:
how many leading positions of each block hold what the serving node holds. A request's KV is
only right where every earlier position of it is, so a step that computed positions after a
gap (a request the standby first met mid-way, e.g. resumed when it became hot) marks them as
unknown. Anything that could make the standby miss a step (its mirror broke or fell behind, a
step failed on it, it could not run every step of an epoch before the next one) clears what it
knows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger

from molink.core.step import StageOutput, StepWork

logger = init_logger(__name__)

#: Steps a mirror may hold back before it gives up on a standby that can't keep up.
MIRROR_BACKLOG = 64


@dataclass(frozen=True)
class Hot:
    """The hot-standby part of a head's ``StartStage`` call."""

    standby: bool = False  # (a standby) compute the steps mirrored to it, into claimed blocks
    mirror_address: str = ""  # (a serving stage) mirror every step to the standby there
    # (a hot standby changing epoch) the epoch it followed and the last step the head sent in it
    drain: tuple[int, int] = (0, 0)
    # (a hot standby changing epoch) the stage before it was lost: it may have missed steps
    forget: bool = False


def valid_prefix(blocks: Sequence[int], held: Callable[[int], int], block_size: int) -> int:
    """How many leading positions of a request whose KV lives in ``blocks`` (in order) are held,
    where ``held(b)`` is how many leading positions block ``b`` holds."""
    valid = 0
    for block in blocks:
        held_here = held(block)
        valid += held_here
        if held_here < block_size:
            break
    return valid


def held_positions(snapshot: Sequence[int]) -> Callable[[int], int]:
    """``held`` for :func:`valid_prefix` from a :meth:`KVValidity.snapshot` (0 past its end)."""
    return lambda block: snapshot[block] if 0 <= block < len(snapshot) else 0


class KVValidity:
    """How many leading positions of each KV block of a hot standby hold what the serving node's
    same block holds (thread-safe: the compute thread writes, the node's RPC threads clear)."""

    def __init__(self, block_size: int, name: str = "") -> None:
        """``name``: what the standby computes, for its log lines."""
        self.block_size = block_size
        self.name = name
        self._filled: dict[int, int] = {}  # block id -> leading positions held
        self._lock = threading.Condition()
        self.epoch = -1  # of the steps counted in last_step
        self.last_step = 0  # the last step of ``epoch`` this standby ran
        self.lost = False  # cleared since it last started to follow an epoch

    def written(
        self, epoch: int, step_id: int, entries: Iterable[tuple[int, int, Sequence[int]]]
    ) -> None:
        """Step ``step_id`` of ``epoch`` ran: each entry is (first position, positions, the
        request's block ids) of a request it computed."""
        size = self.block_size
        with self._lock:
            for start, num, blocks in entries:
                end = start + num
                first, last = start // size, min(-(-end // size), len(blocks))
                if start <= valid_prefix(blocks, self._held, size):  # held up to ``end`` now
                    for i in range(first, last):
                        self._filled[blocks[i]] = min(size, end - i * size)
                    for block in blocks[last:]:  # positions after ``end`` came from another past
                        self._filled[block] = 0
                else:  # after a gap: what it wrote is unknown
                    for i in range(first, last):
                        held = self._filled.get(blocks[i], 0)
                        self._filled[blocks[i]] = min(held, max(0, start - i * size))
            if epoch != self.epoch or step_id > self.last_step:
                self.epoch, self.last_step = epoch, step_id
            self._lock.notify_all()

    def _held(self, block: int) -> int:
        return self._filled.get(block, 0)

    def wait_for(self, epoch: int, step_id: int, timeout: float) -> bool:
        """Wait until step ``step_id`` of ``epoch`` ran here (0: nothing to wait for); False
        when it did not within ``timeout`` s, or this standby follows another epoch."""
        with self._lock:
            if step_id == 0:
                return not self.lost
            return (
                self._lock.wait_for(
                    lambda: self.lost or (self.epoch == epoch and self.last_step >= step_id),
                    timeout,
                )
                and not self.lost
            )

    def drain(self, epoch: int, step_id: int, timeout: float) -> None:
        """Before the standby changes epoch: wait until step ``step_id`` of ``epoch`` (the last
        one the head sent in the epoch it followed) ran here, or forget what it knows."""
        if not self.wait_for(epoch, step_id, timeout):
            self.clear(f"it did not run the steps of epoch {epoch} up to step {step_id}")

    def follow(self) -> None:
        """The standby starts to follow a new epoch (what it knows, it keeps)."""
        with self._lock:
            self.lost = False

    def clear(self, why: str) -> None:
        """Forget what every block holds: it may have missed steps of the epoch it follows
        (``why``, logged)."""
        logger.warning(
            "Hot standby for %s: %s; what its KV cache holds is forgotten", self.name, why
        )
        with self._lock:
            self._filled.clear()
            self.lost = True
            self._lock.notify_all()

    def snapshot(self, block_ids: Sequence[int]) -> list[int]:
        """Leading positions held, for each of ``block_ids`` (the head's blocks, in its order)."""
        with self._lock:
            return [self._filled.get(block, 0) for block in block_ids]


class StandbySink:
    """Where a hot standby's steps go: nowhere. A step that failed on it clears what it knows
    (it may now lack KV the serving node has)."""

    def __init__(self, validity: KVValidity) -> None:
        self.validity = validity

    def emit(self, work: StepWork, output: StageOutput) -> None:
        pass

    def fail(self, work: StepWork, error: str) -> None:
        self.validity.clear(f"step {work.step_id} failed ({error})")


class StandbyMirror:
    """The sink of the stage before a hot standby's span: every step goes to the next stage and,
    except replay steps, to the standby too. A standby that falls :data:`MIRROR_BACKLOG` steps
    behind (or whose link broke, so that its steps pile up) is dropped: it gets the step that
    found it behind as a failed step, so it forgets what it holds, and its stream ends."""

    def __init__(self, primary: Any, mirror: Any) -> None:
        """``primary``, ``mirror``: :class:`~molink.comm.links.NextHopLink` to the serving node
        and to the standby."""
        self.primary = primary
        self.mirror: Any = mirror

    @property
    def address(self) -> str:
        return self.primary.address

    @property
    def last_step(self) -> int:
        return self.primary.last_step

    def stats(self) -> dict[str, Any]:
        return {**self.primary.stats(), "hot_standby": self.mirror.address if self.mirror else ""}

    def emit(self, work: StepWork, output: StageOutput) -> None:
        self.primary.emit(work, output)
        if not work.replay and self._keeps_up(work):
            self.mirror.emit(work, output)

    def fail(self, work: StepWork, error: str) -> None:
        self.primary.fail(work, error)
        if self._keeps_up(work):
            self.mirror.fail(work, error)

    def _keeps_up(self, work: StepWork) -> bool:
        """Whether the standby still gets steps; drops it when it fell too far behind."""
        link = self.mirror
        if link is None:
            return False
        if link.backlog() < MIRROR_BACKLOG:
            return True
        why = f"it is {MIRROR_BACKLOG} steps behind"
        logger.warning("Dropping the hot standby %s: %s", link.address, why)
        self.mirror = None
        link.fail(work, f"the stage before stopped mirroring to this hot standby: {why}")
        link.close()
        return False

    def close(self) -> None:
        self.primary.close()
        if self.mirror is not None:
            self.mirror.close()
