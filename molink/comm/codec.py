"""Wire codec: tensors as raw bytes, vLLM step data through a restricted pickle.

Nothing received from a peer is passed to ``pickle.loads`` or ``torch.load``. Activations travel as
``Tensor`` protobuf messages (dtype name, shape, raw bytes). The scheduler output, the grammar
output, the KV cache plan and the model runner output are vLLM dataclasses; they travel as pickles
that are read by :class:`RestrictedUnpickler`, which resolves only the classes in
:data:`ALLOWED_GLOBALS` and rebuilds tensors and arrays from raw bytes (never through
``torch.load`` or numpy's object reconstruction).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch

from molink.comm.proto import molink_pb2

# Tensor dtypes allowed on the wire, by name.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# dtypes allowed for activations between stages (--wire_dtype).
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Element types numpy can't hold are moved through a same-width integer view.
_VIEW_AS = {torch.bfloat16: torch.int16}

_ALLOWED_BY_MODULE: dict[str, tuple[str, ...]] = {
    "builtins": ("set", "frozenset", "slice", "range"),
    "collections": ("OrderedDict", "defaultdict"),
    # scheduler side
    "vllm.v1.core.sched.output": (
        "SchedulerOutput",
        "NewRequestData",
        "CachedRequestData",
        "GrammarOutput",
        "ScheduledEncoderInputStats",
    ),
    "vllm.sampling_params": (
        "SamplingParams",
        "SamplingType",
        "RequestOutputKind",
        "StructuredOutputsParams",
        "RepetitionDetectionParams",
    ),
    "vllm.pooling_params": ("PoolingParams", "LateInteractionParams"),
    "vllm.lora.request": ("LoRARequest",),
    "vllm.config.ec_manager_config": ("EncoderCacheManagerMetadata",),
    # model runner side
    "vllm.v1.outputs": (
        "ModelRunnerOutput",
        "LogprobsLists",
        "LogprobsTensors",
        "SamplingMaskLists",
        "KVConnectorOutput",
        "ECConnectorOutput",
        "DraftTokenIds",
    ),
    # KV cache planning
    "vllm.v1.kv_cache_interface": (
        "KVQuantMode",
        "KVCacheSpecKind",
        "SparseCacheRole",
        "KVCacheSpec",
        "AttentionSpec",
        "FullAttentionSpec",
        "MLAAttentionSpec",
        "ChunkedLocalAttentionSpec",
        "SlidingWindowSpec",
        "SlidingWindowMLASpec",
        "CircularBufferSpec",
        "MambaSpec",
        "EncoderOnlyAttentionSpec",
        "CrossAttentionSpec",
        "SinkFullAttentionSpec",
        "UniformTypeKVCacheSpecs",
        "KVCacheTensor",
        "KVCacheGroupRole",
        "KVCacheGroupSpec",
        "KVCacheConfig",
    ),
    # MoLink's own step results
    "molink.core.pipeline_state": ("StageLostOutput",),
    "torch": tuple(_TORCH_DTYPES),
}

# Every global a step payload may name. These are data holders (dataclasses, named tuples, enums,
# msgspec structs): building one runs no code chosen by the sender.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    (module, name) for module, names in _ALLOWED_BY_MODULE.items() for name in names
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves :data:`ALLOWED_GLOBALS` and raw-byte tensors/arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("tensor", "ndarray")):
            raise pickle.UnpicklingError(f"unknown persistent id {type(pid).__name__}")
        kind, dtype, shape, data = pid
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise pickle.UnpicklingError("malformed tensor shape")
        if not isinstance(data, bytes):
            raise pickle.UnpicklingError("malformed tensor data")
        if kind == "tensor":
            return bytes_to_tensor(dtype, list(shape), data)
        np_dtype = np.dtype(dtype)
        if np_dtype.hasobject:
            raise pickle.UnpicklingError("object arrays are not accepted")
        return np.frombuffer(data, dtype=np_dtype).reshape(shape).copy()


class _TensorPickler(pickle.Pickler):
    """Pickler that moves tensors and arrays out of the pickle stream as raw bytes."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            dtype, shape, data = tensor_to_bytes(obj)
            return ("tensor", dtype, tuple(shape), data)
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise pickle.PicklingError("object arrays can't be sent")
            return ("ndarray", obj.dtype.str, tuple(obj.shape), np.ascontiguousarray(obj).tobytes())
        return None


def dumps(obj: Any) -> bytes:
    """Serialize a vLLM step payload for :func:`loads` on a peer."""
    buf = io.BytesIO()
    _TensorPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    """Deserialize bytes from a peer; raises ``pickle.UnpicklingError`` on anything not allowed."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def tensor_to_bytes(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, raw bytes) of a tensor."""
    dtype_name = str(t.dtype).removeprefix("torch.")
    if dtype_name not in _TORCH_DTYPES:
        raise TypeError(f"dtype {t.dtype} can't be sent")
    t = t.detach().to("cpu").contiguous()
    view = t.view(_VIEW_AS[t.dtype]) if t.dtype in _VIEW_AS else t
    return dtype_name, list(t.shape), view.numpy().tobytes()


def bytes_to_tensor(dtype_name: str, shape: list[int], data: bytes) -> torch.Tensor:
    """Rebuild a tensor from :func:`tensor_to_bytes` output, checking size and dtype."""
    dtype = _TORCH_DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"dtype {dtype_name!r} is not accepted")
    numel = 1
    for d in shape:
        if d < 0:
            raise ValueError("negative dimension")
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(data):
        raise ValueError(
            f"tensor of shape {shape} {dtype_name} needs {numel * itemsize} bytes, got {len(data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    raw_dtype = _VIEW_AS.get(dtype, dtype)
    t = torch.frombuffer(bytearray(data), dtype=raw_dtype).reshape(shape)
    return t.view(dtype) if raw_dtype is not dtype else t


def encode_tensors(
    tensors: dict[str, torch.Tensor], wire_dtype: torch.dtype | None = None
) -> list[molink_pb2.Tensor]:
    """Intermediate tensors -> protobuf, optionally cast to ``wire_dtype`` (e.g. fp16)."""
    out = []
    for name, t in tensors.items():
        if wire_dtype is not None and t.is_floating_point():
            t = t.to(wire_dtype)
        dtype, shape, data = tensor_to_bytes(t)
        out.append(molink_pb2.Tensor(name=name, dtype=dtype, shape=shape, data=data))
    return out


def decode_tensors(
    msgs: list[molink_pb2.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Protobuf -> intermediate tensors, cast back to the model ``dtype``."""
    out = {}
    for m in msgs:
        t = bytes_to_tensor(m.dtype, list(m.shape), m.data)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        out[m.name] = t
    return out
