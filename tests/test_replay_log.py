"""The replay log (molink.core.replay_log) and the replay handshake (molink.core.replay_plan)."""

from __future__ import annotations

import threading

import torch

from molink.core.replay_log import ADD_FIRST_ARCHITECTURES, LogForm, ReplayLog
from molink.core.replay_plan import ReplayHandshake, ReplayItem

HIDDEN = 4


def rows(start: int, num: int) -> dict[str, torch.Tensor]:
    """Rows whose values are their positions (each [num, HIDDEN])."""
    values = torch.arange(start, start + num, dtype=torch.float32)[:, None].expand(num, HIDDEN)
    return {"hidden_states": values.clone(), "residual": -values}


def test_rows_come_back_in_position_order_across_chunks():
    log = ReplayLog(1 << 20)
    log.record("a", 0, rows(0, 5))
    log.record("a", 5, rows(5, 1))
    log.record("a", 6, rows(6, 3))
    assert log.length("a") == 9
    got = log.rows("a", 3, 8)
    assert got is not None
    assert got["hidden_states"][:, 0].tolist() == [3, 4, 5, 6, 7]
    assert got["residual"][:, 0].tolist() == [-3, -4, -5, -6, -7]
    assert log.rows("a", 0, 10) is None  # not all logged
    assert log.nbytes == 9 * 2 * HIDDEN * 4


def test_the_log_copies_what_it_is_given():
    log = ReplayLog(1 << 20)
    given = rows(0, 2)
    log.record("a", 0, given)
    given["hidden_states"].fill_(99)
    assert log.rows("a", 0, 2)["hidden_states"][:, 0].tolist() == [0, 1]


def test_a_restart_replaces_the_rows_after_it():
    """A preempted request recomputes from an earlier position: the new rows replace the old."""
    log = ReplayLog(1 << 20)
    log.record("a", 0, rows(0, 6))
    log.record("a", 3, {k: v + 100 for k, v in rows(3, 2).items()})
    assert log.length("a") == 5
    assert log.rows("a", 0, 5)["hidden_states"][:, 0].tolist() == [0, 1, 2, 103, 104]
    assert log.nbytes == 5 * 2 * HIDDEN * 4


def test_a_gap_drops_the_request_until_it_starts_again():
    log = ReplayLog(1 << 20)
    log.record("a", 0, rows(0, 2))
    log.record("a", 5, rows(5, 1))  # positions 2-4 never came
    assert log.length("a") == 0 and len(log) == 0
    log.record("a", 6, rows(6, 1))
    assert len(log) == 0
    log.record("a", 0, rows(0, 1))
    assert log.length("a") == 1


def test_finished_requests_are_dropped_and_the_cap_drops_the_largest():
    row_bytes = 2 * HIDDEN * 4
    log = ReplayLog(10 * row_bytes)
    log.record("small", 0, rows(0, 3))
    log.record("large", 0, rows(0, 6))
    log.record("small", 3, rows(3, 1))
    assert log.nbytes == 10 * row_bytes
    log.record("new", 0, rows(0, 2))  # 12 rows: over the cap
    assert log.length("large") == 0 and log.length("small") == 4 and log.length("new") == 2
    log.drop({"small", "unknown"})
    assert len(log) == 1 and log.nbytes == 2 * row_bytes


def test_a_folded_log_keeps_one_sum_and_replays_it_with_a_zero_residual():
    """Half the memory: hidden_states + residual, replayed as (sum, 0)."""
    log = ReplayLog(1 << 20, form=LogForm(fold=True))
    given = {k: v * 1.5 for k, v in rows(0, 4).items()}
    given["residual"] = given["residual"] + 0.25
    log.record("a", 0, given)
    assert log.nbytes == 4 * HIDDEN * 4  # one float32 value per hidden unit and token
    assert log.positions == 4
    got = log.rows("a", 1, 3)
    assert got is not None and set(got) == {"hidden_states", "residual"}
    assert torch.equal(got["hidden_states"], (given["hidden_states"] + given["residual"])[1:3])
    assert torch.equal(got["residual"], torch.zeros(2, HIDDEN))


