"""A shared stage keeps each head to its own requests."""

from __future__ import annotations

import pytest

from molink.core.request_owners import NotYours, RequestOwners


def test_a_head_names_only_its_own_or_new_requests() -> None:
    owners = RequestOwners()
    owners.admit("a", {"r1", "r2"}, finished=set())
    owners.admit("b", {"r3"}, finished=set())
    with pytest.raises(NotYours):  # finishing, scheduling or resuming: all refused
        owners.admit("b", {"r3", "r1"}, finished={"r1"})
    assert (owners.count("a"), owners.count("b")) == (2, 1)  # the refused step changed nothing
    owners.admit("a", {"r1", "r2"}, finished={"r1"})
    owners.admit("b", {"r1"}, finished=set())  # a finished id is free again
    assert (owners.count("a"), owners.count("b")) == (1, 2)


def test_forgetting_a_head_releases_its_requests_only() -> None:
    owners = RequestOwners()
    owners.admit("a", {"r1", "r2"}, finished=set())
    owners.admit("b", {"r3"}, finished=set())
    assert owners.forget("a", ["r2", "r3"]) == {"r2"}
    assert owners.forget("a") == {"r1"}
    assert owners.count("a") == 0 and owners.count("b") == 1
    owners.admit("c", {"r1", "r2"}, finished=set())
