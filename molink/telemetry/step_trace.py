"""Where each pipeline step's time goes: ``--step-trace PATH`` on the head, and its breakdown.

With the flag, the head writes one JSON line per step that computed tokens:

* ``schedule_ms`` (the scheduler's ``schedule()``), ``encode_ms`` (the executor encoding the
  scheduler output for the wire), ``update_ms`` (``update_from_output``), ``round_trip_ms``
  (from handing the step to stage 0 to its sampled tokens being back);
* per stage, in chain order: ``arrived`` and ``done`` (the stage's wall clock when the step
  reached it and when its compute finished), ``decode_ms``, ``wait_ms`` (queued behind earlier
  steps), ``compute_ms``;
* ``result`` (the head's wall clock when the sampled tokens arrived).

The wire time of a hop is the next stage's ``arrived`` minus this stage's ``done`` (it includes
encoding and the sender's queue); across machines that needs synchronized clocks (NTP).
``python -m molink.telemetry.step_trace PATH`` prints the mean breakdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Attribute on a ModelRunnerOutput carrying the executor's part of a step's trace.
TRACE_ATTR = "molink_trace"


def executor_trace(
    step_id: int, tokens: int, encode_s: float, timings: Iterable[Any], round_trip_s: float
) -> dict[str, Any]:
    """The executor's part of a step's trace record; ``timings``: one
    :class:`~molink.core.micro_batching.StageTiming` per stage, in chain order."""
    return {
        "step": step_id,
        "tokens": tokens,
        "encode_ms": encode_s * 1e3,
        "stages": [
            {
                "arrived": t.arrived_unix,
                "done": t.done_unix,
                "decode_ms": t.decode_s * 1e3,
                "wait_ms": t.wait_s * 1e3,
                "compute_ms": t.compute_s * 1e3,
            }
            for t in timings
        ],
        "result": time.time(),
        "round_trip_ms": round_trip_s * 1e3,
    }


class StepTraceWriter:
    """Appends step records to a JSON-lines file (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        # Line-buffered: vLLM may kill the engine process without letting it flush.
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 (closed in close())
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


def phases(record: dict[str, Any]) -> dict[str, float]:
    """One step's time by phase (ms), in the order the step meets them."""
    out = {"head schedule": record["schedule_ms"], "head encode": record["encode_ms"]}
    stages = record["stages"]
    for i, stage in enumerate(stages):
        if i:
            out[f"hop {i - 1}->{i}"] = (stage["arrived"] - stages[i - 1]["done"]) * 1e3
        out[f"stage {i} decode"] = stage["decode_ms"]
        out[f"stage {i} queue"] = stage["wait_ms"]
        out[f"stage {i} compute"] = stage["compute_ms"]
    if stages:
        out["result return"] = (record["result"] - stages[-1]["done"]) * 1e3
        in_pipeline = (record["result"] - stages[0]["arrived"]) * 1e3
        out["head other"] = max(0.0, record["round_trip_ms"] - in_pipeline)
    out["head update_from_output"] = record["update_ms"]
    return out


def breakdown(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Mean milliseconds per phase over ``records`` (steps of the longest chain seen)."""
    per_phase: dict[str, list[float]] = {}
    for record in records:
        for name, ms in phases(record).items():
            per_phase.setdefault(name, []).append(ms)
    return {name: statistics.fmean(values) for name, values in per_phase.items()}


def read(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m molink.telemetry.step_trace",
        description="Mean time per phase of the steps in a --step-trace file.",
    )
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    records = read(args.path)
    if not records:
        sys.stderr.write(f"{args.path}: no steps\n")
        return 1
    tokens = statistics.fmean(r["tokens"] for r in records)
    sys.stdout.write(f"{len(records)} steps, {tokens:.1f} tokens per step on average\n")
    for name, ms in breakdown(records).items():
        sys.stdout.write(f"  {name:<28}{ms:9.2f} ms\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
