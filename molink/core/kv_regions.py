"""The KV cache of a stage shared by several heads: one region of blocks per head, and fair shares.

A stage allocates its KV cache once, for all the memory it has. Each head that uses the stage
claims a region of it: as many blocks as the head planned. The head's block id ``i`` is the
stage's block ``region.ids[i]`` (see :mod:`molink.core.head_session`). Regions never overlap, so no
head reaches another's KV; they need not be contiguous, so blocks freed anywhere can be reused.

**Fair share.** With ``n`` heads holding regions, a head that arrives is offered the free blocks
if they are at least a fair share (``total // (n + 1)``), else the fair share itself: the heads
holding more than their share then give back blocks (:meth:`KVRegions.shrinks_for`), largest
first, each down to the fair share. A share that can't hold one request of the heads'
``--max-model-len`` (``min_blocks``) is not offered: the head is offered only the free blocks, and
refuses them with the reason.

**Growing back.** When a head leaves, each head holding less than the new fair share
(``total // n`` of the ``n`` left) is offered that share (:meth:`KVRegions.growth_offers`); a head
takes what its own KV cache can hold of it.
"""

from __future__ import annotations

from dataclasses import dataclass


class NoRoom(ValueError):
    """A head asked for more KV blocks than the stage has free."""


@dataclass(frozen=True)
class Region:
    """The stage's KV blocks a head uses: the head's block id ``i`` is the stage's ``ids[i]``."""

    ids: tuple[int, ...]

    @property
    def blocks(self) -> int:
        return len(self.ids)

    def runs(self) -> list[tuple[int, int]]:
        """``(first block, length)`` of each contiguous run of the region, in the head's order."""
        runs: list[tuple[int, int]] = []
        for b in self.ids:
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((b, 1))
        return runs


class KVRegions:
    """Allocation of the stage's blocks to head sessions (lowest free blocks first)."""

    def __init__(self, total_blocks: int) -> None:
        self.total_blocks = total_blocks
        self._claims: dict[str, Region] = {}
        # Heads waiting for others to shrink: they count among the holders for fair shares.
        self.waiting: set[str] = set()

    def claim(self, owner: str, blocks: int) -> Region:
        """A region of ``blocks`` blocks for ``owner``.

        A region ``owner`` holds already is kept up to ``blocks`` (a smaller claim gives back its
        last blocks; a larger one adds free blocks). Raises :class:`NoRoom` when too few blocks
        are free.
        """
        if blocks < 1:
            raise ValueError(f"a region needs at least one block, got {blocks}")
        held = self._claims.get(owner)
        kept = held.ids[:blocks] if held is not None else ()
        if len(kept) < blocks:
            if self.room(owner) < blocks:
                others = len(self._claims) - (owner in self._claims)
                raise NoRoom(
                    f"this stage has room for {self.room(owner)} KV blocks (of "
                    f"{self.total_blocks}; {others} other head(s) hold the rest); the plan "
                    f"needs {blocks}"
                )
            kept += tuple(self._free_ids(blocks - len(kept)))
        self._claims[owner] = Region(kept)
        return self._claims[owner]

    def release(self, owner: str) -> None:
        self._claims.pop(owner, None)

    def held(self, owner: str) -> Region | None:
        return self._claims.get(owner)

    def room(self, owner: str | None = None) -> int:
        """The most blocks ``owner`` could claim now (its own region counts as free)."""
        own = self._claims.get(owner) if owner is not None else None
        return self.free_blocks() + (own.blocks if own is not None else 0)

    def free_blocks(self) -> int:
        """Blocks no head holds."""
        return self.total_blocks - sum(r.blocks for r in self._claims.values())

    def owners(self) -> dict[str, Region]:
        return dict(self._claims)

    def fair_share(self, owner: str) -> int:
        """Blocks each head would hold if ``owner`` and every other holder shared evenly."""
        others = len((set(self._claims) | self.waiting) - {owner})
        return self.total_blocks // (others + 1)

    def offer(self, owner: str, min_blocks: int) -> int:
        """The blocks ``owner`` may plan for: what is free, or else its fair share when that
        holds ``min_blocks`` (other heads then shrink when it claims). A head holding a region
        already may grow into free blocks up to its fair share, and keeps what it holds."""
        room, share = self.room(owner), self.fair_share(owner)
        held = self._claims.get(owner)
        if held is not None:
            return max(held.blocks, min(room, share))
        return share if room < share and share >= min_blocks else room

    def shrinks_for(self, owner: str, blocks: int) -> dict[str, int]:
        """The other heads to shrink, and to how many blocks, so that ``owner`` can claim
        ``blocks`` (at most its fair share): the largest holders first, each down to the fair
        share. Raises :class:`NoRoom` when even that can't free enough.
        """
        missing = blocks - self.room(owner)
        if missing <= 0:
            return {}
        share = self.fair_share(owner)
        if blocks > share:
            raise NoRoom(
                f"the plan needs {blocks} KV blocks, more than this head's fair share of "
                f"{share} (of {self.total_blocks})"
            )
        shrinks: dict[str, int] = {}
        held = sorted(
            (-r.blocks, o) for o, r in self._claims.items() if o != owner and r.blocks > share
        )
        for negative_size, other in held:
            if missing <= 0:
                break
            shrinks[other] = share
            missing -= -negative_size - share
        # Enough: once every holder is down to the share, ``total - n * share >= share`` is free.
        return shrinks

    def growth_offers(self) -> dict[str, int]:
        """The heads holding less than their fair share among the holders, and that share:
        what each may grow to (after a head left)."""
        if not self._claims:
            return {}
        share = self.total_blocks // len(set(self._claims) | self.waiting)
        return {o: share for o, r in self._claims.items() if r.blocks < share}

    def _free_ids(self, count: int) -> list[int]:
        """The ``count`` lowest block ids nobody holds."""
        taken = {b for r in self._claims.values() for b in r.ids}
        found: list[int] = []
        for b in range(self.total_blocks):
            if b not in taken:
                found.append(b)
                if len(found) == count:
                    break
        return found
