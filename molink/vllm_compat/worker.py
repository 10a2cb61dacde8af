"""The vLLM worker class a stage worker extends, and the model runner it must use.

vLLM picks its worker in ``Platform.check_and_update_config`` when ``worker_cls`` is ``"auto"``.
A MoLink stage names its own worker class, so it looks the platform's up the same way, by the
platform's device type, before any engine config exists (a copy of vLLM's choice).
"""

from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.utils.import_utils import resolve_obj_by_qualname

logger = init_logger(__name__)

#: The worker each of vLLM's platforms uses (``vllm/platforms/*.py``, check_and_update_config).
PLATFORM_WORKERS: dict[str, str] = {
    "cpu": "vllm.v1.worker.cpu_worker.CPUWorker",
    "cuda": "vllm.v1.worker.gpu_worker.Worker",  # NVIDIA CUDA and AMD ROCm
    "xpu": "vllm.v1.worker.xpu_worker.XPUWorker",
}
#: The vLLM platform modules that set each worker (ROCm's device type is "cuda" too).
PLATFORM_MODULES: dict[str, tuple[str, ...]] = {
    "cpu": ("vllm.platforms.cpu",),
    "cuda": ("vllm.platforms.cuda", "vllm.platforms.rocm"),
    "xpu": ("vllm.platforms.xpu",),
}


def platform_worker_qualname(device_type: str | None = None) -> str:
    """The worker class vLLM uses on ``device_type`` (default: this process's platform).

    Needs from vLLM: each platform's ``check_and_update_config`` sets
    ``parallel_config.worker_cls`` to the qualname in :data:`PLATFORM_WORKERS`.
    """
    device_type = device_type or current_platform.device_type
    try:
        return PLATFORM_WORKERS[device_type]
    except KeyError:
        raise RuntimeError(
            f"MoLink stages don't run on vLLM's {device_type!r} platform yet "
            f"(supported: {', '.join(sorted(PLATFORM_WORKERS))})"
        ) from None


def platform_worker_class(device_type: str | None = None) -> type:
    """The vLLM worker class itself (imported on demand: other platforms' modules may not
    import); see :func:`platform_worker_qualname`."""
    return resolve_obj_by_qualname(platform_worker_qualname(device_type))


def use_v1_model_runner() -> None:
    """Keep this process (and the engine processes it starts) on vLLM's V1 model runner.

    With Triton present (GPUs) vLLM 0.32 defaults to the V2 runner, whose pipeline path broadcasts
    sampled tokens over torch.distributed (``vllm/v1/worker/gpu/pp_utils.py``); MoLink stages
    have no peers to broadcast to. On CPU vLLM already uses V1.

    Needs from vLLM: the ``VLLM_USE_V2_MODEL_RUNNER`` environment variable ("0": V1).
    """
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").lower() in ("1", "true"):
        logger.warning("VLLM_USE_V2_MODEL_RUNNER=1 ignored: MoLink stages need the V1 runner")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
