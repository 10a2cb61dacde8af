"""The vLLM worker class of the platform this process runs on: what a stage worker extends.

vLLM picks its worker in ``Platform.check_and_update_config`` when ``worker_cls`` is ``"auto"``.
A MoLink stage names its own worker class, so it looks the platform's up the same way, by the
platform's device type, before any engine config exists.
"""

from __future__ import annotations

from vllm.platforms import current_platform
from vllm.utils.import_utils import resolve_obj_by_qualname

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
