"""The vLLM worker class of the platform this process runs on (what a stage worker extends),
and how a node on it computes.

vLLM picks its worker in ``Platform.check_and_update_config``; the copy of that choice lives in
:mod:`molink.vllm_compat.worker`.
"""

from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.platforms import current_platform

logger = init_logger(__name__)


def describe_device() -> str:
    """What a node computes on, as it announces it: ``cpu``, or e.g. ``cuda (NVIDIA H100)``."""
    kind = current_platform.device_type
    if kind == "cpu":
        return kind
    try:
        return f"{kind} ({current_platform.get_device_name()})"
    except Exception:  # noqa: BLE001  # a name is nice to have, never worth failing a start
        return kind


def stage_enforce_eager(enforce_eager: bool) -> bool:
    """Whether a MoLink stage on this platform runs eagerly (no CUDA graphs).

    On CUDA, stages run eagerly unless ``MOLINK_CUDA_GRAPHS=1``: graph capture of a stage (static
    output buffers, copied off by :mod:`molink.worker.activation_staging`) has not been run on a
    GPU yet (docs/deployment.md, "GPU nodes and mixed swarms"). ``scripts/gpu_check.sh`` checks
    both ways.
    """
    if enforce_eager or current_platform.device_type != "cuda":
        return enforce_eager
    if os.environ.get("MOLINK_CUDA_GRAPHS", "0").lower() in ("1", "true"):
        logger.warning("MOLINK_CUDA_GRAPHS=1: this stage captures CUDA graphs (not yet verified)")
        return False
    return True
