"""The fuzz corpus of the decoders of peer data (``molink.comm.codec``): hostile inputs and the
oracle that runs them.

Decoders (:data:`DECODERS`): ``loads`` (the restricted pickle), ``loads_step_data`` and
``loads_step`` (zlib step data), ``tensor_proto`` (a ``Tensor`` message parsed, then
``decode_tensors``) and ``step_proto`` (a ``Step`` message decoded as ``StageHost.submit`` does).
Inputs: valid payloads of every kind a peer sends (:func:`valid_pickles`,
:func:`valid_tensor_messages`, :func:`valid_step_messages`, :func:`large_valid_pickles`), their
mutations (:func:`mutate`: bit flips, byte and opcode changes, insertions, deletions,
truncations, repeated bytes, splices of other payloads, big integers written over length, index
and frame fields), tensor messages lying about dtype, shape and size (:func:`lying_tensor`),
hand-made gadgets (:func:`gadgets`: code execution, allocation and nesting gadgets, lying
sizes) and seeded streams of all of these (:func:`cases`).

:func:`run_case` runs one decoder on one input under ``tracemalloc``: the case is ``decoded``,
``rejected`` (a ``pickle.UnpicklingError`` or ``ValueError``, or protobuf's ``DecodeError`` for a
message that doesn't parse) or a ``crash`` (anything else), and its peak traced allocation must
stay within :func:`allocation_bound`.

Used by ``tests/test_codec_fuzz.py`` (Hypothesis draws the bytes and mutations) and by
``python -m benchmark.fuzz_decoders`` (10,000 seeded cases per decoder).
"""

from __future__ import annotations

import functools
import pickle
import pickletools
import random
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pickle import (
    APPEND,
    APPENDS,
    BINGET,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    MARK,
    MEMOIZE,
    NONE,
    REDUCE,
    TUPLE,
    TUPLE1,
)
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError

from molink.comm import codec, pickle_scan
from molink.comm.proto import molink_pb2

# Slack of the allocation bound: the interpreter's own caches, a vLLM class's first use, logging.
BOUND_SLACK = 4 * 1024 * 1024
REJECTIONS = (pickle.UnpicklingError, ValueError)

# --------------------------------------------------------------------------- valid payloads


def sampling_params() -> Any:
    from vllm.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=5, stop=["x"], stop_token_ids=[7])


def scheduler_output(new_requests: int = 1, prompt_len: int = 3, cached: int = 0) -> Any:
    """A ``SchedulerOutput`` as the head sends it: new requests (prompts, sampling parameters,
    block ids) and ``cached`` running ones."""
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    so = SchedulerOutput.make_empty()
    so.scheduled_new_reqs = [
        NewRequestData(
            req_id=f"r{i}",
            prompt_token_ids=[(i * 7919 + j * 104729) % 151000 for j in range(prompt_len)],
            mm_features=[],
            sampling_params=sampling_params(),
            pooling_params=None,
            block_ids=([i, i + 1],),
            num_computed_tokens=0,
            lora_request=None,
        )
        for i in range(new_requests)
    ]
    cached_data = CachedRequestData.make_empty()
    ids = [f"c{i}" for i in range(cached)]
    cached_data.req_ids = ids
    cached_data.new_block_ids = [([i],) if i % 4 == 0 else None for i in range(cached)]
    cached_data.num_computed_tokens = [100 + i for i in range(cached)]
    cached_data.num_output_tokens = list(range(cached))
    so.scheduled_cached_reqs = cached_data
    so.num_scheduled_tokens = {r.req_id: prompt_len for r in so.scheduled_new_reqs}
    so.num_scheduled_tokens.update(dict.fromkeys(ids, 1))
    so.total_num_scheduled_tokens = sum(so.num_scheduled_tokens.values())
    so.finished_req_ids = {"r0-done"}
    return so


def snapshots(count: int = 1) -> dict[str, Any]:
    """Resume snapshots, as a step carries them after a stage was lost."""
    from molink.core.request_snapshot import RequestSnapshot

    return {
        f"r{i}": RequestSnapshot(
            prompt_token_ids=[1, 2, 3],
            output_token_ids=[7, 8],
            sampling_params=sampling_params(),
            pooling_params=None,
            lora_request=None,
            prompt_is_token_ids=None,
            prompt_embeds=None,
        )
        for i in range(count)
    }


