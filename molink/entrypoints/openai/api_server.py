"""``python -m molink.entrypoints.openai.api_server``: vLLM's OpenAI server over a MoLink pipeline.

Every vLLM flag works as with ``vllm serve``; MoLink adds ``--serving_layers``, ``--initial_peer``
and friends (``molink.config``). The node serving layer 0 is the head: it waits for stages covering
the other layers, then serves vLLM's whole OpenAI API (completions, chat, streaming, models,
tokenize, ``/health``, ``/metrics``) and MoLink's head routes (``/ready``, ``/swarm``,
``/swarm/ui``; :mod:`molink.entrypoints.head_routes`). Any other node serves its stage, and on
``--port`` only ``/health``, ``/ready``, ``/status`` and ``/metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from molink.entrypoints import imports_without_gc

with imports_without_gc():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import EngineClient
    from vllm.entrypoints.launchers.api_server.entry import (
        build_async_engine_client_from_engine_args,
    )
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args, init_logger
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from molink.comm.chain import ChainError
    from molink.config import add_molink_args
    from molink.entrypoints.failure_reasons import report_failure_causes
    from molink.entrypoints.head_routes import install_head_routes
    from molink.entrypoints.http_auth import api_keys
    from molink.entrypoints.launch import run_node
    from molink.entrypoints.node import Node
    from molink.vllm_compat.openai_server import build_api_app, serve_api_app

logger = init_logger("molink.entrypoints.openai.api_server")


async def serve_api(
    engine: EngineClient,
    node: Node,
    listen_address: str,
    sock: socket.socket,
    args: argparse.Namespace,
) -> asyncio.Task:
    """vLLM's ``build_and_serve`` with MoLink's head routes added (``/ready``, ``/swarm``,
    ``/swarm/ui``, MoLink's metrics); vLLM builds the app inside that function, so its steps
    are taken here (:mod:`molink.vllm_compat.serving`). Returns the server's shutdown task."""
    app = await build_api_app(
        engine, args, lambda app: install_head_routes(app, node, engine, api_keys(args))
    )
    logger.info("Serving the OpenAI API on %s (pipeline view at /swarm/ui)", listen_address)
    return await serve_api_app(app, sock, args)


def make_parser(prog: str | None = None) -> FlexibleArgumentParser:
    """vLLM's OpenAI server flags plus MoLink's."""
    parser = FlexibleArgumentParser(
        prog=prog,
        description="MoLink: vLLM's OpenAI-compatible server over a pipeline of nodes.",
    )
    parser = make_arg_parser(parser)
    add_molink_args(parser)
    return parser


async def run(args: argparse.Namespace) -> None:
    """Start this node; on the head, serve vLLM's OpenAI API until shut down."""

    async def serve_head(engine_args: AsyncEngineArgs, node: Node) -> None:
        listen_address, sock = setup_server(args, reuse_port=False)
        async with build_async_engine_client_from_engine_args(engine_args) as engine:
            report_failure_causes(engine)
            shutdown_task = await serve_api(engine, node, listen_address, sock, args)
        try:
            await shutdown_task
        finally:
            sock.close()

    await run_node(args, serve_head)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse ``argv`` (default: the command line) and run the node; ``molink serve`` is this."""
    cli_env_setup()
    args = make_parser(prog).parse_args(argv)
    # MoLink's --grpc-port replaced vLLM's (Rust frontend only); vLLM still reads the attribute.
    args.grpc_port = None
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    import uvloop

    try:
        uvloop.run(run(args))
    except ChainError as e:
        logger.error("Can't assemble the pipeline: %s", e)
        sys.exit(2)
    except (ValueError, ConnectionError) as e:
        logger.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
