"""How a node's memory divides between weights and KV cache, before its stage is built.

vLLM sizes a worker's KV cache the same way on every platform. An explicit size wins:
``--kv-cache-memory-bytes``, or on CPU ``VLLM_CPU_KVCACHE_SPACE`` (GiB). Otherwise the KV cache
gets ``--gpu-memory-utilization`` × the device's memory (on CPU, of RAM), less what the worker
already holds (weights, activations), as measured by vLLM's profiling run. A follower builds its
worker only when a head asks for a span; until then it announces :func:`kv_capacity_estimate`,
and then what the worker measured.
"""

from __future__ import annotations

import os
from pathlib import Path

from vllm.engine.arg_utils import EngineArgs
from vllm.platforms import current_platform

GiB = 2**30
# Left free when sizing a span: activations, the runtime, the operating system.
MEMORY_RESERVE_BYTES = 2 * GiB
# KV room a node keeps for itself when it sizes its span and no KV size was given.
DEFAULT_KV_RESERVE_BYTES = 4 * GiB
CHECKPOINT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")


def device_memory() -> tuple[int, int]:
    """(available, total) bytes of the memory this node computes in.

    An accelerator is taken to be this node's alone (available = total); it is read through the
    platform (NVML on CUDA), so that the process doesn't start a CUDA context before vLLM does.
    """
    if current_platform.device_type != "cpu":
        total = int(current_platform.get_device_total_memory())
        return total, total
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                info[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return info.get("MemAvailable", 0), info.get("MemTotal", 0)


def explicit_kv_bytes(engine_args: EngineArgs) -> int | None:
    """The KV cache size the node was given, if any (vLLM honours it as is)."""
    if engine_args.kv_cache_memory_bytes:
        return int(engine_args.kv_cache_memory_bytes)
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    if current_platform.device_type == "cpu" and space:
        return int(space) * GiB
    return None


def layer_bytes(engine_args: EngineArgs, num_layers: int) -> float:
    """Estimated bytes of one layer's weights in the serving dtype (0 without checkpoint files).

    From the checkpoint's size, embeddings and LM head included (so it errs high), doubled when
    the node widens 16-bit weights to float32.
    """
    files = [f for pattern in CHECKPOINT_PATTERNS for f in Path(engine_args.model).glob(pattern)]
    checkpoint = sum(f.stat().st_size for f in files)
    widen = 2 if str(engine_args.dtype) in ("float32", "float") else 1
    return widen * checkpoint / num_layers


def kv_capacity_estimate(engine_args: EngineArgs, span_layers: int, num_layers: int) -> int:
    """The KV bytes a stage of ``span_layers`` layers will likely get, before it is built."""
    explicit = explicit_kv_bytes(engine_args)
    if explicit is not None:
        return explicit
    _, total = device_memory()
    weights = layer_bytes(engine_args, num_layers) * span_layers
    return max(0, int(total * engine_args.gpu_memory_utilization - weights))


def layers_that_fit(engine_args: EngineArgs, num_layers: int) -> int:
    """How many layers' weights fit in this node's memory, beside its KV cache (at least 1)."""
    per_layer = layer_bytes(engine_args, num_layers)
    if not per_layer:
        return num_layers
    available, total = device_memory()
    usable = min(available, total * engine_args.gpu_memory_utilization)
    kv = explicit_kv_bytes(engine_args) or DEFAULT_KV_RESERVE_BYTES
    return max(1, min(num_layers, int((usable - kv - MEMORY_RESERVE_BYTES) // per_layer)))
