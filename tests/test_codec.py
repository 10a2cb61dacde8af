"""The wire codec: raw-byte tensors and the restricted unpickler."""

from __future__ import annotations

import os
import pickle
import zlib

import numpy as np
import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import LogprobsLists, LogprobsTensors, ModelRunnerOutput

from molink.comm import codec
from molink.comm.proto import molink_pb2
from molink.core.request_snapshot import RequestSnapshot


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensor_round_trip(dtype):
    t = (torch.randn(5, 7) * 10).to(dtype)
    assert torch.equal(codec.bytes_to_tensor(*codec.tensor_to_bytes(t)), t)


def test_wire_dtype_halves_bytes_and_casts_back():
    tensors = {"hidden_states": torch.randn(4, 576), "residual": torch.randn(4, 576)}
    msgs = codec.encode_tensors(tensors, codec.WireFormat(torch.float16))
    assert sum(len(m.data) for m in msgs) == 2 * 4 * 576 * 2
    back = codec.decode_tensors(msgs, torch.float32)
    assert back["residual"].dtype == torch.float32
    assert torch.allclose(back["residual"], tensors["residual"], atol=1e-2)


def test_zlib_wire_is_lossless():
    tensors = {"hidden_states": torch.zeros(8, 64), "residual": torch.randn(8, 64)}
    wire = codec.WireFormat.from_names(None, "zlib")
    msgs = codec.encode_tensors(tensors, wire)
    assert all(m.zlib for m in msgs)
    assert len(msgs[0].data) < 8 * 64 * 4 // 10  # zeros compress
    back = codec.decode_tensors(msgs)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_zlib_bomb_is_refused():
    bomb = molink_pb2.Tensor(
        name="x", dtype="float32", shape=[4], data=zlib.compress(b"\0" * 1_000_000), zlib=True
    )
    with pytest.raises(ValueError, match="larger than its shape"):
        codec.decode_tensors([bomb])


def test_bad_wire_format_names_are_refused():
    with pytest.raises(ValueError):
        codec.WireFormat.from_names("int8", None)
    with pytest.raises(ValueError):
        codec.WireFormat.from_names(None, "lz77")


def test_dataclasses_travel_without_field_names():
    from vllm.v1.core.sched.output import CachedRequestData

    data = CachedRequestData.make_empty()
    data.req_ids.append("req-1")
    payload = codec.dumps(data)
    assert b"num_computed_tokens" not in payload
    back = codec.loads(payload)
    assert isinstance(back, CachedRequestData) and back.req_ids == ["req-1"]


def test_compact_dataclass_with_wrong_arity_is_refused():
    import pickle

    from vllm.v1.core.sched.output import CachedRequestData

    with pytest.raises(pickle.UnpicklingError):
        codec.loads(_reduce_payload(CachedRequestData, (1, 2)))


