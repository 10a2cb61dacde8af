"""Smoke runs of the scripts in ``benchmark/``: load scripts against the two-node demo pipeline,
the link emulator on loopback, and a quick comparison run (a few tiny requests per setup).

Each script runs as ``python -m benchmark.NAME`` from the repository root, as users run it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_API_KEY, free_port

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--input-len", "16", "--output-len", "8", "--vocab-range", "100", "1000"]


def bench(name: str) -> list[str]:
    """The command line of script ``benchmark/NAME.py`` (run with ``cwd=ROOT``)."""
    return [sys.executable, "-m", f"benchmark.{name}"]


def run_script(name: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    subprocess.run(
        [*bench(name), *args, "--result-json", str(out)],
        env={**os.environ, "OPENAI_API_KEY": DEMO_API_KEY},
        cwd=ROOT,
        check=True,
        timeout=600,
        capture_output=True,
    )
    return json.loads(out.read_text())


def help_text(name: str) -> str:
    done = subprocess.run(
        [*bench(name), "--help"], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return done.stdout


@pytest.mark.parametrize(
    "name", ["loadgen", "base_multi_request_test", "request_with_set_interval"]
)
def test_help(name):
    out = help_text(name)
    assert "--base-url" in out and f"usage: python -m benchmark.{name}" in out


def test_loadgen_closed_loop(demo_pipeline, tmp_path):
    common = ["--base-url", demo_pipeline.base_url, "--model", *_model(demo_pipeline)]
    result = run_script(
        "loadgen", [*common, *SMALL, "--num-prompts", "4", "--concurrency", "2"], tmp_path
    )
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["ttft_ms"]["p50"] > 0 and result["output_throughput_tok_s"] > 0
    assert result["steady_output_tok_s"] >= 0


def test_steady_throughput_counts_the_tokens_before_the_last_send():
    from benchmark.loadgen import RequestResult, steady_throughput

    # sent at 0 and 2 s; tokens at 1, 1.5, 2.5 (first) and 3, 3.5 (second)
    first = RequestResult(ok=True, ttft=1.0, itl=[0.5, 1.0], output_tokens=3, started=0.0)
    second = RequestResult(ok=True, ttft=1.0, itl=[0.5], output_tokens=2, started=2.0)
    assert steady_throughput([first, second], 0.0) == 2 / 2.0
    everything_at_once = RequestResult(ok=True, ttft=1.0, output_tokens=1, started=0.0)
    assert steady_throughput([first, everything_at_once], 0.0) == 0.0


def test_burst_and_interval_scripts(demo_pipeline, tmp_path):
    common = ["--base-url", demo_pipeline.base_url, "--model", *_model(demo_pipeline)]
    burst = run_script(
        "base_multi_request_test",
        [*common, *SMALL, "--num-requests", "3", "--rounds", "1"],
        tmp_path,
    )
    assert burst["failed"] == 0 and burst["rounds"][0]["completed"] == 3
    interval = run_script(
        "request_with_set_interval",
        [*common, *SMALL, "--num-requests", "3", "--interval", "0.2"],
        tmp_path,
    )
    assert interval["completed"] == 3 and interval["failed"] == 0


@pytest.mark.parametrize(
    "name",
    [
        "swarm",
        "compare",
        "link_emulator",
        "churn",
        "wire_accuracy",
        "shared_follower",
        "soak",
        "fuzz_decoders",
    ],
)
def test_tool_help(name):
    assert f"usage: python -m benchmark.{name}" in help_text(name)


def test_link_emulator_relays_bytes_after_the_delay():
    from benchmark.link_emulator import LinkEmulator, LinkSpec

    with socket.create_server(("127.0.0.1", 0)) as echo_server:
        threading.Thread(target=_echo_once, args=(echo_server,), daemon=True).start()
        relay_port = free_port()
        target = echo_server.getsockname()
        emulator = LinkEmulator(("127.0.0.1", relay_port), target, LinkSpec(30.0, 0.0, 10.0))
        emulator.start()
        try:
            payload = os.urandom(200_000)
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", relay_port)) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                received = b"".join(iter(lambda: conn.recv(65536), b""))
            elapsed = time.monotonic() - start
        finally:
            emulator.stop()
    assert received == payload
    # A lower bound, not a time limit: 30 ms each way, plus 160 ms to push 200 kB at 10 Mbit/s
    # (the echo overlaps the way back with it).
    assert elapsed >= 2 * 0.030 + len(payload) * 8 / 10e6


@pytest.mark.xdist_group("compare_quick_run")
def test_compare_quick_run(qwen3_model, tmp_path):
    subprocess.run(
        [
            *bench("compare"),
            "--quick",
            "--model",
            qwen3_model,  # the tiny checkpoint: the run's mechanics are checked, not speed
            "--only",
            "vllm",
            "molink3_wan",
            "paired",
            "--paired",
            "molink2:vllm",
            "molink2_off:molink2",
            "--output-dir",
            str(tmp_path),
            "--trace",
            "--grpc-base-port",
            "21051",  # below the ephemeral ports other tests' nodes take
        ],
        cwd=ROOT,
        check=True,
        timeout=900,
        capture_output=True,
    )
    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(results["setups"]) == {"vllm", "molink3_wan"}
    assert all(row["failed"] == 0 for row in results["setups"].values())
    assert results["long_prompt"]["ttft_idle_ms"] > 0
    wan = results["setups"]["molink3_wan"]
    assert wan["bound_cycle_ms"] > 0 and 1 <= wan["bound_batches"] <= 8  # from the head's fits
    assert len(wan["fitted_costs"]["stages"]) == 3
    steps = wan["step_breakdown_ms"]  # from the head's --step-trace
    assert steps["stage 2 compute"] > 0 and steps["hop 0->1"] > 20  # the 20 ms emulated link
    table = (tmp_path / "benchmark.md").read_text()
    assert "| MoLink 3 stages, 20 ms, 100 Mbit/s |" in table
    assert results["setups"]["vllm"]["heavy"]["failed"] == 0  # --heavy-requests, quick: 6
    assert "At 6 concurrent requests" in table
    assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    paired = results["paired"]  # both setups of a pair up together, rounds alternating
    assert set(paired["molink2:vllm"]) == {"3", "6"}  # both are measured at --heavy-requests
    assert set(paired["molink2_off:molink2"]) == {"3"}  # two swarms up at once
    for pair, loads in paired.items():
        for load in loads.values():
            assert len(load["pairs"]) == 2
            assert all(p[k]["failed"] == 0 for p in load["pairs"] for k in pair.split(":"))
    assert "2 stages loopback / vLLM, tok/s (6 concurrent, paired rounds" in table
    assert "micro-batching on / off, tok/s (3 concurrent, paired rounds" in table


def test_compare_report_of_paired_rounds_only(tmp_path):
    """``compare --only paired``: the report holds the paired table and no plot (there is no
    setup of its own to plot)."""
    import argparse

    from benchmark.compare import write_report

    run = {"output_throughput_tok_s": 100.0, "tpot_p50_ms": 12.0, "failed": 0}
    pair = {"molink2_off": run, "molink2": run}
    results = {
        "date": "2026-12-06",
        "hardware": "test",
        "model_name": "tiny",
        "command": "python -m benchmark.compare --only paired",
        "layers": "2 stages 0-2 | 3-5",
        "setups": {},
        "paired": {"molink2_off:molink2": {"3": {"pairs": [pair, pair]}}},
    }
    args = argparse.Namespace(
        output_dir=tmp_path, num_requests=3, input_len=16, output_len=8, rounds=1,
        heavy_requests=6, long_prompt_len=64, streams=2, delay_ms=20.0, far_delay_ms=50.0,
        rate_mbit=100.0, wire_dtype="float16", engine_args=["--dtype", "float32"],
    )  # fmt: skip
    write_report(results, args)
    table = (tmp_path / "benchmark.md").read_text()
    assert "micro-batching on / off, tok/s (3 concurrent, paired rounds" in table
    assert "benchmark.png" not in table and not (tmp_path / "benchmark.png").exists()


def test_a_second_sigterm_while_a_swarm_stops_leaves_no_node_running(tmp_path):
    """``benchmark.swarm``: SIGTERM (or Ctrl-C) again while the nodes stop kills every node,
    instead of leaving the ones not yet reached running."""
    from benchmark.processes import ManagedProcess
    from benchmark.swarm import Swarm, SwarmSpec

    exits_in_1_s = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), sys.exit(0)))\n"
        "print('up', flush=True)\n"
        "time.sleep(120)"
    )
    swarm = Swarm(SwarmSpec(model="unused", layers=[(0, 0), (1, 1)], log_dir=tmp_path))
    nodes = [
        ManagedProcess([sys.executable, "-c", exits_in_1_s], tmp_path / f"node{i}.log")
        for i in range(2)
    ]
    swarm.nodes = list(nodes)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as the CLI does
    try:
        deadline = time.monotonic() + 30
        while not all("up" in n.log() for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        again = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        again.start()
        with pytest.raises(SystemExit):
            swarm.stop()  # node 0 takes 1 s to exit: the second SIGTERM comes meanwhile
            again.join()
            time.sleep(1.0)  # (a late signal is handled here, with both nodes stopped)
        for node in nodes:
            node.wait_exit(timeout=10)  # raises if a node still runs
    finally:
        signal.signal(signal.SIGTERM, previous)
        for node in nodes:
            node.kill()


def test_launcher_fails_early_and_stops_the_whole_group(tmp_path):
    """``benchmark.processes``: a process that exits is reported with its log at once; ``stop``
    also kills a child that ignores SIGTERM (as a node's EngineCore or p2pd may)."""
    from benchmark.processes import ManagedProcess, ProcessExited

    crash = ManagedProcess(
        [sys.executable, "-c", "print('no such model'); raise SystemExit(3)"],
        tmp_path / "crash.log",
        url="http://127.0.0.1:9",
    )
    with pytest.raises(ProcessExited, match="crash exited \\(3\\)(.|\\n)*no such model"):
        crash.wait_healthy(timeout=60)
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}])"
    pid_file = tmp_path / "child.pid"
    parent += f"; time.sleep(0.5); open({str(pid_file)!r}, 'w').write('up'); time.sleep(600)"
    group = ManagedProcess([sys.executable, "-c", parent], tmp_path / "group.log")
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    members = _group_members(group.pid)
    assert len(members) == 2, members
    group.stop(grace=5)
    assert group.poll() is not None
    time.sleep(0.5)
    assert all(_state(pid) in ("", "Z") for pid in members)  # gone, or dead and not yet reaped


