"""What a stage needs to resume a request it has never seen: its tokens and sampling settings.

After a stage is lost the head preempts every request back to waiting and re-prefills it on the
rebuilt chain (vLLM's preempt-and-recompute path). vLLM resumes a preempted request as *cached*
request data, which a model runner can only apply to a request it already holds; a replacement
stage, and every stage after the epoch reset, holds none. So the head's scheduler ships a
:class:`RequestSnapshot` with the first step that resumes such a request, and each stage's worker
installs it before running that step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.lora.request import LoRARequest
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import SamplingParams
from vllm.v1.request import Request

SNAPSHOTS_ATTR = "molink_snapshots"


@dataclass
class RequestSnapshot:
    """A request as the head's scheduler knows it when it resumes the request."""

    prompt_token_ids: list[int] | None
    output_token_ids: list[int]
    sampling_params: SamplingParams | None
    pooling_params: PoolingParams | None
    lora_request: LoRARequest | None
    prompt_is_token_ids: list[bool] | None
    prompt_embeds: torch.Tensor | None  # [num_prompt_tokens, hidden_size]

    @classmethod
    def of(cls, request: Request) -> RequestSnapshot:
        return cls(
            prompt_token_ids=list(request.prompt_token_ids)
            if request.prompt_token_ids is not None
            else None,
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            pooling_params=request.pooling_params,
            lora_request=request.lora_request,
            prompt_is_token_ids=request.prompt_is_token_ids,
            prompt_embeds=request.prompt_embeds,
        )


def snapshots_of(scheduler_output: Any) -> dict[str, RequestSnapshot]:
    """The snapshots the scheduler attached to a scheduler output (none by default)."""
    return getattr(scheduler_output, SNAPSHOTS_ATTR, None) or {}