def _reduce_payload(cls: type, values: tuple) -> bytes:
    import io
    import pickle

    class P(pickle.Pickler):
        def reducer_override(self, obj):
            if obj is MARK:
                return codec.rebuild_dataclass, (cls, values)
            return NotImplemented

    buf = io.BytesIO()
    P(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(MARK)
    return buf.getvalue()


class _Mark:
    pass


MARK = _Mark()


def test_tensor_size_mismatch_is_refused():
    dtype, shape, data = codec.tensor_to_bytes(torch.zeros(3, 3))
    with pytest.raises(ValueError):
        codec.bytes_to_tensor(dtype, [4, 4], data)
    with pytest.raises(ValueError):
        codec.bytes_to_tensor("complex128", shape, data)


def make_scheduler_output() -> SchedulerOutput:
    so = SchedulerOutput.make_empty()
    so.scheduled_new_reqs = [
        NewRequestData(
            req_id="r1",
            prompt_token_ids=[1, 2, 3],
            mm_features=[],
            sampling_params=SamplingParams(temperature=0.0, max_tokens=5, stop=["x"]),
            pooling_params=None,
            block_ids=([0, 1],),
            num_computed_tokens=0,
            lora_request=None,
        )
    ]
    so.scheduled_cached_reqs = CachedRequestData.make_empty()
    so.num_scheduled_tokens = {"r1": 3}
    so.total_num_scheduled_tokens = 3
    so.finished_req_ids = {"r0"}
    return so


def test_scheduler_output_round_trip():
    so = make_scheduler_output()
    back = codec.loads(codec.dumps(so))
    assert back.num_scheduled_tokens == {"r1": 3}
    assert back.finished_req_ids == {"r0"}
    assert back.scheduled_new_reqs[0].sampling_params.stop == ["x"]


def test_step_with_resume_snapshots_round_trip():
    snapshot = RequestSnapshot(
        prompt_token_ids=[1, 2, 3],
        output_token_ids=[7, 8],
        sampling_params=SamplingParams(temperature=0.0, max_tokens=5),
        pooling_params=None,
        lora_request=None,
        prompt_is_token_ids=None,
        prompt_embeds=None,
    )
    so, snapshots = codec.loads_step(codec.dumps_step(make_scheduler_output(), {"r1": snapshot}))
    assert so.num_scheduled_tokens == {"r1": 3}
    assert snapshots["r1"].output_token_ids == [7, 8]
    assert snapshots["r1"].sampling_params.max_tokens == 5


@pytest.mark.parametrize(
    "payload",
    [
        "not a step",
        (SchedulerOutput.make_empty(),),
        (SchedulerOutput.make_empty(), ["r1"]),
        (SchedulerOutput.make_empty(), {"r1": SamplingParams()}),
        (SamplingParams(), {}),
    ],
)
def test_malformed_step_payloads_are_refused(payload):
    with pytest.raises(pickle.UnpicklingError):
        codec.loads_step(codec.dumps_step_data(payload))


def test_model_runner_output_with_logprobs_round_trip():
    out = ModelRunnerOutput(
        req_ids=["a"],
        req_id_to_index={"a": 0},
        sampled_token_ids=[[7]],
        logprobs=LogprobsLists(
            np.array([[7, 3]]), np.array([[-0.1, -2.0]], dtype=np.float32), np.array([1])
        ),
        prompt_logprobs_dict={
            "a": LogprobsTensors(torch.tensor([[1]]), torch.tensor([[-0.5]]), torch.tensor([1]))
        },
    )
    back = codec.loads(codec.dumps(out))
    assert back.sampled_token_ids == [[7]]
    assert np.array_equal(back.logprobs.logprob_token_ids, out.logprobs.logprob_token_ids)
    assert torch.equal(back.prompt_logprobs_dict["a"].logprobs, torch.tensor([[-0.5]]))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(_Exploit()),
        pickle.dumps(torch.zeros(2)),  # torch's own reduce goes through torch.load machinery
        pickle.dumps(np.array([object()], dtype=object)),
        pickle.dumps(print),
    ],
    ids=["os-system", "torch-tensor", "numpy-object-array", "builtin-print"],  # same in workers
)
def test_restricted_unpickler_refuses_code(payload):
    with pytest.raises(pickle.UnpicklingError):
        codec.loads(payload)


def _peak_during(func, *args) -> int:
    """Peak traced allocation (bytes) while ``func(*args)`` runs; its exception is swallowed."""
    import contextlib
    import tracemalloc

    tracemalloc.start()
    with contextlib.suppress(Exception):  # the callers check what is raised separately
        func(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memo_index_bomb_is_refused_before_allocating():
    """A 9 KB message whose LONG_BINPUT index of 2e9 made the C unpickler ask for 32 GB."""
    import struct

    payload = codec.dumps(("x" * 8000, SamplingParams()))
    bomb = payload[:2] + pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2_000_000_000)
    bomb += pickle.POP + payload[2:]
    with pytest.raises(pickle.UnpicklingError, match="LONG_BINPUT"):
        codec.loads(bomb)
    assert _peak_during(codec.loads, bomb) < 1 << 20


@pytest.mark.parametrize(
    "body",
    [
        pickle.BINBYTES8 + (2**62).to_bytes(8, "little") + b"x" * 16,
        pickle.BINBYTES + (2**32 - 1).to_bytes(4, "little") + b"x" * 16,
        pickle.BINUNICODE + (2**31).to_bytes(4, "little") + b"x" * 16,
        pickle.FRAME + (2**62).to_bytes(8, "little") + pickle.NONE,
        pickle.NONE + pickle.MEMOIZE + pickle.LONG_BINGET + (2**31).to_bytes(4, "little"),
    ],
)
def test_lying_sizes_and_indices_are_refused_before_allocating(body):
    data = pickle.PROTO + b"\x05" + body + pickle.STOP
    with pytest.raises(pickle.UnpicklingError):
        codec.loads(data)
    assert _peak_during(codec.loads, data) < 1 << 20


