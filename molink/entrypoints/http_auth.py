"""API keys for MoLink's own HTTP paths, checked the way vLLM checks its ``--api-key``.

vLLM's ``AuthenticationMiddleware`` guards only its API prefixes (``/v1`` ...); a follower's
``/status`` and the ``/generate`` server get the same keys (``--api-key`` or ``VLLM_API_KEY``)
through :func:`api_key_guard`. Without a key, :func:`status_bind_host` keeps a follower's HTTP
server on loopback unless the operator says otherwise.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request
from vllm import envs

from molink.security.settings import InsecureSetup, is_loopback
from molink.vllm_compat.auth import bearer_token_checker


def api_keys(args: argparse.Namespace) -> list[str]:
    """The API keys this server accepts (vLLM's ``--api-key`` list, else ``VLLM_API_KEY``)."""
    return [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]


def api_key_guard(keys: list[str]) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: 401 unless the request carries ``Authorization: Bearer <key>``."""
    verify = bearer_token_checker(keys) if keys else None

    async def guard(request: Request) -> None:
        if verify is not None and not verify(request.headers):
            raise HTTPException(status_code=401, detail="Unauthorized")

    return guard


def status_bind_host(host: str | None, keys: list[str], insecure: bool) -> str:
    """Where a follower's HTTP server listens: everywhere with a key, else loopback.

    Raises :class:`InsecureSetup` for an explicit non-loopback ``--host`` without a key, unless
    ``--insecure``.
    """
    if host is None:
        return "0.0.0.0" if keys else "127.0.0.1"
    if not keys and not insecure and not is_loopback(host):
        raise InsecureSetup(
            f"--host {host}: this node's /status would be open to anyone who reaches it. Pass "
            "--api-key KEY (or VLLM_API_KEY), or --insecure on a network you trust."
        )
    return host
