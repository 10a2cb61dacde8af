"""The vLLM worker class of the platform this process runs on: what a stage worker extends.

vLLM picks its worker in ``Platform.check_and_update_config`` when ``worker_cls`` is ``"auto"``.
A MoLink stage names its own worker class, so it looks the platform's up the same way, by the
platform's device type, before any engine config exists.
"""

from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.utils.import_utils import resolve_obj_by_qualname

logger = init_logger(__name__)

# The worker each of vLLM's platforms uses (vllm/platforms/*.py, check_and_update_config).
PLATFORM_WORKERS: dict[str, str] = {
    "cpu": "vllm.v1.worker.cpu_worker.CPUWorker",
    "cuda": "vllm.v1.worker.gpu_worker.Worker",  # NVIDIA CUDA and AMD ROCm
    "xpu": "vllm.v1.worker.xpu_worker.XPUWorker",
}


def platform_worker_qualname(device_type: str | None = None) -> str:
    """The worker class vLLM uses on ``device_type`` (default: this process's platform)."""
    device_type = device_type or current_platform.device_type
    try:
        return PLATFORM_WORKERS[device_type]
    except KeyError:
        raise RuntimeError(
            f"MoLink stages don't run on vLLM's {device_type!r} platform yet "
            f"(supported: {', '.join(sorted(PLATFORM_WORKERS))})"
        ) from None


def platform_worker_class(device_type: str | None = None) -> type:
    """The worker class itself (imported on demand: other platforms' modules may not import)."""
    return resolve_obj_by_qualname(platform_worker_qualname(device_type))


def describe_device() -> str:
    """What a node computes on, as it announces it: ``cpu``, or e.g. ``cuda (NVIDIA H100)``."""
    kind = current_platform.device_type
    if kind == "cpu":
        return kind
    try:
        return f"{kind} ({current_platform.get_device_name()})"
    except Exception:  # noqa: BLE001  # a name is nice to have, never worth failing a start
        return kind


def use_v1_model_runner() -> None:
    """Keep this process (and the engine processes it starts) on vLLM's V1 model runner.

    With Triton present (GPUs) vLLM 0.32 defaults to the V2 runner, whose pipeline path broadcasts
    sampled tokens over torch.distributed (``vllm/v1/worker/gpu/pp_utils.py``); MoLink stages
    have no peers to broadcast to. On CPU vLLM already uses V1.
    """
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").lower() in ("1", "true"):
        logger.warning("VLLM_USE_V2_MODEL_RUNNER=1 ignored: MoLink stages need the V1 runner")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def stage_enforce_eager(enforce_eager: bool) -> bool:
    """Whether a MoLink stage on this platform runs eagerly (no CUDA graphs).

    On CUDA, stages run eagerly unless ``MOLINK_CUDA_GRAPHS=1``: graph capture of a stage (static
    output buffers, copied off by :mod:`molink.worker.activation_staging`) has not been run on a
    GPU yet (README, "GPU nodes"). ``scripts/gpu_check.sh`` checks both ways.
    """
    if enforce_eager or current_platform.device_type != "cuda":
        return enforce_eager
    if os.environ.get("MOLINK_CUDA_GRAPHS", "0").lower() in ("1", "true"):
        logger.warning("MOLINK_CUDA_GRAPHS=1: this stage captures CUDA graphs (not yet verified)")
        return False
    return True