def _group_members(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                out.append(int(entry.name))
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _echo_once(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _model(node) -> list[str]:
    import urllib.request

    request = urllib.request.Request(
        node.base_url + "/v1/models", headers={"Authorization": f"Bearer {DEMO_API_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return [json.load(r)["data"][0]["id"]]


def test_report_bounds_each_ratio_by_the_fitted_stage_costs():
    from benchmark.compare import TOK_S, TPOT, Ratio, ceiling

    rows = {"fast": {"itl_p50_ms": 120.0}, "pipe": {"itl_p50_ms": 170.0, "bound_cycle_ms": 160.0}}
    # tok/s: pipe can't decode faster than its bound cycle, so pipe / fast <= 120 / 160
    assert "at most **0.75**" in ceiling(Ratio("pipe", "fast", "x", TOK_S), rows)
    assert "at least **1.33**" in ceiling(Ratio("pipe", "fast", "x", TPOT), rows)
    assert ceiling(Ratio("fast", "pipe", "x", TOK_S), rows) == ""  # no bound for one node


def test_benchmark_swarm_nodes_are_separate_machines(tmp_path):
    from benchmark.link_emulator import LinkSpec
    from benchmark.swarm import Swarm, SwarmSpec

    def swarm(stages: int, **kw) -> Swarm:
        layers = [(i * 2, i * 2 + 1) for i in range(stages)]
        return Swarm(SwarmSpec(model="m", layers=layers, log_dir=tmp_path, num_cores=2, **kw))

    two = swarm(2, link=LinkSpec(delay_ms=20))
    assert [two.node_env(i)["VLLM_CPU_OMP_THREADS_BIND"] for i in range(2)] == ["0", "1"]
    assert [two.launch_prefix(i) for i in range(2)] == [["taskset", "-c", c] for c in "01"]
    assert "cores 0 | 1" in two.describe()
    three = swarm(3)
    assert [three.node_cores(i) for i in range(3)] == [[0], [1], [0]]
    assert "some share one" in three.describe()
    shared = swarm(2, shared_cores=True)
    assert shared.node_env(1)["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert shared.launch_prefix(1) == []
    assert "one machine (shared cores)" in shared.describe()
    # Each node, and the link emulator in front of it, has its own address: separate hosts.
    assert [three.node_host(i) for i in range(3)] == ["127.0.0.1", "127.0.1.1", "127.0.2.1"]
    assert three.relay_host(2) == "127.0.2.1"
    assert {shared.node_host(i) for i in range(2)} == {"127.0.0.1"}


def test_shared_follower_groups_traced_steps_by_the_pass_they_shared():
    from benchmark.shared_follower import pass_groups

    def step(result: float, arrived: float, compute_ms: float) -> dict:
        stages = [{}, {"arrived": arrived, "compute_ms": compute_ms}]
        return {"result": result, "tokens": 8, "stages": stages}

    # Head a: a pass of its own, then one with b; b: that joined pass, then one of its own.
    a = [step(1.0, 0.9, 50.0), step(1.5, 1.1, 80.0)]
    b = [step(1.5, 1.2, 80.0), step(2.0, 1.6, 60.0), step(9.0, 8.9, 70.0)]  # the last: later
    groups = pass_groups([a, b], [[0.0, 5.0]], decode_rows=8)
    assert groups["passes_by_heads"] == {
        "1": {"steps": 2, "passes": 2, "compute_ms": 55.0, "tokens": 8, "share_of_steps": 0.5},
        "2": {"steps": 2, "passes": 1, "compute_ms": 80.0, "tokens": 16, "share_of_steps": 0.5},
    }
    # a: 1.1 - 1.0; b: 1.6 - 1.5 (ms)
    assert groups["turnaround_ms_p50"] == pytest.approx(100.0)
    # From one decode-only result to the next: a 1.0 -> 1.5, b 1.5 -> 2.0 (b's 9.0 came late).
    assert groups["decode_cycle_ms_p50"] == [pytest.approx(500.0), pytest.approx(500.0)]
    # A step over decode_rows computed a prompt: no decode cycle ends or starts there.
    assert pass_groups([a, b], [[0.0, 5.0]], decode_rows=4)["decode_cycle_ms_p50"] == [None, None]


@pytest.mark.xdist_group("shared_follower_quick_run")
def test_shared_follower_quick_run(qwen3_model, tmp_path):
    subprocess.run(
        [
            *bench("shared_follower"),
            "--quick",
            "--trace",
            "--model",
            qwen3_model,
            "--output-dir",
            str(tmp_path),
            "--port",
            "8650",
            "--grpc-base-port",
            "22051",  # clear of compare.py's run, which may run at the same time
        ],  # fmt: skip
        cwd=ROOT,
        check=True,
        timeout=900,
        capture_output=True,
    )
    one, two = json.loads((tmp_path / "shared_follower.json").read_text())["setups"]
    assert one["failed"] == 0 and two["failed"] == 0
    assert len(two["tpot_p50_ms"]) == 2 and two["ratio"] > 0 and 0 <= two["joined_share"] <= 1
    assert one["slowest_tpot_vs_one_head"] == [1.0] and two["slowest_tpot_vs_one_head"][0] > 0
    assert "| 2 heads, 2 concurrent each |" in (tmp_path / "shared_follower.md").read_text()
    shares = [g["share_of_steps"] for g in two["passes_by_heads"].values()]  # from --trace
    assert shares and sum(shares) == pytest.approx(1.0)
    assert len(one["decode_cycle_ms_p50"]) == 1 and len(two["decode_cycle_ms_p50"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_gpu_check_fails_clearly_without_a_gpu(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "gpu_check.sh"
    done = subprocess.run(
        ["bash", str(script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr
    assert "no CUDA GPU visible to torch" in done.stderr
    assert "nothing checked" in done.stderr


def test_swarm_sim_runs_molinks_own_policy_against_k_pipelines(tmp_path):
    subprocess.run(
        [
            *bench("swarm_sim"),
            "--nodes",
            "40",
            "--heads",
            "4",
            "--layers",
            "24",
            "--hours",
            "1",
            "--churn",
            "0.5",
            "--no-progress",
            "--output-dir",
            str(tmp_path),
        ],  # fmt: skip
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    results = json.loads((tmp_path / "swarm_sim.json").read_text())
    for policy in ("molink", "k_pipelines"):
        assert results[policy]["tokens_per_s"] > 0
        assert 0 <= results[policy]["requests_hit_share"] <= 1
        assert 0 < results[policy]["covered_share"] <= 1
    assert "| MoLink" in (tmp_path / "swarm_sim.md").read_text()
