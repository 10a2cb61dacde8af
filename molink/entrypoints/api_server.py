"""``python -m molink.entrypoints.api_server``: a minimal ``/generate`` server over a pipeline.

Kept from MoLink for scripts that predate the OpenAI API. ``POST /generate`` takes
``{"prompt": str, "stream": bool, ...SamplingParams fields}`` and returns ``{"text": [str]}``
(streaming: one JSON object per line as the text grows); the head also serves ``/ready``,
``/swarm`` and ``/swarm/ui`` (:mod:`molink.entrypoints.head_routes`). Node flags are the same as
the OpenAI server's; followers serve only ``/health``, ``/ready``, ``/status`` and ``/metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import AsyncGenerator

from molink.entrypoints import imports_without_gc

with imports_without_gc():
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import EngineClient
    from vllm.entrypoints.launchers.api_server.entry import (
        build_async_engine_client_from_engine_args,
    )
    from vllm.exceptions import VLLMClientError
    from vllm.logger import configure_logging_from_args, init_logger
    from vllm.sampling_params import SamplingParams
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from molink.comm.chain import ChainError
    from molink.config import add_molink_args
    from molink.entrypoints.failure_reasons import failure_cause
    from molink.entrypoints.head_routes import install_head_routes
    from molink.entrypoints.http_auth import api_key_guard, api_keys
    from molink.entrypoints.launch import run_node
    from molink.entrypoints.node import Node

logger = init_logger("molink.entrypoints.api_server")


def build_generate_app(engine: EngineClient, keys: list[str] | None = None) -> FastAPI:
    """The ``/generate`` and ``/health`` routes over ``engine`` (``/generate`` needs one of
    ``keys`` as a bearer token when given)."""
    app = FastAPI(title="MoLink /generate")

    @app.get("/health")
    async def health() -> Response:
        await engine.check_health()
        return Response(status_code=200)

    @app.post("/generate", dependencies=[Depends(api_key_guard(keys or []))])
    async def generate(request: Request) -> Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            prompt = body.pop("prompt")
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string")
            stream = bool(body.pop("stream", False))
            sampling_params = SamplingParams(**body)
        except (ValueError, TypeError, KeyError, VLLMClientError) as e:
            return JSONResponse({"error": f"bad request: {e}"}, status_code=400)

        request_id = uuid.uuid4().hex
        results = engine.generate(prompt, sampling_params, request_id)

        async def stream_results() -> AsyncGenerator[bytes, None]:
            async for output in results:
                cause = failure_cause(output)
                if cause is not None:
                    yield (json.dumps({"error": cause}) + "\n").encode()
                    return
                text = [prompt + o.text for o in output.outputs]
                yield (json.dumps({"text": text}) + "\n").encode()

        if stream:
            return StreamingResponse(stream_results(), media_type="application/x-ndjson")
        final = None
        try:
            async for output in results:
                if await request.is_disconnected():
                    await engine.abort(request_id)
                    return Response(status_code=499)
                final = output
        except VLLMClientError as e:  # e.g. a prompt longer than the model's context
            return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
        except Exception as e:  # the engine failed this request (e.g. a stage was lost)
            logger.error("request %s failed: %s", request_id, e)
            return JSONResponse({"error": str(e) or type(e).__name__}, status_code=500)
        assert final is not None
        cause = failure_cause(final)
        if cause is not None:
            return JSONResponse({"error": cause}, status_code=503)
        return JSONResponse({"text": [prompt + o.text for o in final.outputs]})

    return app


async def run(args: argparse.Namespace) -> None:
    """Start this node; on the head, serve ``/generate`` until shut down."""

    async def serve_head(engine_args: AsyncEngineArgs, node: Node) -> None:
        async with build_async_engine_client_from_engine_args(
            engine_args, usage_context=UsageContext.API_SERVER
        ) as engine:
            app = build_generate_app(engine, api_keys(args))
            install_head_routes(app, node, engine, api_keys(args))
            config = uvicorn.Config(
                app,
                host=args.host,
                port=args.port,
                log_level="info",
            )
            await uvicorn.Server(config).serve()

    await run_node(args, serve_head)


def main() -> None:
    parser = FlexibleArgumentParser(description="MoLink /generate server")
    parser.add_argument("--host", type=str, default=None)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="Require this bearer token on /generate and /status (repeatable; env VLLM_API_KEY).",
    )
    AsyncEngineArgs.add_cli_args(parser)
    add_molink_args(parser)
    args = parser.parse_args()
    configure_logging_from_args(args)
    try:
        asyncio.run(run(args))
    except (ChainError, ValueError, ConnectionError) as e:
        logger.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