def model_runner_output(requests: int = 2) -> Any:
    """A ``ModelRunnerOutput`` with logprobs (arrays) and prompt logprobs (tensors)."""
    from vllm.v1.outputs import LogprobsLists, LogprobsTensors, ModelRunnerOutput

    ids = [f"r{i}" for i in range(requests)]
    return ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[[7 + i] for i in range(requests)],
        logprobs=LogprobsLists(
            np.arange(requests * 2).reshape(requests, 2),
            np.full((requests, 2), -0.5, dtype=np.float32),
            np.ones(requests, dtype=np.int64),
        ),
        prompt_logprobs_dict={
            "r0": LogprobsTensors(torch.tensor([[1]]), torch.tensor([[-0.5]]), torch.tensor([1]))
        },
    )


def kv_cache_spec() -> dict[str, Any]:
    """What ``InitStage`` returns: a KV cache spec per layer."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    return {
        "model.layers.0.self_attn.attn": FullAttentionSpec(
            block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16
        ),
        "model.layers.1.self_attn.attn": SlidingWindowSpec(
            block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float16, sliding_window=128
        ),
    }


def kv_cache_config() -> Any:
    """What ``StartStage`` carries: the planned KV cache."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    spec = kv_cache_spec()
    names = list(spec)
    return KVCacheConfig(
        num_blocks=100,
        kv_cache_tensors=[
            KVCacheTensor(size=1 << 20, layers=names, layer_stride=8, block_stride=8)
        ],
        kv_cache_groups=[KVCacheGroupSpec(layer_names=names, kv_cache_spec=spec[names[0]])],
    )


def grammar_output() -> Any:
    from vllm.v1.core.sched.output import GrammarOutput

    return GrammarOutput(["r0"], np.full((1, 4), -1, dtype=np.int32))


@functools.cache
def valid_pickles() -> dict[str, bytes]:
    """Small valid pickles of every kind a peer sends (what mutations start from)."""
    return {
        "step": codec.dumps((scheduler_output(), snapshots())),
        "decode_step": codec.dumps((scheduler_output(0, cached=16), {})),
        "model_runner_output": codec.dumps(model_runner_output()),
        "kv_cache_spec": codec.dumps(kv_cache_spec()),
        "kv_cache_config": codec.dumps(kv_cache_config()),
        "grammar_output": codec.dumps(grammar_output()),
    }


def large_valid_pickles() -> dict[str, bytes]:
    """Realistic large payloads: what the pre-scan charges them must stay well within budget."""
    return {
        "prefill 256 x 16 tokens": codec.dumps((scheduler_output(256, 16), {})),
        "prefill 8 x 2000 tokens": codec.dumps((scheduler_output(8, 2000), {})),
        "decode 256": codec.dumps((scheduler_output(0, cached=256), {})),
        "resume 64": codec.dumps((scheduler_output(0, cached=64), snapshots(64))),
        "model runner output 256": codec.dumps(model_runner_output(256)),
    }


def _tensor_messages() -> list[molink_pb2.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = {"hidden_states": torch.randn(3, 8, generator=gen), "residual": torch.zeros(3, 8)}
    out = []
    for dtype, compression in [(None, None), ("float16", None), ("bfloat16", "zlib")]:
        out += codec.encode_tensors(hidden, codec.WireFormat.from_names(dtype, compression))
    out += codec.encode_tensors({"positions": torch.arange(6)})
    return out


@functools.cache
def valid_tensor_messages() -> list[bytes]:
    """Serialized ``Tensor`` messages: float32, float16, zlib-compressed bfloat16, int64."""
    return [m.SerializeToString() for m in _tensor_messages()]


@functools.cache
def valid_step_messages() -> list[bytes]:
    """Serialized ``Step`` messages: scheduler output, tensors, grammar output, timings."""
    tensors = _tensor_messages()
    with_grammar = molink_pb2.Step(
        step_id=3,
        epoch=1,
        scheduler_output=codec.dumps_step(scheduler_output(), snapshots()),
        sample=True,
        grammar_output=codec.dumps(grammar_output()),
        tensors=tensors[:2],
        timings=[molink_pb2.StageTiming(wait_s=0.1, compute_s=0.2)],
    )
    plain = molink_pb2.Step(
        step_id=4,
        epoch=1,
        scheduler_output=codec.dumps_step(scheduler_output(0, cached=4), {}),
        tensors=tensors[4:6],
    )
    return [with_grammar.SerializeToString(), plain.SerializeToString()]


# --------------------------------------------------------------------------- decoders


def decode_tensor_message(data: bytes) -> Any:
    """A ``Tensor`` message from the wire, as a stage decodes it."""
    return codec.decode_tensors([molink_pb2.Tensor.FromString(data)], torch.float32)


def decode_step_message(data: bytes) -> Any:
    """A ``Step`` message from the wire, decoded as ``StageHost.submit`` does."""
    msg = molink_pb2.Step.FromString(data)
    out = None
    if not msg.error:
        out = codec.loads_step(msg.scheduler_output), codec.decode_tensors(list(msg.tensors))
    if msg.grammar_output:
        codec.loads(msg.grammar_output)
    return out


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "loads": codec.loads,
    "loads_step_data": codec.loads_step_data,
    "loads_step": codec.loads_step,
    "tensor_proto": decode_tensor_message,
    "step_proto": decode_step_message,
}
_PROTO_DECODERS = ("tensor_proto", "step_proto")


