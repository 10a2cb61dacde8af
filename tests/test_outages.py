"""The head's record of losses and recoveries: log lines a person can follow, and events."""

from __future__ import annotations

import logging
import time

import pytest

from molink.executor.outages import OutageRecord


@pytest.fixture
def molink_logs(caplog):
    logger = logging.getLogger("molink")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="molink")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_loss_and_restore_lines_name_the_stage_cause_and_times(molink_logs):
    record = OutageRecord()
    record.restored(0, "head [0-9] -> 10.0.0.2:50052 [10-29]", 2)  # the first chain: no line
    assert "restored" not in molink_logs.text
    record.lost(
        "10.0.0.2:50052 [10-29]", "its result stream broke (UNAVAILABLE)", "lost", 1,
        oldest_unanswered=time.monotonic() - 0.5,
    )  # fmt: skip
    record.restored(1, "head [0-9] -> 10.0.0.3:50052 [10-29]", 2)
    loss, restore = molink_logs.messages[-2:]
    assert loss.startswith("Lost stage 10.0.0.2:50052 [10-29]: its result stream broke")
    assert "detected 0.5" in loss and "(epoch 1)" in loss
    assert restore.startswith(
        "Pipeline restored (epoch 1) 0.0 s after the loss was detected, by recompute: "
    )
    assert restore.endswith("10.0.0.3:50052 [10-29]")
    kinds = [(e["kind"], e["epoch"]) for e in record.recent()]
    assert kinds == [("restore", 0), ("loss", 1), ("restore", 1)]
    assert record.recent()[1]["detect_s"] >= 0.5


def test_a_loss_with_nothing_in_flight_says_so(molink_logs):
    OutageRecord().lost("", "no result within 30 s", "timeout", 3, oldest_unanswered=None)
    assert molink_logs.messages[-1] == (
        "Lost the chain: no result within 30 s; no step was in flight; recovering (epoch 3)"
    )
