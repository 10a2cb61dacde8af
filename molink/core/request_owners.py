"""Which head each request on a stage belongs to.

A stage that several heads share keeps all their requests in one persistent batch (so their
steps can share a forward pass). Request ids come from the heads, so the stage checks each step
before it runs: a head may name only requests that are its own or that no head holds, and a
request it names becomes its own until it finishes. A head therefore can't finish, resume or
schedule another head's request, even knowing its id.
"""

from __future__ import annotations

from collections.abc import Iterable


class NotYours(ValueError):
    """A step names a request another head holds on this stage."""


class RequestOwners:
    """Request id -> the session of the head that holds it here (read from any thread)."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}
        self._held: dict[str, set[str]] = {}

    def admit(self, head: str, named: Iterable[str], finished: Iterable[str]) -> None:
        """Take the requests a step of ``head`` names; forget the ones it finishes.

        Raises :class:`NotYours` (and changes nothing) when it names another head's request.
        """
        named = set(named)
        for req_id in named:
            owner = self._owner.get(req_id, head)
            if owner != head:
                raise NotYours(f"request {req_id!r} belongs to another head on this stage")
        finished = set(finished)
        held = self._held.setdefault(head, set())
        for req_id in named - finished:
            self._owner[req_id] = head
            held.add(req_id)
        for req_id in finished & named:
            if self._owner.pop(req_id, None) is not None:
                held.discard(req_id)

    def forget(self, head: str, req_ids: Iterable[str] | None = None) -> set[str]:
        """Release ``req_ids`` of ``head`` (all of them when None); returns the ones released."""
        held = self._held.get(head, set())
        released = set(held) if req_ids is None else held & set(req_ids)
        for req_id in released:
            del self._owner[req_id]
        held -= released
        if not held:
            self._held.pop(head, None)
        return released

    def count(self, head: str) -> int:
        """How many requests ``head`` holds here."""
        return len(self._held.get(head, ()))