def test_a_folded_log_keeps_16_bit_rows_whole():
    """A 16-bit model's layers norm the unrounded float32 sum: the log keeps both rows."""
    log = ReplayLog(1 << 20, form=LogForm(fold=True))
    given = {k: v.to(torch.bfloat16) for k, v in rows(0, 3).items()}
    log.record("a", 0, given)
    assert log.nbytes == 3 * 2 * HIDDEN * 2
    assert torch.equal(log.rows("a", 0, 3)["residual"], given["residual"])


def test_a_narrow_wire_keeps_rows_as_the_wire_carried_them():
    log = ReplayLog(1 << 20, form=LogForm(dtype=torch.float16))
    given = {k: v / 3 for k, v in rows(0, 3).items()}
    log.record("a", 0, given)
    assert log.nbytes == 3 * 2 * HIDDEN * 2
    got = log.rows("a", 0, 3)
    for name, t in given.items():
        assert got[name].dtype == torch.float16 and torch.equal(got[name], t.to(torch.float16))


def test_the_form_of_a_boundary():
    assert LogForm.for_boundary(["LlamaForCausalLM"], None) == LogForm(fold=True)
    assert LogForm.for_boundary(["Qwen3ForCausalLM"], torch.float32).fold
    narrow = LogForm.for_boundary(["Qwen3ForCausalLM"], torch.float16)
    assert narrow == LogForm(fold=False, dtype=torch.float16)  # the wire already rounded both
    assert not LogForm.for_boundary(["GraniteForCausalLM"], None).fold  # not known to add first
    assert not LogForm.for_boundary([], None).fold


def test_a_zero_residual_after_the_sum_is_exact_through_vllm_rms_norm():
    """What folding relies on: vLLM's add-and-norm (its native form and the CPU kernel) gives
    the same bits for (h, r) as for (h + r, 0), the normed rows and the new residual."""
    from vllm import _custom_ops as ops
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    with set_current_vllm_config(VllmConfig()):
        norm = RMSNorm(576, eps=1e-5)
    gen = torch.Generator().manual_seed(0)
    norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    h = torch.randn(64, 576, generator=gen) * 3  # [tokens, hidden]
    r = torch.randn(64, 576, generator=gen) * 30
    direct = norm.forward_native(h, r.clone())
    folded = norm.forward_native(h + r, torch.zeros_like(h))
    assert all(torch.equal(a, b) for a, b in zip(direct, folded, strict=True))
    x1, r1, x2, r2 = h.clone(), r.clone(), h + r, torch.zeros_like(h)
    ops.fused_add_rms_norm(x1, r1, norm.weight.data, 1e-5)  # in place
    ops.fused_add_rms_norm(x2, r2, norm.weight.data, 1e-5)
    assert torch.equal(x1, x2) and torch.equal(r1, r2)
    assert "LlamaForCausalLM" in ADD_FIRST_ARCHITECTURES


def test_handshake_plan_then_outcome():
    handshake = ReplayHandshake()
    plan = {"a": ReplayItem("a", (1, 2), (7,), 2)}
    assert handshake.offer(3, plan)
    assert handshake.take(3, 0.0) == (True, plan)
    assert handshake.take(3, 0.0) == (False, None)  # taken once
    assert handshake.outcome(3) == (False, frozenset())  # not finished yet
    handshake.finish(3, True, frozenset({"b"}))
    assert handshake.take(3, 5.0) == (True, None)  # a retry of the epoch gets no plan again
    assert handshake.outcome(3) == (True, frozenset({"b"}))
    assert handshake.outcome(3) == (False, frozenset())  # read once


def test_handshake_waits_for_the_scheduler_and_refuses_a_late_offer():
    handshake = ReplayHandshake()
    threading.Timer(0.05, handshake.offer, args=(1, None)).start()
    assert handshake.take(1, 5.0) == (True, None)  # the scheduler declined: nothing to replay
    assert handshake.take(2, 0.0) == (False, None)  # no answer: given up
    assert not handshake.offer(2, {})  # too late: the scheduler must recompute
