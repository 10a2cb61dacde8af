"""``molink status`` (``python -m molink.entrypoints.cli.status``): the swarm's table and its exit
status, against real swarms."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import NODE_ENV
from test_dht import make_ann

from molink.comm.membership import Membership


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "molink.entrypoints.cli.status", *args],
        env={**os.environ, **NODE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_covered_swarm_exits_0(demo_pipeline, swarm_key_file):
    done = status("--initial_peer", demo_pipeline.grpc_address, "--swarm-key-file", swarm_key_file)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "0-14" in done.stdout and "15-29" in done.stdout
    assert "every layer is served" in done.stdout
    # Each node's device, free and total KV (VLLM_CPU_KVCACHE_SPACE=1 in tests) and heads.
    assert re.search(r"  cpu +\d\.\d/1\.0 +[01]  ", done.stdout), done.stdout


def test_gap_exits_1_and_is_named():
    head = Membership(host="127.0.0.1", announce_host="127.0.0.1", startup_timeout=30)
    try:
        head.announce(make_ann(head, 0, 9, state="online"))
        done = status("--initial_peer", head.visible_maddrs()[0])
    finally:
        head.shutdown()
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert "missing layers: 10-29" in done.stdout


def test_unreachable_swarm_exits_2():
    done = status("--initial_peer", "127.0.0.1:9", "--timeout", "1")
    assert done.returncode == 2
    assert "Can't reach the swarm" in done.stdout + done.stderr
