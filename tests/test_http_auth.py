"""Safe defaults: what a node exposes without keys, and the refusal to expose it by accident."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import NODE_ENV, free_port

from molink.entrypoints.http_auth import status_bind_host
from molink.security.settings import InsecureSetup, SecurityFiles, check_exposure, is_loopback


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.5") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("")


def test_exposure_needs_a_key_or_insecure():
    check_exposure("127.0.0.1", SecurityFiles())
    check_exposure("0.0.0.0", SecurityFiles(swarm_key_file="k"))
    check_exposure("0.0.0.0", SecurityFiles(insecure=True))
    with pytest.raises(InsecureSetup, match="molink keygen"):
        check_exposure("0.0.0.0", SecurityFiles())


def test_follower_status_binds_loopback_without_a_key():
    assert status_bind_host(None, [], insecure=False) == "127.0.0.1"
    assert status_bind_host(None, ["k"], insecure=False) == "0.0.0.0"
    assert status_bind_host("0.0.0.0", [], insecure=True) == "0.0.0.0"
    with pytest.raises(InsecureSetup, match="--api-key"):
        status_bind_host("0.0.0.0", [], insecure=False)


def test_a_node_on_all_interfaces_without_a_key_refuses_to_start(qwen3_model):
    args = ["--model", qwen3_model, "--serving_layers", "0,5", "--port", str(free_port())]
    args += ["--grpc_port", str(free_port()), "--listen_host", "0.0.0.0"]
    done = subprocess.run(
        [sys.executable, "-m", "molink.entrypoints.openai.api_server", *args],
        env={**os.environ, **NODE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--swarm-key-file" in done.stdout + done.stderr