def _inflated(data: bytes, limit: int) -> tuple[int, bool]:
    """How many bytes inflating ``data`` produces before a decoder stops it at ``limit``, and
    whether that is all of it (a complete zlib stream, within the limit)."""
    inflater = zlib.decompressobj()
    size = 0
    pending = data
    try:
        while not inflater.eof and size <= limit:
            chunk = inflater.decompress(pending, 1 << 16)  # small: what inflated before an error
            pending = inflater.unconsumed_tail
            size += len(chunk)
            if not (chunk or pending):
                break
    except zlib.error:
        pass
    return size, inflater.eof and size <= limit and not inflater.unused_data


def justified_bytes(decoder: str, data: bytes) -> int:
    """What a message justifies allocating: its length, plus what its zlib parts inflate to
    (within the decoders' caps), plus ``PICKLE_ALLOC_PER_BYTE`` times each pickle in it
    (inflated)."""
    per_byte = pickle_scan.PICKLE_ALLOC_PER_BYTE
    cap = codec.MAX_STEP_DATA_BYTES
    if decoder == "loads":
        return per_byte * len(data)
    if decoder in ("loads_step_data", "loads_step"):
        size, complete = _inflated(data, cap)
        return len(data) + size + (per_byte * size if complete else 0)
    try:
        msg = (molink_pb2.Tensor if decoder == "tensor_proto" else molink_pb2.Step).FromString(data)
    except DecodeError:
        return len(data)
    total = per_byte * len(data)  # a Step's grammar output is a pickle
    tensors = [msg] if decoder == "tensor_proto" else list(msg.tensors)
    if decoder == "step_proto":
        size, complete = _inflated(msg.scheduler_output, cap)
        total += size + (per_byte * size if complete else 0)
    # A zlib tensor inflates into bytes, then a tensor as large (and maybe a cast of twice that).
    inflated = (_inflated(m.data, codec.MAX_MESSAGE_BYTES)[0] for m in tensors if m.zlib)
    return total + 4 * sum(inflated)


def allocation_bound(decoder: str, data: bytes) -> int:
    """The most a decoder may allocate (peak traced bytes) on ``data``: what it justifies,
    plus :data:`BOUND_SLACK`."""
    return justified_bytes(decoder, data) + BOUND_SLACK


@dataclass
class CaseResult:
    outcome: str  # decoded, rejected or crash
    error: str  # the exception's type name, "" when decoded
    peak: int  # peak traced allocation during the call, in bytes
    bound: int
    justified: int
    message: str = ""


def run_case(decoder: str, data: bytes) -> CaseResult:
    """Run one decoder on ``data``, tracing allocations (tracemalloc runs only for the call)."""
    justified = justified_bytes(decoder, data)
    func = DECODERS[decoder]
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    outcome, error, message = "decoded", "", ""
    try:
        result = func(data)
    except REJECTIONS as e:
        outcome, error, message = "rejected", type(e).__name__, str(e)[:200]
    except DecodeError as e:
        outcome = "rejected" if decoder in _PROTO_DECODERS else "crash"
        error, message = type(e).__name__, str(e)[:200]
    except Exception as e:  # that's what is being counted
        outcome, error, message = "crash", type(e).__name__, str(e)[:200]
    else:
        del result
    peak = tracemalloc.get_traced_memory()[1] - before
    if not tracing:
        tracemalloc.stop()
    return CaseResult(outcome, error, peak, justified + BOUND_SLACK, justified, message)


