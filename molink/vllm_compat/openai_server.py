"""vLLM's ``build_and_serve`` (``vllm.entrypoints.launchers.api_server.entry``), copied.

vLLM builds its OpenAI app inside that function and serves it at once; the head adds its routes
(``/ready``, ``/swarm``, ``/swarm/ui``, MoLink's metrics) in between, so it takes the same steps
itself: :func:`build_api_app`, then :func:`serve_api_app`.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import vllm.envs as envs
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.launcher import serve_http
from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

if TYPE_CHECKING:
    from fastapi import FastAPI


async def build_api_app(
    engine: EngineClient, args: argparse.Namespace, add_routes: Callable[[FastAPI], object]
) -> FastAPI:
    """vLLM's OpenAI app over ``engine``, with ``add_routes(app)`` run before its state is set.

    The first half of vLLM's ``build_and_serve``
    (``vllm.entrypoints.launchers.api_server.entry``), copied: ``build_app``, then
    ``init_app_state``.
    """
    supported_tasks = await engine.get_supported_tasks()
    app = build_app(args, supported_tasks, engine.model_config)
    add_routes(app)
    await init_app_state(engine, app.state, args, supported_tasks)
    return app


#: The keyword arguments :func:`serve_api_app` passes to ``serve_http`` besides ``sock`` and
#: ``log_config`` (vLLM's ``build_and_serve`` also passes ``peer_loads``, for data parallelism).
SERVE_HTTP_ARGS = (
    "enable_ssl_refresh",
    "host",
    "port",
    "log_level",
    "access_log",
    "timeout_keep_alive",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_ca_certs",
    "ssl_cert_reqs",
    "ssl_ciphers",
    "h11_max_incomplete_event_size",
    "h11_max_header_count",
)


async def serve_api_app(
    app: FastAPI, sock: socket.socket, args: argparse.Namespace
) -> asyncio.Task:
    """Serve ``app`` on ``sock`` as vLLM serves its own; returns the server's shutdown task.

    The second half of vLLM's ``build_and_serve``, copied: ``serve_http`` with the uvicorn
    settings from ``args`` (:data:`SERVE_HTTP_ARGS`).
    """
    uvicorn_kwargs: dict[str, Any] = {}
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        uvicorn_kwargs["log_config"] = log_config
    return await serve_http(
        app,
        sock=sock,
        enable_ssl_refresh=args.enable_ssl_refresh,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
        **uvicorn_kwargs,
    )
