"""The KV cache of a stage shared by several heads: one contiguous region of blocks per head.

A stage allocates its KV cache once, for all the memory it has. Each head that uses the stage
claims a region of it: as many blocks as the head planned, at some offset. The head's block ids
``0 .. blocks-1`` are the stage's ``offset .. offset+blocks-1`` (see
:mod:`molink.core.head_session`). Regions never overlap, so no head reaches another's KV.
"""

from __future__ import annotations

from dataclasses import dataclass


class NoRoom(ValueError):
    """A head asked for more KV blocks than the stage has free."""


@dataclass(frozen=True)
class Region:
    """Blocks ``offset .. offset + blocks - 1`` of the stage's KV cache."""

    offset: int
    blocks: int


class KVRegions:
    """First-fit allocation of block regions, one per head session."""

    def __init__(self, total_blocks: int) -> None:
        self.total_blocks = total_blocks
        self._claims: dict[str, Region] = {}

    def claim(self, owner: str, blocks: int) -> Region:
        """A region of ``blocks`` blocks for ``owner`` (replacing any it held).

        Raises :class:`NoRoom` when no free run of blocks is long enough.
        """
        if blocks < 1:
            raise ValueError(f"a region needs at least one block, got {blocks}")
        held = self._claims.get(owner)
        if held is not None and held.blocks == blocks:
            return held
        for start, length in self._free_runs(owner):
            if length >= blocks:
                self._claims[owner] = Region(start, blocks)
                return self._claims[owner]
        others = len(self._claims) - (owner in self._claims)
        raise NoRoom(
            f"this stage has room for {self.room(owner)} KV blocks (of {self.total_blocks}; "
            f"{others} other head(s) hold the rest); the plan needs {blocks}"
        )

    def release(self, owner: str) -> None:
        self._claims.pop(owner, None)

    def held(self, owner: str) -> Region | None:
        return self._claims.get(owner)

    def room(self, owner: str | None = None) -> int:
        """The largest region ``owner`` could claim now (its own region counts as free)."""
        return max((length for _, length in self._free_runs(owner)), default=0)

    def free_blocks(self) -> int:
        """Blocks no head holds."""
        return self.total_blocks - sum(r.blocks for r in self._claims.values())

    def owners(self) -> dict[str, Region]:
        return dict(self._claims)

    def _free_runs(self, owner: str | None) -> list[tuple[int, int]]:
        """(start, length) of every run of blocks not held by anyone but ``owner``."""
        runs, start = [], 0
        others = sorted((r for o, r in self._claims.items() if o != owner), key=lambda r: r.offset)
        for region in others:
            if region.offset > start:
                runs.append((start, region.offset - start))
            start = region.offset + region.blocks
        if start < self.total_blocks:
            runs.append((start, self.total_blocks - start))
        return runs