# --------------------------------------------------------------------------- mutations

MUTATIONS = (
    "flip",  # flip one bit
    "byte",  # set one byte
    "opcode",  # set one byte to a pickle opcode
    "insert",  # insert 1 to 9 bytes
    "delete",  # delete 1 to 16 bytes
    "truncate",
    "int",  # write an interesting integer, 1, 2, 4 or 8 bytes wide, anywhere
    "field",  # write an interesting integer over a length, index or frame field
    "repeat",  # repeat a few bytes up to 5000 times (deep nesting, floods)
    "splice",  # write a slice of another valid payload
)
INTERESTING_INTS = (
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0xFFFF,
    0x10000,
    2**31 - 1,
    2**31,
    2_000_000_000,
    2**32 - 1,
    2**40,
    2**62,
    2**63 - 1,
    2**64 - 1,
)
OPCODE_BYTES = bytes(sorted({ord(op.code) for op in pickletools.opcodes}))
# Opcodes whose argument is a length, an index, a frame size or an integer, and its width.
_FIELD_WIDTHS = {
    "SHORT_BINUNICODE": 1,
    "BINUNICODE": 4,
    "BINUNICODE8": 8,
    "SHORT_BINBYTES": 1,
    "BINBYTES": 4,
    "BINBYTES8": 8,
    "BYTEARRAY8": 8,
    "LONG1": 1,
    "LONG4": 4,
    "FRAME": 8,
    "BINGET": 1,
    "LONG_BINGET": 4,
    "BINPUT": 1,
    "LONG_BINPUT": 4,
    "BININT": 4,
    "BININT1": 1,
    "BININT2": 2,
}


@functools.cache
def arg_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    """(offset, width) of the length, index, frame and integer fields of a pickle, as far as it
    parses."""
    fields = []
    try:
        for op, _, pos in pickletools.genops(data):
            width = _FIELD_WIDTHS.get(op.name)
            if width is not None:
                fields.append((pos + 1, width))
    except Exception:  # a mutated pickle: the fields so far
        pass
    return tuple(fields)


def _interesting(value: int, width: int) -> bytes:
    number = INTERESTING_INTS[value % len(INTERESTING_INTS)]
    if (value >> 8) % 4 == 0:
        number = -number  # two's complement: a negative length
    return (number % (1 << (8 * width))).to_bytes(width, "little")


def mutate(
    data: bytes, mutations: Sequence[tuple[str, int, int]], donors: Sequence[bytes] = ()
) -> bytes:
    """Apply ``(kind, where, value)`` mutations (kinds from :data:`MUTATIONS`) to ``data``;
    ``where`` picks the position (or field), ``value`` what is written. Deterministic, so
    Hypothesis can shrink the mutations."""
    buf = bytearray(data)
    for kind, where, value in mutations:
        n = len(buf)
        pos = where % (n + 1)
        at = where % n if n else 0
        if kind == "flip" and n:
            buf[at] ^= 1 << (value % 8)
        elif kind == "byte" and n:
            buf[at] = value & 0xFF
        elif kind == "opcode" and n:
            buf[at] = OPCODE_BYTES[value % len(OPCODE_BYTES)]
        elif kind == "insert":
            buf[pos:pos] = value.to_bytes(8, "little")[: 1 + value % 8] + bytes([value % 256])
        elif kind == "delete":
            del buf[pos : pos + 1 + value % 16]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "int":
            width = (1, 2, 4, 8)[value % 4]
            buf[pos : pos + width] = _interesting(value >> 2, width)
        elif kind == "field":
            fields = arg_fields(data)
            if fields:
                offset, width = fields[where % len(fields)]
                buf[offset : offset + width] = _interesting(value, width)
        elif kind == "repeat" and n:
            chunk = buf[at : at + 1 + value % 4]
            buf[at:at] = chunk * (1 + (value >> 2) % 5000)
        elif kind == "splice" and donors:
            donor = donors[value % len(donors)]
            start = (value >> 8) % (len(donor) + 1)
            buf[pos : pos + (value >> 20) % 64] = donor[start : start + (value >> 26) % 64]
    return bytes(buf)


