"""When a head moves to less loaded replicas: the hysteresis, and who moves first."""

from __future__ import annotations

from molink.core.rebalance import CONFIRM_S, GAIN, RebalancePolicy, first_in_line


def test_a_head_moves_only_after_the_saving_lasted_and_its_chain_served_long_enough() -> None:
    policy = RebalancePolicy(after_s=30.0)
    policy.wired(now=0.0)
    cheap = 1.0 * (1 - GAIN) - 0.01
    assert not policy.should_move(1.0, cheap, now=1.0)  # the saving starts
    assert not policy.should_move(1.0, cheap, now=1.0 + CONFIRM_S)  # the chain is too new
    assert policy.should_move(1.0, cheap, now=30.0)
    # A blip: the saving must last CONFIRM_S again.
    assert not policy.should_move(1.0, 0.9, now=31.0)
    assert not policy.should_move(1.0, cheap, now=32.0)
    assert policy.should_move(1.0, cheap, now=32.0 + CONFIRM_S)
    # A new chain starts the clock again; no offer, no move; 0 disables.
    policy.wired(now=100.0)
    assert not policy.should_move(1.0, cheap, now=100.0 + 2 * CONFIRM_S)
    assert not policy.should_move(1.0, None, now=200.0)
    off = RebalancePolicy(after_s=0.0)
    assert not any(off.should_move(1.0, 0.0, now=t) for t in (0.0, 1e6))


def test_one_head_per_node_is_first_in_line() -> None:
    heads = ["12D3KooWA", "12D3KooWB", "12D3KooWC"]
    first = [h for h in heads if first_in_line("12D3KooWnode", heads, h)]
    assert len(first) == 1
    assert not first_in_line("12D3KooWnode", heads, "12D3KooWD")  # not listed (yet)
    # Another node may put another head first: the order is per node.
    orders = {
        next(h for h in heads if first_in_line(f"12D3KooWnode{i}", heads, h)) for i in range(20)
    }
    assert len(orders) > 1
