"""vLLM's ``--api-key`` check, for MoLink's own HTTP routes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware


def bearer_token_checker(tokens: list[str]) -> Callable[[Any], bool]:
    """A check of request headers: True iff they carry ``Authorization: Bearer <token>`` for one
    of ``tokens``, compared as vLLM compares its ``--api-key``.

    Needs from vLLM: ``AuthenticationMiddleware(app, tokens)`` keeps only the tokens' hashes
    (``app`` unused until called, so None) and ``verify_token(headers)`` does the check.
    """
    checker = AuthenticationMiddleware(app=None, tokens=tokens)  # type: ignore[arg-type]
    return checker.verify_token
