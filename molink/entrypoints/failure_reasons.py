"""Tell a client why its request failed, instead of vLLM's "Internal server error".

MoLink fails a request only when no full pipeline came back within ``--outage-timeout`` (or the
request was on several lost chains); its scheduler puts the cause ("no node serves layers 15-29;
lost stage 10.0.0.2:50052 [15-29]: its result stream broke (UNAVAILABLE)") in the finished
output's ``stop_reason``. vLLM's OpenAI serving layer turns every ``finish_reason == "error"`` into
``GenerationError("Internal server error")`` and offers no plug-in point for a message.

So this module (1) watches the head's engine client's outputs to remember the cause of each
failed request, and (2) has vLLM's serving layer raise ``GenerationError`` with that cause; both
through :mod:`molink.vllm_compat.serving` (MoLink's one patch of vLLM's serving layer). The
client then gets it as the error message: HTTP 500 with the cause, or a streamed error event.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from vllm.outputs import RequestOutput

from molink.vllm_compat.serving import patch_raise_if_error, wrap_engine_generate

_MAX_REMEMBERED = 4096
_causes: OrderedDict[str, str] = OrderedDict()
_lock = threading.Lock()


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


def _record(output: Any) -> None:
    cause = failure_cause(output) if isinstance(output, RequestOutput) else None
    if cause is not None:
        _remember(output.request_id, cause)


def report_failure_causes(engine: Any) -> None:
    """Make the OpenAI server built over ``engine`` tell clients why a request failed."""
    wrap_engine_generate(engine, _record)
    patch_raise_if_error(_take)
