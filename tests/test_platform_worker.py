"""The stage worker is built on the platform's own vLLM worker (CPU here, the same path a GPU
takes through vLLM's ``Worker``), and nodes say what they compute on."""

from __future__ import annotations

import os

import pytest
from vllm.platforms import current_platform
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from molink.vllm_compat.worker import (
    PLATFORM_WORKERS,
    platform_worker_class,
    platform_worker_qualname,
    use_v1_model_runner,
)
from molink.worker import platform_worker
from molink.worker.platform_worker import (
    describe_device,
    stage_enforce_eager,
)
from molink.worker.stage_worker import StageHooks, StageWorker


def test_stage_worker_extends_this_platforms_worker() -> None:
    # CPUWorker on these machines; vLLM's GPU Worker under scripts/gpu_check.sh.
    worker = CPUWorker if current_platform.device_type == "cpu" else Worker
    assert platform_worker_class() is worker
    assert StageWorker.__mro__[1:3] == (StageHooks, worker)
    # The stage hooks come first; each calls on into the platform worker.
    assert StageWorker.init_device is StageHooks.init_device
    assert StageWorker.load_model is StageHooks.load_model
    assert issubclass(CPUWorker, Worker)  # the CPU path is vLLM's GPU worker's, extended


def test_a_gpu_stage_worker_is_the_same_hooks_on_vllms_gpu_worker() -> None:
    assert platform_worker_qualname("cuda") == "vllm.v1.worker.gpu_worker.Worker"
    cuda_stage = type("CudaStageWorker", (StageHooks, platform_worker_class("cuda")), {})
    assert cuda_stage.__mro__[1:3] == (StageHooks, Worker)
    for hook in ("init_device", "load_model", "execute_stage", "reset_stage", "kv_blocks"):
        assert getattr(cuda_stage, hook) is getattr(StageHooks, hook)
    # What the stage doesn't change is the platform's: memory profiling sizes the KV cache.
    assert cuda_stage.determine_available_memory is Worker.determine_available_memory


def test_an_unsupported_platform_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="don't run on vLLM's 'tpu' platform yet"):
        platform_worker_qualname("tpu")
    assert set(PLATFORM_WORKERS) == {"cpu", "cuda", "xpu"}


def test_nodes_announce_their_device_and_use_the_v1_runner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert describe_device().startswith(current_platform.device_type)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    use_v1_model_runner()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_cuda_stages_run_eagerly_unless_graphs_are_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(platform_worker.current_platform, "device_type", "cpu")
    assert stage_enforce_eager(False) is False  # CPU: the node's own choice
    monkeypatch.setattr(platform_worker.current_platform, "device_type", "cuda")
    monkeypatch.delenv("MOLINK_CUDA_GRAPHS", raising=False)
    assert stage_enforce_eager(False) is True
    monkeypatch.setenv("MOLINK_CUDA_GRAPHS", "1")
    assert stage_enforce_eager(False) is False
    assert stage_enforce_eager(True) is True  # --enforce-eager always wins