def random_mutations(rng: random.Random) -> list[tuple[str, int, int]]:
    return [
        (rng.choice(MUTATIONS), rng.getrandbits(32), rng.getrandbits(64))
        for _ in range(rng.randint(1, 4))
    ]


# --------------------------------------------------------------------------- lying tensors

TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int64", "int8", "bool", "complex128", "", "O")
SHAPE_VALUES = (0, 1, 3, 8, 2**31 - 1, 2**32, 2**62, 2**63 - 1, -1, -(2**63))


def lying_tensor(dtype: str, shape: Sequence[int], data: bytes, compressed: bool) -> bytes:
    """A ``Tensor`` message with the given fields (``data`` zlib-compressed if ``compressed``)."""
    payload = zlib.compress(data, 1) if compressed else data
    msg = molink_pb2.Tensor(name="x", dtype=dtype, shape=shape, data=payload, zlib=compressed)
    return msg.SerializeToString()


def random_lying_tensor(rng: random.Random) -> bytes:
    shape = [
        rng.choice(SHAPE_VALUES) if rng.random() < 0.5 else rng.randint(0, 64)
        for _ in range(rng.choice((0, 1, 2, 3, 40)))
    ]
    size = rng.choice((0, 1, 4, 16, 255, 4096))
    data = bytes([rng.getrandbits(8)]) * size if rng.random() < 0.5 else rng.randbytes(size)
    return lying_tensor(rng.choice(TENSOR_DTYPES), shape, data, rng.random() < 0.5)


# --------------------------------------------------------------------------- gadgets

_P5 = pickle.PROTO + b"\x05"


def pickle_of(*parts: bytes) -> bytes:
    """A protocol 5 pickle of opcodes and arguments ``parts``."""
    return _P5 + b"".join(parts) + pickle.STOP


def text(value: str) -> bytes:
    """The opcode pushing the string ``value``."""
    raw = value.encode()
    if len(raw) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return text(module) + text(name) + pickle.STACK_GLOBAL


