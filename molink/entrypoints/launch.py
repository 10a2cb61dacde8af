"""Running a node from the command line, shared by both servers.

:func:`run_node` starts the node; on a follower it serves only ``/health``, ``/ready``,
``/status`` and ``/metrics`` over HTTP (the head serves the API); on the head it waits for the
chain (its port answering ``/health`` and ``/ready`` with 503 and the cause meanwhile) and hands
vLLM engine arguments that drive it, and the node, to the server's own ``serve_head``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client import REGISTRY as PROCESS_REGISTRY
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.logger import init_logger

from molink.comm.chain import Chain
from molink.config import MoLinkConfig
from molink.entrypoints import dump_stacks_on_sigusr1
from molink.entrypoints.http_auth import api_key_guard, api_keys, status_bind_host
from molink.entrypoints.node import Node
from molink.security.settings import is_loopback
from molink.telemetry import metrics
from molink.vllm_compat.detokenizer import fix_prompt_tail_detokenization
from molink.vllm_compat.shutdown import tolerate_vanishing_children

logger = init_logger(__name__)


async def run_node(
    args: argparse.Namespace, serve_head: Callable[[AsyncEngineArgs, Node], Awaitable[None]]
) -> None:
    """Start this node from parsed flags and serve until shut down; always leaves the swarm."""
    dump_stacks_on_sigusr1()
    config = MoLinkConfig.from_args(args)
    if config.hot_standby and config.recovery != "replay":
        raise SystemExit("--hot-standby needs --recovery replay: only a replay uses its KV cache")
    fix_prompt_tail_detokenization()  # the head's API server detokenizes
    tolerate_vanishing_children()  # ... and stops its EngineCore, whose DHT child stops too
    keys = api_keys(args)
    node = Node(AsyncEngineArgs.from_cli_args(args), config)
    status_host = (
        None if node.is_head else status_bind_host(args.host, keys, config.security_files.insecure)
    )
    if node.is_head and not keys and not is_loopback(args.host or "0.0.0.0"):
        logger.warning(
            "The API on port %d is open to anyone who reaches it; pass --api-key KEY to require "
            "a key",
            args.port,
        )
    if node.is_head:
        scheme = "https" if getattr(args, "ssl_certfile", None) else "http"
        node.api_url = f"{scheme}://{_url_host(config.announce_host or '127.0.0.1')}:{args.port}"
    try:
        await asyncio.to_thread(node.start)
        if status_host is not None:
            await serve_stage_status(node, status_host, args.port, keys)
            await asyncio.to_thread(node.leave)  # told to stop: let the head move off first
            return
        chain = await wait_for_chain_answering_ready(node, args)
        logger.info(
            "Pipeline assembled: %s",
            " -> ".join(f"{s.grpc_address} [{s.start_layer}-{s.end_layer}]" for s in chain.stages),
        )
        await serve_head(node.head_engine_args(chain), node)
    finally:
        node.shutdown()


async def wait_for_chain_answering_ready(node: Node, args: argparse.Namespace) -> Chain:
    """Head: wait for a chain (:meth:`Node.wait_for_chain`) while the API port answers
    ``/health`` and ``/ready`` with 503 and what the head waits for; vLLM's server takes the
    port once there is a chain."""
    config = uvicorn.Config(
        build_waiting_app(node),
        host=args.host or "0.0.0.0",
        port=args.port,
        ssl_keyfile=getattr(args, "ssl_keyfile", None),
        ssl_certfile=getattr(args, "ssl_certfile", None),
        log_level="warning",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    try:
        return await asyncio.to_thread(node.wait_for_chain)
    finally:
        server.should_exit = True
        await serving


def build_waiting_app(node: Node) -> FastAPI:
    """The head's app before its engine starts: ``/health`` and ``/ready`` answer 503 with the
    cause (missing layers, nodes left out and why)."""
    app = FastAPI(title="MoLink head, waiting for a chain")

    async def waiting() -> JSONResponse:
        cause = node.waiting_for_chain or "starting the engine"
        body = {"ready": False, "state": "waiting for a chain", "cause": cause}
        return JSONResponse(body, status_code=503)

    app.get("/health")(waiting)
    app.get("/ready")(waiting)
    return app


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build_status_app(node: Node, keys: list[str]) -> FastAPI:
    """A small app reporting this stage's identity and state (``/status`` needs an API key
    when ``keys`` is not empty; ``/health``, ``/ready`` and ``/metrics`` are open, as on
    vLLM's server)."""
    app = FastAPI(title="MoLink stage")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """200 once the node is announced online (a head may use it), else 503."""
        if node.state == "online":
            return JSONResponse({"ready": True, "state": "online"})
        return JSONResponse(
            {"ready": False, "state": node.state, "cause": f"the node is {node.state}"},
            status_code=503,
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body = generate_latest(PROCESS_REGISTRY) + generate_latest(metrics.STAGE_REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/status", dependencies=[Depends(api_key_guard(keys))])
    async def status() -> JSONResponse:
        host = node.host
        engine = host.engine if host else None
        heads = host.heads() if host else []
        return JSONResponse(
            {
                "role": "head" if node.is_head else "stage",
                "model": node.identity.name,
                "model_hash": node.identity.config_hash,
                "serving_layers": [node.start_layer, node.end_layer],
                "span_chosen_automatically": node.config.chooses_span,
                # The part of its layers this node serves for the head (a sub-span, or none).
                "serving_for_head": list(host.serving_span) if host and host.serving_span else None,
                "num_layers": node.identity.num_layers,
                "grpc_address": node.grpc_address,
                "peer_id": node.membership.peer_id if node.membership else None,
                "node_id": node.security.node_key.node_id,
                "swarm_key": node.security.swarm_key.fingerprint
                if node.security.swarm_key
                else None,
                "state": "leaving" if node.state == "leaving" else host.state if host else "head",
                "steps_done": engine.steps_done if engine else 0,
                "busy_seconds": round(engine.busy_seconds, 3) if engine else 0.0,
                "throughput_tokens_per_s": round(node.throughput, 1),
                # Every head this stage serves: its KV region, requests and next hop.
                "heads": heads,
                "next_hop": heads[0]["next_hop"] if heads else None,  # the first head's
            }
        )

    return app


async def serve_stage_status(node: Node, host: str, port: int, keys: list[str]) -> None:
    """Serve the status app until the process is told to stop (SIGTERM or SIGINT).

    uvicorn re-raises the stop signal once it has shut down; the handlers installed here take
    it, so the node can still leave gracefully (:meth:`Node.leave`). A second signal ends the
    wait at once.
    """
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            raise KeyboardInterrupt
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    config = uvicorn.Config(build_status_app(node, keys), host=host, port=port, log_level="warning")
    await uvicorn.Server(config).serve()
    stopping = True
