"""Wire codec: tensors as raw bytes, vLLM step data through a restricted pickle.

Nothing received from a peer is passed to ``pickle.loads`` or ``torch.load``. Activations travel as
``Tensor`` protobuf messages (dtype name, shape, raw bytes). The scheduler output, the grammar
output, the KV cache plan and the model runner output are vLLM dataclasses; they travel as pickles
that are read by :class:`RestrictedUnpickler`, which resolves only the classes in
:data:`ALLOWED_GLOBALS` and rebuilds tensors and arrays from raw bytes (never through
``torch.load`` or numpy's object reconstruction).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from molink.comm.proto import molink_pb2
from molink.config import WIRE_COMPRESSIONS, WIRE_DTYPE_NAMES

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
WIRE_DTYPES: dict[str, torch.dtype] = {name: _TORCH_DTYPES[name] for name in WIRE_DTYPE_NAMES}
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
    # MoLink's own step results and resume snapshots, and the compact dataclass form
    # (see _TensorPickler)
    "molink.core.pipeline_state": ("StageLostOutput",),
    "molink.core.request_snapshot": ("RequestSnapshot",),
    "molink.comm.codec": ("rebuild_dataclass",),
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


def rebuild_dataclass(cls: type, values: tuple) -> Any:
    """Inverse of the compact dataclass form: ``cls`` with its fields set, in declared order.

    ``cls`` reached here through :meth:`RestrictedUnpickler.find_class`, so it is allowlisted;
    like plain unpickling, this sets attributes without running ``__init__``.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(values, tuple):
        raise pickle.UnpicklingError("malformed dataclass payload")
    names = [f.name for f in dataclasses.fields(cls)]
    if len(names) != len(values):
        raise pickle.UnpicklingError(f"{cls.__name__}: {len(values)} values, {len(names)} fields")
    obj = cls.__new__(cls)
    for name, value in zip(names, values, strict=True):
        object.__setattr__(obj, name, value)
    return obj


class _TensorPickler(pickle.Pickler):
    """Pickler that moves tensors and arrays out of the pickle stream as raw bytes.

    Allowlisted dataclasses travel as their field values in declared order (no field names, no
    cached properties): a step's scheduler output is mostly field names otherwise. Both ends run
    the same vLLM, so the field order is the same.
    """

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in _COMPACT_DATACLASSES:
            return rebuild_dataclass, (
                cls,
                tuple(getattr(obj, f.name) for f in dataclasses.fields(obj)),
            )
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            dtype, shape, data = tensor_to_bytes(obj)
            return ("tensor", dtype, tuple(shape), data)
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise pickle.PicklingError("object arrays can't be sent")
            return ("ndarray", obj.dtype.str, tuple(obj.shape), np.ascontiguousarray(obj).tobytes())
        return None


def _compact_dataclasses() -> frozenset[type]:
    import importlib

    classes = set()
    for module, names in _ALLOWED_BY_MODULE.items():
        if module.startswith(("vllm.", "molink.core")):
            mod = importlib.import_module(module)
            classes.update(
                c for c in (getattr(mod, n) for n in names) if dataclasses.is_dataclass(c)
            )
    return frozenset(classes)


_COMPACT_DATACLASSES = _compact_dataclasses()


def dumps(obj: Any) -> bytes:
    """Serialize a vLLM step payload for :func:`loads` on a peer."""
    buf = io.BytesIO()
    _TensorPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


# Bound on an inflated step payload (a zlib bomb is refused, not allocated).
MAX_STEP_DATA_BYTES = 256 * 1024 * 1024


def dumps_step_data(obj: Any) -> bytes:
    """:func:`dumps` + zlib: a step's scheduler output is sent to every stage, every step, and
    is mostly request ids and small integers (about 40% smaller compressed)."""
    return zlib.compress(dumps(obj), 1)