def _int(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _persistent(kind: str, dtype: str, shape: Sequence[int], data: bytes) -> bytes:
    """A tensor or array as _TensorPickler writes it: ``(kind, dtype, shape, raw bytes)``."""
    dims = MARK + b"".join(_int(d) for d in shape) + TUPLE
    raw = pickle.BINBYTES + struct.pack("<I", len(data)) + data
    return pickle_of(MARK, text(kind), text(dtype), dims, raw, TUPLE, pickle.BINPERSID)


def _sampling_params_args(stop_token_ids: bytes) -> bytes:
    """The argument tuple of a SamplingParams REDUCE, with ``stop_token_ids`` spliced in."""
    from vllm.sampling_params import SamplingParams

    fields = SamplingParams.__struct_fields__
    args = (stop_token_ids if f == "stop_token_ids" else NONE for f in fields)
    return MARK + b"".join(args) + TUPLE


def _size(opcode: bytes, fmt: str, size: int) -> bytes:
    """A counted opcode declaring ``size`` bytes, followed by 16."""
    return pickle_of(opcode, struct.pack(fmt, size), b"x" * 16)


def _zlib_bomb(size: int) -> bytes:
    """zlib data that inflates to ``size`` zero bytes (compressed a MiB at a time)."""
    compressor = zlib.compressobj(1)
    chunk = bytes(1 << 20)
    out = [compressor.compress(chunk) for _ in range(size >> 20)]
    return b"".join(out) + compressor.compress(bytes(size % (1 << 20))) + compressor.flush()


def _step_message(**fields: Any) -> bytes:
    return molink_pb2.Step(**fields).SerializeToString()


@functools.cache
def gadgets() -> dict[str, tuple[str, bytes]]:
    """Hand-made hostile messages: name -> (decoder, data). Every one must be rejected."""
    step = valid_pickles()["step"]
    mro_9k = codec.dumps((model_runner_output(), "x" * 8000))
    memo_bomb = mro_9k[:2] + NONE + pickle.LONG_BINPUT + struct.pack("<I", 2 * 10**9)
    memo_bomb += pickle.POP + mro_9k[2:]
    system = _global("os", "system")
    call = text("echo pwned") + TUPLE1 + REDUCE
    so = _global("vllm.v1.core.sched.output", "SchedulerOutput")
    rebuild = _global("molink.comm.codec", "rebuild_dataclass")
    sampling_params = _global("vllm.sampling_params", "SamplingParams")
    # A list of 5000 ints (memo 0), then 2000 SamplingParams whose __init__ copies it.
    ints = b"".join(pickle.BININT + struct.pack("<i", i) for i in range(5000))
    shared_list = EMPTY_LIST + MEMOIZE + MARK + ints + APPENDS
    copies = (BINGET + b"\x01" + _sampling_params_args(BINGET + b"\x00") + REDUCE) * 2000
    copy_gadget = pickle_of(
        EMPTY_LIST, MARK, shared_list, sampling_params, MEMOIZE, copies, APPENDS
    )
    # A dict of 2000 items (memo 0), then 2000 OrderedDicts made from it.
    items = b"".join(_int(i) + NONE for i in range(2000))
    od_copies = (_global("collections", "OrderedDict") + BINGET + b"\x00" + TUPLE1 + REDUCE) * 2000
    od_gadget = pickle_of(EMPTY_DICT, MEMOIZE, MARK, items, pickle.SETITEMS, MARK, od_copies, TUPLE)
    # A string in a pair of itself, 60 times over: 2**60 strings to copy or repr.
    dag = text("x" * 200) + b"".join(
        MEMOIZE + pickle.LONG_BINGET + struct.pack("<I", i) + pickle.TUPLE2 for i in range(60)
    )
    valid_so = codec.dumps_step(scheduler_output(), {})
    return {
        # code execution
        "os.system via STACK_GLOBAL+REDUCE": ("loads", pickle_of(system, call)),
        "posix.system via STACK_GLOBAL+REDUCE": (
            "loads",
            pickle_of(_global("posix", "system"), call),
        ),
        "os.system via GLOBAL (protocol 0)": ("loads", b"cos\nsystem\n(S'echo pwned'\ntR."),
        "os.system via INST": ("loads", b"(S'echo pwned'\nios\nsystem\n."),
        "os.system via OBJ": ("loads", pickle_of(MARK, system, text("echo pwned"), pickle.OBJ)),
        "builtins.eval": ("loads", pickle_of(_global("builtins", "eval"), call)),
        "builtins.getattr": ("loads", pickle_of(_global("builtins", "getattr"), call)),
        "copyreg extension EXT1": ("loads", pickle_of(pickle.EXT1, b"\x01")),
        "persistent id, text form": ("loads", pickle_of(b"Ptensor\n")),
        "BUILD setting attributes of a class": (
            "loads",
            pickle_of(so, NONE, EMPTY_DICT, pickle.TUPLE2, pickle.BUILD),
        ),
        "NEWOBJ_EX": ("loads", pickle_of(so, EMPTY_TUPLE, EMPTY_DICT, pickle.NEWOBJ_EX)),
        "dataclass called by REDUCE (runs __init__)": ("loads", pickle_of(so, EMPTY_TUPLE, REDUCE)),
        "rebuild_dataclass of a non-dataclass": (
            "loads",
            pickle_of(rebuild, sampling_params, EMPTY_TUPLE, pickle.TUPLE2, REDUCE),
        ),
        "rebuild_dataclass with too few values": (
            "loads",
            pickle_of(rebuild, so, EMPTY_TUPLE, pickle.TUPLE2, REDUCE),
        ),
        "torch dtype called": (
            "loads",
            pickle_of(_global("torch", "float32"), EMPTY_TUPLE, REDUCE),
        ),
        # allocation gadgets
        "set(range(10**12))": (
            "loads",
            pickle_of(
                _global("builtins", "set"), _global("builtins", "range"), _int(10**12), TUPLE1
            )
            + REDUCE
            + TUPLE1
            + REDUCE,
        ),  # fmt: skip
        "LONG_BINPUT 2e9 in a 9 KB message": ("loads", memo_bomb),
        "BINPUT 255": ("loads", pickle_of(NONE, pickle.BINPUT, b"\xff")),
        "LONG_BINGET 2**31": ("loads", pickle_of(NONE, MEMOIZE, pickle.LONG_BINGET, b"\0\0\0\x80")),
        "BINGET of a later MEMOIZE": ("loads", pickle_of(BINGET, b"\x00", MEMOIZE)),
        "BINBYTES8 of 2**62 bytes": ("loads", _size(pickle.BINBYTES8, "<Q", 2**62)),
        "BINUNICODE8 of 2**62 bytes": ("loads", _size(pickle.BINUNICODE8, "<Q", 2**62)),
        "BYTEARRAY8 of 2**62 bytes": ("loads", _size(pickle.BYTEARRAY8, "<Q", 2**62)),
        "BINBYTES of 2**32-1 bytes": ("loads", _size(pickle.BINBYTES, "<I", 2**32 - 1)),
        "BINUNICODE of 2**32-1 bytes": ("loads", _size(pickle.BINUNICODE, "<I", 2**32 - 1)),
        "FRAME of 2**62 bytes": ("loads", _size(pickle.FRAME, "<Q", 2**62)),
        "LONG4 of 2**31-1 bytes": ("loads", _size(pickle.LONG4, "<i", 2**31 - 1)),
        "300,000 empty sets": ("loads", pickle_of(pickle.EMPTY_SET * 300_000)),
        "OrderedDict copying a shared dict": ("loads", od_gadget),
        "SamplingParams copying a shared list": ("loads", copy_gadget),
        "PoolingParams of a 2**60-fold argument (repr)": (
            "loads",
            pickle_of(_global("vllm.pooling_params", "PoolingParams"), MARK, dag, TUPLE, REDUCE),
        ),
        "enum looked up by a 2**60-fold value": (
            "loads",
            pickle_of(_global("vllm.v1.kv_cache_interface", "KVQuantMode"), dag, TUPLE1, REDUCE),
        ),
        # nesting
        "MARK nested 100,000 deep": ("loads", pickle_of(MARK * 100_000)),
        "tuple nested 1,000,000 deep, hashed": (
            "loads",
            pickle_of(EMPTY_DICT, EMPTY_TUPLE, TUPLE1 * 1_000_000, NONE, pickle.SETITEM),
        ),
        "list nested 100,000 deep": ("loads", pickle_of(EMPTY_LIST * 100_000, APPEND * 99_999)),
        "list containing itself": (
            "loads",
            pickle_of(EMPTY_LIST, MEMOIZE, BINGET, b"\x00", APPEND),
        ),
        "list changed after it was used": (
            "loads",
            pickle_of(EMPTY_LIST, MEMOIZE, TUPLE1, BINGET, b"\x00", NONE, APPEND, pickle.TUPLE2),
        ),
        # lying arrays and tensors in a pickle
        "ndarray of object dtype": ("loads", _persistent("ndarray", "|O", [1], bytes(8))),
        "ndarray of a sub-array dtype": (
            "loads",
            _persistent("ndarray", "(10000000,)f8", [1], b""),
        ),
        "ndarray of a void dtype": ("loads", _persistent("ndarray", "V1000000000", [1], b"")),
        "ndarray of a structured dtype": ("loads", _persistent("ndarray", "i4,i4", [1], bytes(8))),
        "ndarray lying about its shape": (
            "loads",
            _persistent("ndarray", "<f4", [2**40], bytes(16)),
        ),
        "ndarray of negative dimensions": (
            "loads",
            _persistent("ndarray", "<f4", [-4, -1], bytes(16)),
        ),
        "tensor whose shape product overflows": (
            "loads",
            _persistent("tensor", "float32", [2**62, 2**62, 0], b""),
        ),
        "tensor lying about its size": (
            "loads",
            _persistent("tensor", "float32", [1000], bytes(4)),
        ),
        "tensor of complex dtype": ("loads", _persistent("tensor", "complex128", [1], bytes(16))),
        "step pickle with data after STOP": ("loads", step + b"junk"),
        "step pickle truncated": ("loads", step[: len(step) // 2]),
        # compressed step data
        "zlib bomb past the step data cap": (
            "loads_step_data",
            _zlib_bomb(codec.MAX_STEP_DATA_BYTES + 1),
        ),
        "zlib with data after its end": ("loads_step_data", zlib.compress(step) + b"junk"),
        "zlib truncated": ("loads_step", zlib.compress(step)[:-5]),
        "zlib of a memo bomb": ("loads_step", zlib.compress(memo_bomb)),
        "zlib of 300,000 empty sets": (
            "loads_step_data",
            zlib.compress(pickle_of(pickle.EMPTY_SET * 300_000)),
        ),
        # tensor messages
        "tensor zlib bomb": ("tensor_proto", lying_tensor("float32", [4], bytes(10**6), True)),
        "tensor declaring 2**40 bytes, compressed": (
            "tensor_proto",
            lying_tensor("float32", [2**38], bytes(1000), True),
        ),
        "tensor of 40 dimensions": (
            "tensor_proto",
            lying_tensor("float32", [1] * 40, bytes(4), False),
        ),
        "tensor of a negative dimension": (
            "tensor_proto",
            lying_tensor("float32", [-1], b"", False),
        ),
        "tensor shape product overflowing": (
            "tensor_proto",
            lying_tensor("float32", [2**62, 2**62, 0], b"", False),
        ),
        "tensor of a megabyte dtype name": (
            "tensor_proto",
            lying_tensor("f" * 10**6, [1], bytes(4), False),
        ),
        "tensor of object dtype": ("tensor_proto", lying_tensor("object", [1], bytes(8), False)),
        "tensor message lying about its size": (
            "tensor_proto",
            lying_tensor("int64", [3], bytes(8), False),
        ),
        "tensor of corrupt zlib data": (
            "tensor_proto",
            molink_pb2.Tensor(
                dtype="float32", shape=[4], data=b"x\x9cjunk", zlib=True
            ).SerializeToString(),
        ),  # fmt: skip
        # step messages
        "step whose scheduler output is a memo bomb": (
            "step_proto",
            _step_message(scheduler_output=zlib.compress(memo_bomb)),
        ),
        "step whose grammar output runs os.system": (
            "step_proto",
            _step_message(scheduler_output=valid_so, grammar_output=pickle_of(system, call)),
        ),
        "step with a tensor lying about its shape": (
            "step_proto",
            _step_message(
                scheduler_output=valid_so,
                tensors=[molink_pb2.Tensor(name="h", dtype="float32", shape=[2**40], data=b"")],
            ),
        ),
    }


# --------------------------------------------------------------------------- case streams


def _random_pickle(rng: random.Random) -> bytes:
    """Protocol 5 header, then bytes biased towards pickle opcodes and small arguments."""
    body = bytes(
        rng.choice(OPCODE_BYTES) if rng.random() < 0.6 else rng.getrandbits(8)
        for _ in range(rng.randint(0, 512))
    )
    return _P5 + body


def cases(decoder: str, rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    """``count`` (strategy, data) cases for ``decoder``: random bytes, mutations of valid
    payloads and (for the tensor decoder) lying messages."""
    pickles = valid_pickles()
    donors = list(pickles.values())
    step_raw = pickles["step"]
    step_zlib = zlib.compress(step_raw, 1)
    for _ in range(count):
        roll = rng.random()
        if roll < 0.1:
            yield "random", rng.randbytes(rng.randint(0, 2048))
        elif decoder == "loads":
            if roll < 0.25:
                yield "random_pickle", _random_pickle(rng)
            else:
                base = rng.choice(donors)
                yield "mutation", mutate(base, random_mutations(rng), donors)
        elif decoder in ("loads_step_data", "loads_step"):
            if roll < 0.2:
                yield "zlib_random_pickle", zlib.compress(_random_pickle(rng), 1)
            elif roll < 0.4:
                yield "mutation_zlib", mutate(step_zlib, random_mutations(rng))
            else:
                raw = mutate(step_raw, random_mutations(rng), donors)
                yield "mutation_raw", zlib.compress(raw, 1)
        elif decoder == "tensor_proto":
            if roll < 0.5:
                yield "lying", random_lying_tensor(rng)
            else:
                base = rng.choice(valid_tensor_messages())
                yield "mutation", mutate(base, random_mutations(rng), valid_tensor_messages())
        else:  # step_proto
            base = rng.choice(valid_step_messages())
            if roll < 0.6:
                yield "mutation", mutate(base, random_mutations(rng), valid_step_messages())
            else:
                msg = molink_pb2.Step.FromString(base)
                raw = mutate(step_raw, random_mutations(rng), donors)
                msg.scheduler_output = zlib.compress(raw, 1)
                if rng.random() < 0.5:
                    del msg.tensors[:]
                    msg.tensors.append(molink_pb2.Tensor.FromString(random_lying_tensor(rng)))
                yield "mutation_inner", msg.SerializeToString()
