"""vLLM's serving layer, as the head uses it: failure causes and ``/metrics``.

* :func:`patch_raise_if_error` and :func:`wrap_engine_generate`: MoLink's one patch of vLLM's
  serving layer. vLLM turns every ``finish_reason == "error"`` into ``GenerationError("Internal
  server error")`` in ``GenerateBaseServing._raise_if_error``, which sees only the finish reason
  and the request id and offers no plug-in point for a message; MoLink's cause for a failed
  request (``molink.entrypoints.failure_reasons``) reaches the client through these two.
* :func:`wrap_metrics_routes`: run something before each scrape of vLLM's ``/metrics``.

vLLM's ``build_and_serve``, copied, is in :mod:`.openai_server`; its ``--api-key`` check, for
MoLink's own routes, in :mod:`.auth`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.routing import Mount, Route
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.generate.base.serving import GenerateBaseServing
from vllm.exceptions import GenerationError

if TYPE_CHECKING:
    from fastapi import FastAPI

_VLLM_RAISE_IF_ERROR = GenerateBaseServing._raise_if_error


def patch_raise_if_error(cause_of: Callable[[str], str | None]) -> None:
    """Make vLLM's OpenAI serving raise ``GenerationError(cause)`` for a failed request whose
    cause ``cause_of(request_id)`` knows (vLLM's own "Internal server error" otherwise).
    Idempotent: the last ``cause_of`` wins.

    Needs from vLLM: every OpenAI serving class calls ``self._raise_if_error(finish_reason,
    request_id)`` (``GenerateBaseServing``) on each output, and a ``GenerationError`` raised
    there becomes the client's error (HTTP 500 or a streamed error event) with its message.
    """

    def _raise_if_error(
        self: GenerateBaseServing, finish_reason: str | None, request_id: str
    ) -> None:
        if finish_reason == "error":
            cause = cause_of(request_id)
            if cause is not None:
                raise GenerationError(cause)
        _VLLM_RAISE_IF_ERROR(self, finish_reason, request_id)

    GenerateBaseServing._raise_if_error = _raise_if_error  # type: ignore[method-assign]


def wrap_engine_generate(engine: EngineClient, on_output: Callable[[Any], None]) -> None:
    """Make ``engine.generate`` call ``on_output`` with every output it yields, first.

    Needs from vLLM: the serving layer calls ``generate`` on the engine client instance (an
    async generator method, so an instance attribute replaces it).
    """
    generate = engine.generate

    async def generate_observed(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        async for output in generate(*args, **kwargs):
            on_output(output)
            yield output

    engine.generate = generate_observed  # type: ignore[method-assign]


def wrap_metrics_routes(app: FastAPI, before_scrape: Callable[[], Awaitable[Any]]) -> int:
    """Make vLLM's ``/metrics`` routes of ``app`` await ``before_scrape()`` before each HTTP
    scrape; returns how many routes were wrapped (0: this app serves no ``/metrics``).

    A middleware can't be added instead: the app's middleware stack is built by now (vLLM's
    SageMaker bootstrap).

    Needs from vLLM: ``attach_router`` (``vllm.entrypoints.serve.instrumentator.metrics``)
    serves ``/metrics`` twice, as a starlette ``Route`` (prometheus-fastapi-instrumentator) and
    a ``Mount`` behind it, each with an ``app`` attribute that can be wrapped.
    """
    wrapped = 0
    for route in app.router.routes:
        if isinstance(route, (Route, Mount)) and route.path == "/metrics":

            async def refreshing(
                scope: Any, receive: Any, send: Any, inner: Any = route.app
            ) -> None:
                if scope["type"] == "http":
                    await before_scrape()
                await inner(scope, receive, send)

            route.app = refreshing
            wrapped += 1
    return wrapped
