"""Wire codec: tensors as raw bytes, vLLM step data through a restricted pickle.

Nothing received from a peer is passed to ``pickle.loads`` or ``torch.load``. Activations travel as
``Tensor`` protobuf messages (dtype name, shape, raw bytes). The scheduler output, the grammar
output, the KV cache plan and the model runner output are vLLM dataclasses; they travel as pickles
that are read by :class:`RestrictedUnpickler`, which resolves only the classes in
:data:`ALLOWED_GLOBALS` and rebuilds tensors and arrays from raw bytes (never through
``torch.load`` or numpy's object reconstruction).

Every decoder here reads peer data: it either returns or raises :class:`PeerDataError` (a
``pickle.UnpicklingError`` and a ``ValueError``). Before the unpickler sees a pickle,
:func:`~molink.comm.pickle_scan.check_pickle_stream` bounds every size, index and nesting
level in it and what building its objects may allocate; tensors are checked against their
declared shape and dtype, and compressed data never inflates past :data:`MAX_MESSAGE_BYTES`.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from molink.comm.grpc_options import MAX_MESSAGE_BYTES
from molink.comm.pickle_scan import (
    COPIED_STRUCT_FIELDS,
    PICKLE_ALLOC_PER_BYTE,
    PICKLE_ALLOC_SLACK,
    PeerDataError,
    check_pickle_stream,
    clip,
)
from molink.comm.proto import molink_pb2
from molink.config import WIRE_COMPRESSIONS, WIRE_DTYPE_NAMES
from molink.vllm_compat.wire_classes import VLLM_WIRE_CLASSES

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

# Array dtypes allowed in a pickle (numpy's dtype.str): plain little-endian numbers, never a
# structured, sub-array, void or object dtype.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    s: np.dtype(s)
    for s in ("|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8")
}

# MAX_MESSAGE_BYTES, the largest gRPC message between nodes: nothing a peer sends may decode
# into a tensor larger than this, however well it compresses.
_MAX_TENSOR_DIMS = 32

# No builtins: protocol 5 writes sets, frozensets, tuples, lists and dicts with their own
# opcodes, and a callable builtin is a gadget (``set(range(10**12))`` allocates terabytes).
# vLLM's classes come from :data:`molink.vllm_compat.wire_classes.VLLM_WIRE_CLASSES`.
_ALLOWED_BY_MODULE: dict[str, tuple[str, ...]] = {
    "collections": ("OrderedDict", "defaultdict"),
    **VLLM_WIRE_CLASSES,
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
    """Unpickler that only resolves :data:`ALLOWED_GLOBALS` and raw-byte tensors/arrays.

    Use it through :func:`loads`, which first checks the stream (:mod:`molink.comm.pickle_scan`).
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise PeerDataError(f"refusing to unpickle global {clip(module)}.{clip(name)}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("tensor", "ndarray")):
            raise PeerDataError(f"unknown persistent id {type(pid).__name__}")
        kind, dtype, shape, data = pid
        if not (isinstance(shape, tuple) and all(type(d) is int for d in shape)):
            raise PeerDataError("malformed tensor shape")
        if not (isinstance(dtype, str) and isinstance(data, bytes)):
            raise PeerDataError("malformed tensor data")
        if kind == "tensor":
            return bytes_to_tensor(dtype, shape, data)
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is None:
            raise PeerDataError(f"array dtype {clip(dtype)} is not accepted")
        if _checked_numel(shape) * np_dtype.itemsize != len(data):
            raise PeerDataError(f"array of shape {shape} {dtype} doesn't match {len(data)} bytes")
        return np.frombuffer(data, dtype=np_dtype).reshape(shape).copy()


def rebuild_dataclass(cls: type, values: tuple) -> Any:
    """Inverse of the compact dataclass form: ``cls`` with its fields set, in declared order.

    ``cls`` reached here through :meth:`RestrictedUnpickler.find_class`, so it is allowlisted;
    like plain unpickling, this sets attributes without running ``__init__``.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(values, tuple):
        raise PeerDataError("malformed dataclass payload")
    names = [f.name for f in dataclasses.fields(cls)]
    if len(names) != len(values):
        raise PeerDataError(f"{cls.__name__}: {len(values)} values, {len(names)} fields")
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


def _global_calls() -> dict[tuple[str, str], tuple[str, Any]]:
    """How each allowlisted global may be used by REDUCE/NEWOBJ (as _TensorPickler does).

    ``rebuild``: :func:`rebuild_dataclass` of a compact dataclass and as many values as it has
    fields (no ``__init__`` runs); ``enum``: looked up by one scalar value; ``namedtuple``: built
    from its fields; ``dict``: an empty (Ordered/default)dict, filled by SETITEMS; ``struct``: a
    msgspec struct, whose ``__init__`` runs on its field values (with the positions of the
    fields it copies); ``value``: not callable (dataclasses, dtypes).
    """
    import collections
    import importlib

    calls = {}
    for module, name in ALLOWED_GLOBALS:
        obj = getattr(importlib.import_module(module), name)
        if obj is rebuild_dataclass:
            calls[module, name] = ("rebuild", 0)
        elif obj in _COMPACT_DATACLASSES:
            calls[module, name] = ("dataclass", len(dataclasses.fields(obj)))
        elif isinstance(obj, type) and issubclass(obj, enum.Enum):
            calls[module, name] = ("enum", 1)
        elif isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
            calls[module, name] = ("namedtuple", len(obj._fields))
        elif obj in (collections.OrderedDict, collections.defaultdict):
            calls[module, name] = ("dict", 0)
        elif hasattr(obj, "__struct_fields__"):
            fields = obj.__struct_fields__
            copied = tuple(fields.index(f) for f in COPIED_STRUCT_FIELDS if f in fields)
            calls[module, name] = ("struct", copied)
        else:
            calls[module, name] = ("value", 0)
    return calls


_GLOBAL_CALLS = _global_calls()


# Bound on an inflated step payload (a zlib bomb is refused, not allocated); what unpickling it may
# allocate is bounded by PICKLE_ALLOC_PER_BYTE times its inflated size.
MAX_STEP_DATA_BYTES = 256 * 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024


def dumps_step_data(obj: Any) -> bytes:
    """:func:`dumps` + zlib: a step's scheduler output is sent to every stage, every step, and
    is mostly request ids and small integers (about 40% smaller compressed)."""
    return zlib.compress(dumps(obj), 1)


def loads_step_data(data: bytes) -> Any:
    """Inverse of :func:`dumps_step_data`, refusing payloads that inflate past the bound."""
    raw = inflate_bounded(data, MAX_STEP_DATA_BYTES)
    if raw is None:
        raise PeerDataError("step payload too large, truncated or not zlib data")
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
        raise PeerDataError("malformed step payload")
    scheduler_output, snapshots = step
    if not isinstance(scheduler_output, SchedulerOutput) or not isinstance(snapshots, dict):
        raise PeerDataError("malformed step payload")
    if not all(isinstance(k, str) and isinstance(v, RequestSnapshot) for k, v in snapshots.items()):
        raise PeerDataError("malformed request snapshots")
    return scheduler_output, snapshots


def inflate_bounded(data: bytes, limit: int) -> bytes | None:
    """zlib-decompress ``data`` into at most ``limit`` bytes; None if it is larger, truncated,
    followed by other data or not zlib data at all. Inflates a chunk at a time, so a zlib bomb
    costs ``limit`` bytes, not twice that."""
    inflater = zlib.decompressobj()
    chunks = []
    size = 0
    pending = data
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, min(_INFLATE_CHUNK, limit - size + 1))
            pending = inflater.unconsumed_tail
            size += len(chunk)
            if size > limit:
                return None
            if not (chunk or pending or inflater.eof):
                return None  # truncated
            chunks.append(chunk)
    except zlib.error:
        return None
    if inflater.unused_data:
        return None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def loads(data: bytes) -> Any:
    """Deserialize a pickle from a peer; raises :class:`PeerDataError` on anything not allowed.

    The stream is checked by :mod:`molink.comm.pickle_scan` first; whatever else goes wrong while
    building the objects (a vLLM class refusing its fields, a dict key that isn't hashable...)
    is raised as a :class:`PeerDataError` too.
    """
    try:
        check_pickle_stream(
            data, PICKLE_ALLOC_PER_BYTE * len(data) + PICKLE_ALLOC_SLACK, _GLOBAL_CALLS
        )
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except PeerDataError:
        raise
    except Exception as e:  # MemoryError and RecursionError included: one thing to catch
        raise PeerDataError(f"malformed pickle: {type(e).__name__}: {clip(str(e))}") from e


def tensor_to_bytes(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, raw bytes) of a tensor."""
    dtype_name = str(t.dtype).removeprefix("torch.")
    if dtype_name not in _TORCH_DTYPES:
        raise TypeError(f"dtype {t.dtype} can't be sent")
    t = t.detach().to("cpu").contiguous()
    view = t.view(_VIEW_AS[t.dtype]) if t.dtype in _VIEW_AS else t
    return dtype_name, list(t.shape), view.numpy().tobytes()


def _checked_numel(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of ``shape``, refusing shapes no message could carry:
    more than ``_MAX_TENSOR_DIMS`` dimensions, a negative one, or non-zero dimensions whose
    product exceeds :data:`MAX_MESSAGE_BYTES` (checked as it grows, so huge values cost nothing).
    """
    if len(shape) > _MAX_TENSOR_DIMS:
        raise PeerDataError(f"tensor of {len(shape)} dimensions")
    nonzero = 1
    empty = False
    for d in shape:
        if d < 0:
            raise PeerDataError("negative dimension")
        if d == 0:
            empty = True
            continue
        nonzero *= d
        if nonzero > MAX_MESSAGE_BYTES:
            raise PeerDataError("tensor shape larger than a message")
    return 0 if empty else nonzero


def _torch_dtype(dtype_name: str) -> torch.dtype:
    dtype = _TORCH_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise PeerDataError(f"dtype {clip(dtype_name)} is not accepted")
    return dtype


def bytes_to_tensor(
    dtype_name: str, shape: Sequence[int], data: bytes, pin_memory: bool = False
) -> torch.Tensor:
    """Rebuild a tensor from :func:`tensor_to_bytes` output, checking size and dtype.

    Raises :class:`PeerDataError` (a ``ValueError``) unless ``data`` holds exactly the bytes of
    ``shape`` elements of a wire dtype; nothing larger than ``data`` is allocated. The bytes are
    copied once, into pinned (page-locked) memory if ``pin_memory``.
    """
    dtype = _torch_dtype(dtype_name)
    shape = list(shape)
    needed = _checked_numel(shape) * dtype.itemsize
    if needed != len(data):
        raise PeerDataError(
            f"tensor of shape {shape} {dtype_name} needs {needed} bytes, got {len(data)}"
        )
    t = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
    if needed:
        raw = t.view(_VIEW_AS.get(dtype, dtype)).numpy()
        raw[...] = np.frombuffer(data, dtype=raw.dtype).reshape(raw.shape)
    return t


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
    msgs: list[molink_pb2.Tensor], dtype: torch.dtype | None = None, pin_memory: bool = False
) -> dict[str, torch.Tensor]:
    """Protobuf -> intermediate tensors, cast back to the model ``dtype``.

    ``pin_memory``: put them in page-locked memory (for a GPU stage: the runner's copy to the
    device is then asynchronous). Raises :class:`PeerDataError` (a ``ValueError``) on a tensor
    whose data doesn't match its dtype and shape; compressed tensors of one message inflate to
    :data:`MAX_MESSAGE_BYTES` at most, together.
    """
    out = {}
    room = MAX_MESSAGE_BYTES
    for m in msgs:
        if m.zlib:
            data = _inflate(m, room)
            room -= len(data)
        else:
            data = m.data
        t = bytes_to_tensor(m.dtype, m.shape, data, pin_memory)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = torch.empty(t.shape, dtype=dtype, pin_memory=pin_memory).copy_(t)
        out[m.name] = t
    return out


def _inflate(m: molink_pb2.Tensor, limit: int) -> bytes:
    """Decompress a tensor's data, never past the size its shape and dtype imply, nor ``limit``."""
    expected = _checked_numel(m.shape) * _torch_dtype(m.dtype).itemsize
    if expected > limit:
        raise PeerDataError(
            f"compressed tensors of a message inflate past {MAX_MESSAGE_BYTES} bytes"
        )
    data = inflate_bounded(m.data, expected)
    if data is None:
        raise PeerDataError("compressed tensor data is larger than its shape, or corrupt")
    return data