def test_deep_nesting_is_refused():
    """Hashing a tuple nested a million deep overflowed the C stack (a segfault)."""
    data = pickle.PROTO + b"\x05}" + pickle.EMPTY_TUPLE + pickle.TUPLE1 * 1_000_000
    with pytest.raises(pickle.UnpicklingError, match="nested too deep"):
        codec.loads(data + pickle.NONE + pickle.SETITEM + pickle.STOP)


def test_builtins_are_not_callable_from_a_pickle():
    class SetOfRange:
        def __reduce__(self):
            return set, (range(10**12),)

    with pytest.raises(pickle.UnpicklingError, match="builtins"):
        codec.loads(pickle.dumps(SetOfRange(), protocol=5))


def test_every_refusal_is_one_exception():
    """A dict keyed by a list (TypeError in the unpickler) is a PeerDataError like the rest."""
    data = pickle.PROTO + b"\x05" + pickle.EMPTY_DICT + pickle.EMPTY_LIST + pickle.NONE
    with pytest.raises(codec.PeerDataError) as refused:
        codec.loads(data + pickle.SETITEM + pickle.STOP)
    assert isinstance(refused.value.__cause__, TypeError)
    assert issubclass(codec.PeerDataError, pickle.UnpicklingError)
    assert issubclass(codec.PeerDataError, ValueError)
    with pytest.raises(codec.PeerDataError):
        codec.loads_step_data(b"not zlib")
    with pytest.raises(codec.PeerDataError):
        codec.decode_tensors([molink_pb2.Tensor(dtype="float32", shape=[2**40], data=b"")])


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.float16])
def test_arrays_of_plain_dtypes_round_trip(dtype):
    a = np.arange(12).reshape(3, 4).astype(dtype)
    back = codec.loads(codec.dumps(a))
    assert back.dtype == a.dtype and np.array_equal(back, a)


@pytest.mark.parametrize("dtype", ["|O", "V16", "(4,)f8", "i4,i4", ">f4"])
def test_arrays_of_other_dtypes_are_refused(dtype):
    import struct

    data = b"\x00" * 16
    pid = (
        pickle.MARK
        + bytes([0x8C, 7]) + b"ndarray"
        + bytes([0x8C, len(dtype)]) + dtype.encode()
        + pickle.BININT1 + b"\x01" + pickle.TUPLE1
        + pickle.BINBYTES + struct.pack("<I", len(data)) + data
        + pickle.TUPLE
    )  # fmt: skip
    with pytest.raises(pickle.UnpicklingError, match="not accepted"):
        codec.loads(pickle.PROTO + b"\x05" + pid + pickle.BINPERSID + pickle.STOP)


def test_inflate_bounded():
    data = zlib.compress(b"abc" * 100)
    assert codec.inflate_bounded(data, 300) == b"abc" * 100
    assert codec.inflate_bounded(data, 299) is None
    assert codec.inflate_bounded(data[:-2], 300) is None  # truncated
    assert codec.inflate_bounded(data + b"x", 300) is None  # data after the stream
    assert codec.inflate_bounded(b"garbage", 300) is None
    big = bytes(3 * 1024 * 1024 + 5)
    assert codec.inflate_bounded(zlib.compress(big), len(big)) == big
    assert codec.inflate_bounded(zlib.compress(b""), 0) == b""


def test_empty_tensors_travel():
    tensors = {"hidden_states": torch.zeros(0, 576), "residual": torch.zeros(2, 0)}
    for compression in (None, "zlib"):
        msgs = codec.encode_tensors(tensors, codec.WireFormat.from_names(None, compression))
        back = codec.decode_tensors(msgs)
        assert {k: t.shape for k, t in back.items()} == {k: t.shape for k, t in tensors.items()}


def test_max_message_bytes_matches_the_grpc_limit():
    from molink.comm import grpc_options

    assert codec.MAX_MESSAGE_BYTES == grpc_options.MAX_MESSAGE_BYTES
