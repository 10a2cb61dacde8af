"""Tell a client why its request failed, instead of vLLM's "Internal server error".

MoLink fails a request only when no full pipeline came back within ``--outage-timeout`` (or the
request was on several lost chains); its scheduler puts the cause ("no node serves layers 15-29;
lost stage 10.0.0.2:50052 [15-29]: its result stream broke (UNAVAILABLE)") in the finished
output's ``stop_reason``. vLLM's OpenAI serving layer turns every ``finish_reason == "error"`` into
``GenerationError("Internal server error")`` in ``GenerateBaseServing._raise_if_error``, which
sees only the finish reason and the request id, and offers no plug-in point for a message.

So this module, the one place where MoLink patches vLLM's serving layer, (1) wraps the head's
engine client's ``generate`` to remember the cause of each failed request, and (2) replaces
``_raise_if_error`` with one that raises ``GenerationError`` with that cause. The client then gets
it as the error message: HTTP 500 with the cause, or a streamed error event.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

from vllm.entrypoints.generate.base.serving import GenerateBaseServing
from vllm.exceptions import GenerationError
from vllm.outputs import RequestOutput

_MAX_REMEMBERED = 4096
_causes: OrderedDict[str, str] = OrderedDict()
_lock = threading.Lock()
_vllm_raise_if_error = GenerateBaseServing._raise_if_error


def failure_cause(output: RequestOutput) -> str | None:
    """The cause MoLink gave for a failed output, or None if it did not fail."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            reason = completion.stop_reason
            return reason if isinstance(reason, str) and reason else "the request failed"
    return None


def _remember(request_id: str, cause: str) -> None:
    with _lock:
        _causes[request_id] = cause
        while len(_causes) > _MAX_REMEMBERED:
            _causes.popitem(last=False)


def _take(request_id: str) -> str | None:
    """The cause for ``request_id`` (completions add ``-<prompt index>`` to the id)."""
    with _lock:
        if request_id in _causes:
            return _causes.pop(request_id)
        for key in _causes:
            if key.startswith(request_id + "-"):
                return _causes.pop(key)
    return None


def _raise_if_error(self: GenerateBaseServing, finish_reason: str | None, request_id: str) -> None:
    if finish_reason == "error":
        cause = _take(request_id)
        if cause is not None:
            raise GenerationError(cause)
    _vllm_raise_if_error(self, finish_reason, request_id)


def report_failure_causes(engine: Any) -> None:
    """Make the OpenAI server built over ``engine`` tell clients why a request failed."""
    generate = engine.generate

    async def generate_recording_causes(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        async for output in generate(*args, **kwargs):
            cause = failure_cause(output) if isinstance(output, RequestOutput) else None
            if cause is not None:
                _remember(output.request_id, cause)
            yield output

    engine.generate = generate_recording_causes
    GenerateBaseServing._raise_if_error = _raise_if_error  # type: ignore[method-assign]
