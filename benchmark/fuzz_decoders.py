"""Fuzz the decoders of peer data (``molink.comm.codec``): every case must decode or be refused.

    python -m benchmark.fuzz_decoders                          # 10,000 cases per decoder
    python -m benchmark.fuzz_decoders --cases 500 --seed 7 --out /tmp/fuzz.json

The decoders, cases and the oracle are the fuzz corpus, ``tests/fuzz_corpus.py``: for each
decoder its hand-made gadgets, then ``--cases`` seeded cases (random bytes, mutated valid
payloads and, for tensor messages, lying ones), each run under ``tracemalloc``. A case is
``decoded``, ``rejected`` (a ``pickle.UnpicklingError`` or ``ValueError``, or protobuf's
``DecodeError`` for a message that doesn't parse) or a ``crash`` (anything else), and its peak
traced allocation must stay within the corpus's ``allocation_bound``. Reported per decoder:
cases, decoded, rejected by exception type, crashes and cases over the bound (both must be 0),
the largest peak allocation and peak per justified byte (the message, plus what its zlib parts
inflate to), and the process's max RSS after the decoder's cases. JSON with ``--out``; a
Markdown table on stdout. The tests (``tests/test_codec_fuzz.py``) run the same corpus through
Hypothesis with fewer cases.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from molink.comm import pickle_scan

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "resources" / "fuzz.json"
RATIO_MIN_BYTES = 64 * 1024  # peak per byte is reported over messages at least this large


def _load_corpus() -> ModuleType:
    """``tests/fuzz_corpus.py``, by its path: ``tests`` is a directory of test modules, not a
    package (its modules import each other by bare name, as pytest puts it on ``sys.path``)."""
    if "fuzz_corpus" in sys.modules:  # the tests' import of it, in a test process
        return sys.modules["fuzz_corpus"]
    spec = importlib.util.spec_from_file_location("fuzz_corpus", ROOT / "tests" / "fuzz_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus()


@dataclass
class DecoderReport:
    decoder: str
    cases: int = 0
    decoded: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    crashes: int = 0  # must be 0
    over_bound: int = 0  # must be 0
    by_strategy: dict[str, int] = field(default_factory=dict)
    max_peak_bytes: int = 0
    max_peak_of_bound: float = 0.0  # peak / allocation_bound
    # over messages (justified bytes) of 64 KiB or more: fixed costs (a zlib inflater and its
    # 1 MiB chunk, a vLLM class's first use) dominate smaller ones
    max_peak_per_message_byte: float = 0.0
    max_peak_per_justified_byte: float = 0.0
    max_rss_mib: float = 0.0  # of the process so far (it only grows)
    wall_s: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)


def _record(report: DecoderReport, strategy: str, data: bytes, result: corpus.CaseResult) -> None:
    report.cases += 1
    report.by_strategy[strategy] = report.by_strategy.get(strategy, 0) + 1
    if result.outcome == "decoded":
        report.decoded += 1
    elif result.outcome == "rejected":
        report.rejected[result.error] = report.rejected.get(result.error, 0) + 1
    else:
        report.crashes += 1
    over = result.peak > result.bound
    report.over_bound += over
    report.max_peak_bytes = max(report.max_peak_bytes, result.peak)
    report.max_peak_of_bound = max(report.max_peak_of_bound, round(result.peak / result.bound, 4))
    if len(data) >= RATIO_MIN_BYTES:
        ratio = round(result.peak / len(data), 3)
        report.max_peak_per_message_byte = max(report.max_peak_per_message_byte, ratio)
    if result.justified >= RATIO_MIN_BYTES:
        ratio = round(result.peak / result.justified, 3)
        report.max_peak_per_justified_byte = max(report.max_peak_per_justified_byte, ratio)
    if (result.outcome == "crash" or over) and len(report.failures) < 20:
        report.failures.append({"strategy": strategy, "data": data[:256].hex(), **asdict(result)})


def _max_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run(cases_per_decoder: int, seed: int) -> dict[str, Any]:
    """For each decoder, its gadgets, then ``cases_per_decoder`` generated cases."""
    corpus.valid_pickles(), corpus.valid_step_messages(), corpus.gadgets()  # built before RSS
    baseline_rss = _max_rss_mib()
    reports = []
    gadget_outcomes = {}
    for decoder in corpus.DECODERS:
        report = DecoderReport(decoder)
        rng = random.Random(f"{seed}-{decoder}")
        start = time.perf_counter()
        for name, (target, data) in corpus.gadgets().items():
            if target == decoder:
                result = corpus.run_case(decoder, data)
                _record(report, "gadget", data, result)
                gadget_outcomes[name] = f"{decoder}: {result.outcome} {result.error}".strip()
        for strategy, data in corpus.cases(decoder, rng, cases_per_decoder):
            _record(report, strategy, data, corpus.run_case(decoder, data))
        report.wall_s = round(time.perf_counter() - start, 1)
        report.max_rss_mib = _max_rss_mib()
        reports.append(report)
        summary = asdict(report) | {"failures": len(report.failures)}
        print(f"[fuzz] {summary}", file=sys.stderr)
    return {
        "cases_per_decoder": cases_per_decoder,
        "seed": seed,
        "pickle_alloc_per_byte": pickle_scan.PICKLE_ALLOC_PER_BYTE,
        "bound_slack_bytes": corpus.BOUND_SLACK,
        "baseline_rss_mib": baseline_rss,
        "decoders": [asdict(r) for r in reports],
        "gadgets": gadget_outcomes,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| decoder | cases | decoded | rejected | crashes | over bound | max peak | "
        "peak / bound | peak / message byte | peak / justified byte | max RSS | wall |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["decoders"]:
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items()))
        lines.append(
            f"| {r['decoder']} | {r['cases']} | {r['decoded']} | {rejected} | {r['crashes']} | "
            f"{r['over_bound']} | {r['max_peak_bytes'] / 2**20:.1f} MiB | "
            f"{r['max_peak_of_bound']:.2f} | {r['max_peak_per_message_byte']:.1f} | "
            f"{r['max_peak_per_justified_byte']:.2f} | {r['max_rss_mib']:.0f} MiB | "
            f"{r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.fuzz_decoders",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cases", type=int, default=10_000, help="cases per decoder (10,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON ({DEFAULT_OUT})")
    args = parser.parse_args()
    logging.getLogger("vllm").setLevel(logging.ERROR)  # mutated SamplingParams warn
    start = time.perf_counter()
    result = run(args.cases, args.seed)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    failed = sum(r["crashes"] + r["over_bound"] for r in result["decoders"])
    failed += sum(not v.split(": ")[1].startswith("rejected") for v in result["gadgets"].values())
    if failed:
        sys.exit(f"{failed} crashes, cases over the allocation bound or gadgets not rejected")


if __name__ == "__main__":
    main()
