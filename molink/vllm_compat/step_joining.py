"""Several heads' steps as one vLLM step, and its ``ModelRunnerOutput`` split back per head.

A follower that several heads share runs their waiting steps as one forward pass
(:mod:`molink.engine.stage_engine`). vLLM's model runner takes one ``SchedulerOutput`` per step
and returns one ``ModelRunnerOutput``: this module joins the first and splits the second, field
by field. Only plain steps are joined (:func:`can_join`): tokens scheduled, no speculative
decoding, encoder inputs, structured output, KV connector or Mamba block copies. Any other step
runs alone, as vLLM would run it.

Needs from vLLM: the fields of ``SchedulerOutput``, ``CachedRequestData`` and
``ModelRunnerOutput`` are the ones named here (the contract test lists them, so a new field
fails it before it is silently dropped); ``ModelRunnerOutput`` has one entry per scheduled
request, in the runner's row order, and ``LogprobsLists`` one row per request when no request
has draft tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
from vllm.v1.outputs import LogprobsLists, ModelRunnerOutput

#: The ``SchedulerOutput`` fields :func:`join_steps` merges; every other field must hold its
#: empty value in a step that is joined.
JOINED_FIELDS = frozenset(
    {
        "scheduled_new_reqs",
        "scheduled_cached_reqs",
        "num_scheduled_tokens",
        "total_num_scheduled_tokens",
        "finished_req_ids",
        "free_encoder_mm_hashes",
        "preempted_req_ids",
        "new_block_ids_to_zero",
        "num_common_prefix_blocks",
    }
)
#: The ``ModelRunnerOutput`` fields :func:`split_output` splits per request; every other field
#: must be empty in a joined step's output.
SPLIT_FIELDS = frozenset(
    {
        "req_ids",
        "req_id_to_index",
        "sampled_token_ids",
        "logprobs",
        "prompt_logprobs_dict",
        "prompt_token_id_logprobs_dict",
        "pooler_output",
        "num_nans_in_logits",
    }
)

_EMPTY = SchedulerOutput.make_empty()


def request_ids_named(so: SchedulerOutput) -> set[str]:
    """Every request id a step names, in any field (what a shared stage checks belongs to the
    step's head)."""
    cached = so.scheduled_cached_reqs
    named = {r.req_id for r in so.scheduled_new_reqs}
    named.update(cached.req_ids, cached.resumed_req_ids, cached.all_token_ids)
    named.update(so.num_scheduled_tokens, so.finished_req_ids, so.preempted_req_ids or ())
    named.update(so.scheduled_spec_decode_tokens, so.scheduled_encoder_inputs)
    named.update(so.num_invalid_spec_tokens or ())
    return named


def can_join(so: SchedulerOutput) -> bool:
    """Whether a step may share its forward pass with other heads' steps."""
    if so.total_num_scheduled_tokens <= 0:
        return False
    for f in dataclasses.fields(SchedulerOutput):
        if f.name in JOINED_FIELDS:
            continue
        value = getattr(so, f.name)
        if value != getattr(_EMPTY, f.name) and (value or getattr(_EMPTY, f.name)):
            return False
    return True


def join_steps(steps: list[SchedulerOutput]) -> SchedulerOutput:
    """One step that schedules everything ``steps`` schedule (each one :func:`can_join`), with
    their requests in order.

    Needs from vLLM: ``SchedulerOutput`` and ``CachedRequestData`` hold the fields merged here,
    and every other ``SchedulerOutput`` field is empty in a step :func:`can_join` accepts.
    """
    joined = SchedulerOutput.make_empty()
    cached = CachedRequestData.make_empty()
    preempted: set[str] = set()
    zero: list[int] = []
    for so in steps:
        joined.scheduled_new_reqs += so.scheduled_new_reqs
        c = so.scheduled_cached_reqs
        cached.req_ids += c.req_ids
        cached.resumed_req_ids |= c.resumed_req_ids
        cached.new_token_ids += c.new_token_ids
        cached.all_token_ids.update(c.all_token_ids)
        cached.new_block_ids += c.new_block_ids
        cached.num_computed_tokens += c.num_computed_tokens
        cached.num_output_tokens += c.num_output_tokens
        joined.num_scheduled_tokens.update(so.num_scheduled_tokens)
        joined.total_num_scheduled_tokens += so.total_num_scheduled_tokens
        joined.finished_req_ids |= so.finished_req_ids
        joined.free_encoder_mm_hashes += so.free_encoder_mm_hashes
        preempted |= so.preempted_req_ids or set()
        zero += so.new_block_ids_to_zero or []
    joined.scheduled_cached_reqs = cached
    joined.preempted_req_ids = preempted or None
    joined.new_block_ids_to_zero = zero or None
    # Cascade attention over a prefix common to every request: none across heads.
    joined.num_common_prefix_blocks = [0] * len(steps[0].num_common_prefix_blocks)
    return joined


def split_output(output: ModelRunnerOutput, parts: Iterable[list[str]]) -> list[ModelRunnerOutput]:
    """The output of a joined step, one per part (the request ids of each joined step).

    Needs from vLLM: a ``ModelRunnerOutput`` has one entry per scheduled request (found through
    ``req_id_to_index``) in the fields of :data:`SPLIT_FIELDS`, and no others set.
    """
    for f in dataclasses.fields(ModelRunnerOutput):
        if f.name not in SPLIT_FIELDS and getattr(output, f.name) is not None:
            raise ValueError(f"a joined step's output has {f.name}, which can't be split")
    logprobs = output.logprobs
    if logprobs is not None and logprobs.cu_num_generated_tokens is not None:
        raise ValueError("a joined step's logprobs have several positions per request")
    split = []
    for req_ids in parts:
        rows = [output.req_id_to_index[r] for r in req_ids]
        split.append(
            ModelRunnerOutput(
                req_ids=list(req_ids),
                req_id_to_index={r: i for i, r in enumerate(req_ids)},
                sampled_token_ids=[output.sampled_token_ids[i] for i in rows],
                logprobs=None
                if logprobs is None
                else LogprobsLists(
                    logprobs.logprob_token_ids[rows],
                    logprobs.logprobs[rows],
                    logprobs.sampled_token_ranks[rows],
                ),
                prompt_logprobs_dict=_only(output.prompt_logprobs_dict, req_ids),
                prompt_token_id_logprobs_dict=_only(output.prompt_token_id_logprobs_dict, req_ids),
                pooler_output=None
                if output.pooler_output is None
                else [output.pooler_output[i] for i in rows],
                num_nans_in_logits=None
                if output.num_nans_in_logits is None
                else _only(output.num_nans_in_logits, req_ids),
            )
        )
    return split


def _only(by_request: dict, req_ids: list[str]) -> dict:
    return {r: by_request[r] for r in req_ids if r in by_request}
