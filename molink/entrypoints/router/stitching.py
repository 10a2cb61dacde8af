"""Resuming a streamed completion on another head, token-exactly.

Every stream the router forwards asks the head for token ids (``return_token_ids``), so it
knows the prompt's ids and every id generated so far. When the head is lost mid-stream, the rest
is asked of another head as a *continuation*: a ``/v1/completions`` request whose prompt is the
prompt's ids plus the generated ids (re-tokenized text would not be exact), with ``max_tokens``
and ``min_tokens`` reduced by what was generated. :class:`StreamStitcher` rewrites the chunks of
both parts into one stream: the first part's ``id`` and ``created``, the client's format (a
continuation of a chat stream comes back as completion chunks and is turned into chat chunks),
token ids only if the client asked for them, and usage that counts the original prompt and
every generated token once.

Pure data manipulation (no I/O), so it is unit-tested on its own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["completion", "chat"]

#: Sampling fields a chat request shares with a completion request, copied to a continuation.
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "bad_words",
    "allowed_token_ids",
    "structured_outputs",
    "priority",
    "user",
)


def not_resumable(kind: Kind, body: dict[str, Any]) -> str | None:
    """Why a streamed request can't be continued on another head mid-stream (None if it can).

    Such a request is still sent again from the start when its head fails before any of it
    reached the client.
    """
    if (body.get("n") or 1) != 1 or body.get("best_of") not in (None, 1):
        return "it asks for several choices (n > 1)"
    if kind == "completion":
        prompt = body.get("prompt")
        several = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        if several and len(prompt) != 1:
            return "it has several prompts"
        if body.get("echo"):
            return "it echoes the prompt"
        if body.get("suffix"):
            return "it has a suffix"
    elif body.get("tools") or body.get("response_format"):
        return "its output is parsed (tools or a response format)"
    return None


def _has_output(choice: dict[str, Any]) -> bool:
    """Whether a streamed choice carries generated output (text, content, reasoning, tools)."""
    if choice.get("text"):
        return True
    delta = choice.get("delta") or {}
    return any(delta.get(k) for k in ("content", "reasoning", "reasoning_content", "tool_calls"))


@dataclass
class StreamStitcher:
    """The state of one client stream: what reached the client, and how to go on elsewhere."""

    kind: Kind
    body: dict[str, Any]  # the client's request, as it came
    id: str | None = None
    created: int | None = None
    model: str | None = None
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    sent_any: bool = False  # some chunk reached the client
    lost_ids: bool = False  # a chunk came without token ids: can't resume exactly
    continuations: int = 0
    _base: int = 0  # tokens generated before the current continuation

    @property
    def wants_token_ids(self) -> bool:
        return bool(self.body.get("return_token_ids"))

    def first_request(self) -> dict[str, Any]:
        """The body sent to the first head: the client's, asking for token ids."""
        body = dict(self.body)
        body["return_token_ids"] = True
        return body

    def can_continue(self) -> bool:
        """Whether the rest can be asked of another head, token-exactly."""
        return (
            not self.finished
            and not self.lost_ids
            and self.prompt_ids is not None
            and not_resumable(self.kind, self.body) is None
        )

    def continuation(self) -> dict[str, Any]:
        """A ``/v1/completions`` body that generates the rest of the stream."""
        assert self.prompt_ids is not None
        src = self.body
        body: dict[str, Any] = {
            "model": src.get("model"),
            "prompt": self.prompt_ids + self.generated,
            "stream": True,
            "return_token_ids": True,
            "stream_options": {"include_usage": True},
        }
        if self.kind == "completion":
            for key, value in src.items():
                if key not in ("prompt", "echo", "prompt_logprobs", "stream_options", "n"):
                    body.setdefault(key, copy.deepcopy(value))
        else:
            for key in _SAMPLING_FIELDS:
                if key in src:
                    body[key] = copy.deepcopy(src[key])
            if src.get("logprobs"):
                body["logprobs"] = int(src.get("top_logprobs") or 0)
        max_tokens = src.get("max_completion_tokens") or src.get("max_tokens")
        if max_tokens is not None:
            body["max_tokens"] = max(1, int(max_tokens) - len(self.generated))
        body.pop("max_completion_tokens", None)
        if src.get("min_tokens"):
            body["min_tokens"] = max(0, int(src["min_tokens"]) - len(self.generated))
        self.continuations += 1
        self._base = len(self.generated)
        return body

    # ------------------------------------------------------------------ chunks
    def from_head(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """A chunk of the first part (the client's own format), rewritten for the client."""
        self.id = self.id or chunk.get("id")
        self.created = self.created or chunk.get("created")
        self.model = self.model or chunk.get("model")
        if self.kind == "chat" and chunk.get("prompt_token_ids") is not None:
            self.prompt_ids = list(chunk["prompt_token_ids"])
        for choice in chunk.get("choices") or []:
            if self.kind == "completion" and choice.get("prompt_token_ids") is not None:
                self.prompt_ids = list(choice["prompt_token_ids"])
            self._take(choice, has_output=_has_output(choice))
        if not self.wants_token_ids:
            chunk.pop("prompt_token_ids", None)
            for choice in chunk.get("choices") or []:
                choice.pop("prompt_token_ids", None)
                choice.pop("token_ids", None)
        self.sent_any = True
        return chunk

    def from_continuation(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """A completion chunk of a continuation, rewritten as the first part's stream."""
        choices = []
        for choice in chunk.get("choices") or []:
            self._take(choice, has_output=bool(choice.get("text")))
            out: dict[str, Any] = {"index": 0, "finish_reason": choice.get("finish_reason")}
            if choice.get("stop_reason") is not None:
                out["stop_reason"] = choice["stop_reason"]
            if self.kind == "chat":
                text = choice.get("text")
                out["delta"] = {"content": text} if text else {}
                out["logprobs"] = None
            else:
                out["text"] = choice.get("text", "")
                out["logprobs"] = choice.get("logprobs")
            if self.wants_token_ids:
                out["token_ids"] = choice.get("token_ids")
            choices.append(out)
        rewritten: dict[str, Any] = {
            "id": self.id or chunk.get("id"),
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created or chunk.get("created"),
            "model": self.model or chunk.get("model"),
            "choices": choices,
        }
        usage = chunk.get("usage")
        if usage:
            if not self._client_wants_usage():
                return {}
            completion = self._base + int(usage.get("completion_tokens") or 0)
            prompt = len(self.prompt_ids or [])
            rewritten["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        self.sent_any = True
        return rewritten

    def _client_wants_usage(self) -> bool:
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    def _take(self, choice: dict[str, Any], has_output: bool) -> None:
        ids = choice.get("token_ids")
        if ids:
            self.generated.extend(int(t) for t in ids)
        elif has_output and ids is None:
            self.lost_ids = True
        if choice.get("finish_reason") is not None:
            self.finished = True
