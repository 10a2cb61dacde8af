"""How a node sizes its span and announces its KV capacity before a head builds its stage."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from vllm.engine.arg_utils import EngineArgs

from molink.worker import memory_budget
from molink.worker.memory_budget import (
    DEFAULT_KV_RESERVE_BYTES,
    MEMORY_RESERVE_BYTES,
    GiB,
    device_memory,
    explicit_kv_bytes,
    kv_capacity_estimate,
    layers_that_fit,
)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A 'checkpoint' of 3 GiB over 30 layers: 0.1 GiB per layer (a sparse file)."""
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(3 * GiB)
    return tmp_path


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process on an 80 GiB CUDA device."""
    platform = SimpleNamespace(device_type="cuda", get_device_total_memory=lambda: 80 * GiB)
    monkeypatch.setattr(memory_budget, "current_platform", platform)


def test_cpu_memory_is_read_from_the_kernel() -> None:
    available, total = device_memory()
    assert 0 < available <= total


def test_an_explicit_kv_size_is_announced_as_is(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    args = EngineArgs(model=str(checkpoint))
    assert explicit_kv_bytes(args) == 3 * GiB
    assert kv_capacity_estimate(args, span_layers=10, num_layers=30) == 3 * GiB
    args.kv_cache_memory_bytes = 5 * GiB  # vLLM's flag wins over the CPU variable
    assert kv_capacity_estimate(args, span_layers=10, num_layers=30) == 5 * GiB


def test_a_gpu_gets_its_memory_share_less_its_weights(
    checkpoint: Path, gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # a CPU setting: not for a GPU
    args = EngineArgs(model=str(checkpoint), gpu_memory_utilization=0.5)
    assert explicit_kv_bytes(args) is None
    assert device_memory() == (80 * GiB, 80 * GiB)
    assert kv_capacity_estimate(args, span_layers=10, num_layers=30) == 39 * GiB
    args.dtype = "float32"  # 16-bit weights widened: twice the bytes
    assert kv_capacity_estimate(args, span_layers=10, num_layers=30) == 38 * GiB


def test_a_gpu_node_sizes_its_span_by_its_device_memory(checkpoint: Path, gpu: None) -> None:
    args = EngineArgs(model=str(checkpoint), gpu_memory_utilization=0.1)
    # 8 GiB usable, less the KV reserve and the runtime's: 2 GiB for 0.1 GiB layers.
    usable = 8 * GiB - DEFAULT_KV_RESERVE_BYTES - MEMORY_RESERVE_BYTES
    assert layers_that_fit(args, 30) == int(usable // (0.1 * GiB))
    args.gpu_memory_utilization = 0.9
    assert layers_that_fit(args, 30) == 30  # never more than the model has
    args.gpu_memory_utilization = 0.05
    assert layers_that_fit(args, 30) == 1  # at least one


def test_without_checkpoint_files_a_node_takes_every_layer(tmp_path: Path) -> None:
    assert layers_that_fit(EngineArgs(model=str(tmp_path)), 30) == 30
