"""Moving a stage's output activations from its device to host memory, where the wire takes them.

A CPU stage has nothing to move: vLLM's CPU runner returns fresh host tensors every step.

A CUDA stage (NVIDIA or ROCm) takes three steps, all on the compute thread, none waiting for the
copy:

1. It waits for the step's kernels, so that the compute time the stage reports is the device's
   (the micro-batching policy fits its cost model from it) and not the time to launch them.
2. It copies the outputs on the device into fresh tensors. With CUDA graphs the model's outputs are
   the graph's static buffers, which the next step overwrites.
3. It copies those tensors to pinned host memory on a copy stream, which runs while the next step
   computes. The link that sends them waits for the copy (:meth:`HostActivations.wait`).

Other accelerators copy synchronously. Received activations are decoded straight into pinned host
memory (``pin_memory`` of :func:`molink.comm.codec.decode_tensors`), so the model runner's copy to
the device doesn't block the host either.
"""

from __future__ import annotations

import torch

from molink.core.step import HostActivations


class ActivationStaging:
    """Takes a stage's output activations off its device (one per stage worker)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def pin_memory(self) -> bool:
        """Whether activations arriving for this device should be decoded into pinned memory."""
        return self._copy_stream is not None

    def to_host(self, tensors: dict[str, torch.Tensor], order: list[str]) -> HostActivations:
        """Start moving ``tensors`` (each [num_tokens, hidden_size], on the device, the rows of
        the requests in ``order``) to the host.

        Returns at once; the tensors may be overwritten by the next step as soon as it does.
        """
        if self.device.type == "cpu":
            return HostActivations(dict(tensors), order)
        if self._copy_stream is None:
            return HostActivations({name: t.to("cpu") for name, t in tensors.items()}, order)
        compute = torch.cuda.current_stream(self.device)
        compute.synchronize()
        own = {name: t.clone() for name, t in tensors.items()}  # off the runner's buffers
        self._copy_stream.wait_stream(compute)
        host = {}
        with torch.cuda.stream(self._copy_stream):
            for name, t in own.items():
                host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host[name].copy_(t, non_blocking=True)
                # Keep the device copy alive until the copy stream has read it.
                t.record_stream(self._copy_stream)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return HostActivations(host, order, ready)