def loads_step_data(data: bytes) -> Any:
    """Inverse of :func:`dumps_step_data`, refusing payloads that inflate past the bound."""
    raw = inflate_bounded(data, MAX_STEP_DATA_BYTES)
    if raw is None:
        raise pickle.UnpicklingError("step payload too large or truncated")
    return loads(raw)


def dumps_step(scheduler_output: Any, snapshots: dict[str, Any]) -> bytes:
    """A step's data: the scheduler output and the snapshots of requests it resumes."""
    return dumps_step_data((scheduler_output, snapshots))


def loads_step(data: bytes) -> tuple[Any, dict[str, Any]]:
    """Inverse of :func:`dumps_step`, checking the payload's shape."""
    from vllm.v1.core.sched.output import SchedulerOutput

    from molink.core.request_snapshot import RequestSnapshot

    step = loads_step_data(data)
    if not (isinstance(step, tuple) and len(step) == 2):
        raise pickle.UnpicklingError("malformed step payload")
    scheduler_output, snapshots = step
    if not isinstance(scheduler_output, SchedulerOutput) or not isinstance(snapshots, dict):
        raise pickle.UnpicklingError("malformed step payload")
    if not all(isinstance(k, str) and isinstance(v, RequestSnapshot) for k, v in snapshots.items()):
        raise pickle.UnpicklingError("malformed request snapshots")
    return scheduler_output, snapshots


def inflate_bounded(data: bytes, limit: int) -> bytes | None:
    """zlib-decompress ``data`` into at most ``limit`` bytes; None if it is larger or truncated."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, max(limit, 1))  # a limit of 0 would mean "no limit"
    if inflater.unconsumed_tail or not inflater.eof:
        return None
    return out


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


@dataclass(frozen=True)
class WireFormat:
    """How activations travel between stages (``--wire_dtype``, ``--wire_compression``)."""

    dtype: torch.dtype | None = None  # None: the model dtype
    compress: bool = False  # zlib (lossless); pays off only on slow links

    @classmethod
    def from_names(cls, dtype: str | None, compression: str | None) -> WireFormat:
        if dtype is not None and dtype not in WIRE_DTYPES:
            raise ValueError(f"unsupported wire dtype {dtype!r}")
        if compression is not None and compression not in WIRE_COMPRESSIONS:
            raise ValueError(f"unsupported wire compression {compression!r}")
        return cls(WIRE_DTYPES[dtype] if dtype else None, compression == "zlib")


def encode_tensors(
    tensors: dict[str, torch.Tensor], wire: WireFormat = WireFormat()
) -> list[molink_pb2.Tensor]:
    """Intermediate tensors -> protobuf, cast to the wire dtype and compressed if asked."""
    out = []
    for name, t in tensors.items():
        if wire.dtype is not None and t.is_floating_point():
            t = t.to(wire.dtype)
        dtype, shape, data = tensor_to_bytes(t)
        if wire.compress:
            data = zlib.compress(data, 1)
        out.append(
            molink_pb2.Tensor(name=name, dtype=dtype, shape=shape, data=data, zlib=wire.compress)
        )
    return out


def decode_tensors(
    msgs: list[molink_pb2.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Protobuf -> intermediate tensors, cast back to the model ``dtype``."""
    out = {}
    for m in msgs:
        data = _inflate(m) if m.zlib else m.data
        t = bytes_to_tensor(m.dtype, list(m.shape), data)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        out[m.name] = t
    return out


def _inflate(m: molink_pb2.Tensor) -> bytes:
    """Decompress a tensor's data, never past the size its shape and dtype imply."""
    dtype = _TORCH_DTYPES.get(m.dtype)
    if dtype is None:
        raise ValueError(f"dtype {m.dtype!r} is not accepted")
    expected = torch.empty((), dtype=dtype).element_size()
    for d in m.shape:
        expected *= max(int(d), 0)
    data = inflate_bounded(m.data, expected)
    if data is None:
        raise ValueError("compressed tensor data is larger than its shape")
    return data
