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
)
def test_restricted_unpickler_refuses_code(payload):
    with pytest.raises(pickle.UnpicklingError):
        codec.loads(payload)
