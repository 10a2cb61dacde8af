"""The step trace's breakdown: where a step's time went, phase by phase."""

from __future__ import annotations

import subprocess
import sys

import pytest

from molink.telemetry.step_trace import StepTraceWriter, breakdown, phases, read

RECORD = {
    "step": 7,
    "tokens": 32,
    "schedule_ms": 1.0,
    "encode_ms": 0.5,
    "update_ms": 2.0,
    "round_trip_ms": 60.0,
    # stage 0 (the head) computes 10 ms; 20 ms on the wire; stage 1 computes 15 ms; 10 ms back.
    "stages": [
        {"arrived": 100.000, "done": 100.010, "decode_ms": 0.0, "wait_ms": 0.0, "compute_ms": 10},
        {"arrived": 100.030, "done": 100.050, "decode_ms": 1.0, "wait_ms": 4.0, "compute_ms": 15},
    ],
    "result": 100.060,
}


def test_phases_of_one_step():
    got = phases(RECORD)
    assert got["hop 0->1"] == pytest.approx(20.0)
    assert got["result return"] == pytest.approx(10.0)
    assert got["stage 1 queue"] == 4.0 and got["stage 1 compute"] == 15
    assert got["head other"] == pytest.approx(0.0)  # 60 ms round trip, 60 ms in the pipeline
    assert list(got)[:2] == ["head schedule", "head encode"]
    assert list(got)[-1] == "head update_from_output"


def test_written_trace_reads_back_and_summarizes(tmp_path):
    path = tmp_path / "trace.jsonl"
    writer = StepTraceWriter(path)
    writer.write(RECORD)
    writer.write({**RECORD, "stages": RECORD["stages"][:1], "result": 100.02})
    writer.close()
    records = read(path)
    assert len(records) == 2
    assert breakdown(records)["stage 0 compute"] == 10
    out = subprocess.run(
        [sys.executable, "-m", "molink.telemetry.step_trace", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "2 steps, 32.0 tokens per step" in out and "hop 0->1" in out
