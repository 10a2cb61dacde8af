"""Smoke runs of the load scripts in ``benchmark/`` against the two-node demo pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmark"
SMALL = ["--input-len", "16", "--output-len", "8", "--vocab-range", "100", "1000"]


def run_script(name: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    subprocess.run(
        [sys.executable, str(BENCH / name), *args, "--result-json", str(out)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "name", ["loadgen.py", "base_multi_request_test.py", "request_with_set_interval.py"]
)
def test_help(name):
    out = subprocess.run(
        [sys.executable, str(BENCH / name), "--help"], check=True, capture_output=True, text=True
    )
    assert "--base-url" in out.stdout


def test_loadgen_closed_loop(demo_pipeline, tmp_path):
    common = ["--base-url", demo_pipeline.base_url, "--model", *_model(demo_pipeline)]
    result = run_script(
        "loadgen.py", [*common, *SMALL, "--num-prompts", "4", "--concurrency", "2"], tmp_path
    )
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["ttft_ms"]["p50"] > 0 and result["output_throughput_tok_s"] > 0


def test_burst_and_interval_scripts(demo_pipeline, tmp_path):
    common = ["--base-url", demo_pipeline.base_url, "--model", *_model(demo_pipeline)]
    burst = run_script(
        "base_multi_request_test.py",
        [*common, *SMALL, "--num-requests", "3", "--rounds", "1"],
        tmp_path,
    )
    assert burst["failed"] == 0 and burst["rounds"][0]["completed"] == 3
    interval = run_script(
        "request_with_set_interval.py",
        [*common, *SMALL, "--num-requests", "3", "--interval", "0.2"],
        tmp_path,
    )
    assert interval["completed"] == 3 and interval["failed"] == 0


def _model(node) -> list[str]:
    import urllib.request

    with urllib.request.urlopen(node.base_url + "/v1/models", timeout=10) as r:
        return [json.load(r)["data"][0]["id"]]
