"""A stage's activations on their way between its device and the wire: the CPU path these
machines take, and (where a GPU is present, e.g. under ``scripts/gpu_check.sh``) the CUDA path."""

from __future__ import annotations

import pytest
import torch

from molink.comm import codec
from molink.core.step import HostActivations
from molink.worker.activation_staging import ActivationStaging

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def activations(device: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(7, 64, generator=g).to(device=device, dtype=dtype)
        for name in ("hidden_states", "residual")
    }


def test_a_cpu_stage_hands_its_tensors_on_as_they_are() -> None:
    staging = ActivationStaging(torch.device("cpu"))
    tensors = activations("cpu")
    out = staging.to_host(tensors, ["r"])
    assert not staging.pin_memory
    assert out.order == ["r"]
    assert all(out.wait()[k] is tensors[k] for k in tensors)  # no copy on CPU


def test_host_activations_wait_for_their_copy_once() -> None:
    class Event:
        waits = 0

        def synchronize(self) -> None:
            Event.waits += 1

    out = HostActivations({"hidden_states": torch.arange(3.0)[:, None]}, ["a", "b"], Event())
    a, b = out.split([(1, ["a"]), (2, ["b"])])  # one head's rows each, sharing the copy
    assert a.order == ["a"] and b.wait()["hidden_states"].flatten().tolist() == [1.0, 2.0]
    a.wait()
    out.wait()
    out.wait()
    assert Event.waits == 3


def test_wire_round_trip_into_host_memory_is_exact() -> None:
    tensors = activations("cpu", torch.bfloat16)
    msgs = codec.encode_tensors(ActivationStaging(torch.device("cpu")).to_host(tensors, []).wait())
    back = codec.decode_tensors(msgs, torch.float32)
    for name, t in tensors.items():
        assert back[name].dtype == torch.float32
        assert torch.equal(back[name], t.float())


@needs_cuda
def test_a_cuda_stage_copies_off_its_buffers_to_pinned_memory() -> None:
    staging = ActivationStaging(torch.device("cuda"))
    tensors = activations("cuda", torch.bfloat16)
    expected = {k: v.cpu() for k, v in tensors.items()}
    out = staging.to_host(tensors, ["r"])
    for t in tensors.values():  # the next step overwrites a CUDA graph's output buffers
        t.fill_(0)
    host = out.wait()
    assert staging.pin_memory
    for name, t in host.items():
        assert t.device.type == "cpu" and t.is_pinned()
        assert torch.equal(t, expected[name])


@needs_cuda
def test_received_activations_land_in_pinned_memory() -> None:
    tensors = activations("cpu", torch.float16)
    back = codec.decode_tensors(codec.encode_tensors(tensors), torch.bfloat16, pin_memory=True)
    for name, t in back.items():
        assert t.is_pinned() and t.dtype == torch.bfloat16
        assert torch.equal(t, tensors[name].to(torch.bfloat16))
        on_device = torch.empty_like(t, device="cuda")
        on_device.copy_(t, non_blocking=True)
        assert torch.equal(on_device.cpu(), t)
