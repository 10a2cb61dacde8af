"""Which ``--serving_layers`` to give each node so that every stage takes the same time per step.

In a pipeline each micro-batch passes every stage, so the slowest stage sets the decode rate.
An even split of the layers is not even in time: the last stage also runs the LM head (a
``vocab × hidden`` matrix multiply per sampled token) and the sampler. For SmolLM2-135M the
head is as large as eight of its thirty layers; for 7B-class models, half a layer (32k
vocabularies) to two and a half (128k-152k).

The cost of a decode step is modelled per layer as its parameter count (read from the
safetensors headers; nothing is loaded), plus a fixed per-layer overhead for the work that
isn't a weight multiply (attention, norms, rotary, the framework's per-op cost). The last
stage adds ``vocab_size × hidden_size`` for the LM head. :func:`~molink.core.span_choice.
balanced_split` then picks the spans that minimize the slowest stage.

The overhead's default was measured on the 2-core test machine (``benchmark/compare.py
--trace``, SmolLM2-135M in float32, 16 tokens per micro-batch): a layer's non-GEMM work took
as long as about 3.5M parameters of GEMM, so there the LM head costs 4 layers, not 8. It
matters for small models only; set ``--layer-overhead`` from your own trace.

``molink split-plan --model M --nodes 3`` (:mod:`molink.entrypoints.cli.split_plan`) prints one
span per node, in chain order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from molink.core.span_choice import balanced_split
from molink.weight_digest import checkpoint_dir, layer_of, safetensors_files, safetensors_header

#: Parameter-equivalents of a decoder layer's work besides its weight GEMMs (see module doc).
LAYER_OVERHEAD_PARAMS = 3.5e6


@dataclass(frozen=True)
class DecodeCosts:
    """A decode step's cost per token, in parameter-equivalents."""

    layers: tuple[float, ...]  # per decoder layer, overhead included
    lm_head: float  # on the last stage only

    def stage(self, start: int, end: int, last: bool) -> float:
        """The cost of a stage serving ``start..end`` (inclusive); ``last``: it has the head."""
        return sum(self.layers[start : end + 1]) + (self.lm_head if last else 0.0)


def decode_costs(model: str, layer_overhead: float = LAYER_OVERHEAD_PARAMS) -> DecodeCosts:
    """``model``'s per-layer decode costs, from its local checkpoint's config and headers.

    Raises ValueError when the checkpoint isn't local, its config lacks the sizes needed, or
    it has no safetensors weights to size its layers by. A layer without tensors of its own
    counts as the mean of those found.
    """
    folder = checkpoint_dir(model)
    if folder is None or not (folder / "config.json").is_file():
        raise ValueError(f"no local checkpoint with a config.json for {model}")
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config") or config
    try:
        num_layers = int(config["num_hidden_layers"])
        lm_head = float(config["vocab_size"]) * float(config["hidden_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{model}: config.json lacks the layer count or sizes ({e})") from e
    params = [0.0] * num_layers
    for path in safetensors_files(folder):
        with path.open("rb") as f:
            header, _ = safetensors_header(f, path)
        for name, meta in header.items():
            layer = layer_of(name)
            if layer is not None and layer < num_layers:
                params[layer] += math.prod(meta["shape"])
    found = [p for p in params if p]
    if not found:
        raise ValueError(f"{model}: no safetensors weights to size its layers by")
    fill = sum(found) / len(found)
    layers = tuple((p or fill) + layer_overhead for p in params)
    return DecodeCosts(layers=layers, lm_head=lm_head)


def plan(costs: DecodeCosts, nodes: int) -> list[tuple[int, int]]:
    """One inclusive ``(start, end)`` span per node, in chain order, equal in decode time."""
    return balanced_split(costs.layers, costs.lm_head, nodes)
