"""The HTTP face of a follower node: ``/health`` and ``/status`` only (the head serves the API)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from molink.engine.node import Node


def build_status_app(node: Node) -> FastAPI:
    """A small app reporting this stage's identity and state."""
    app = FastAPI(title="MoLink stage")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/status")
    async def status() -> JSONResponse:
        host = node.host
        engine = host.engine if host else None
        return JSONResponse(
            {
                "role": "head" if node.is_head else "stage",
                "model": node.identity.name,
                "model_hash": node.identity.config_hash,
                "serving_layers": [node.start_layer, node.end_layer],
                "num_layers": node.identity.num_layers,
                "grpc_address": node.grpc_address,
                "peer_id": node.membership.peer_id if node.membership else None,
                "state": host.state if host else "head",
                "steps_done": engine.steps_done if engine else 0,
                "busy_seconds": round(engine.busy_seconds, 3) if engine else 0.0,
            }
        )

    return app


async def serve_stage_status(node: Node, host: str | None, port: int) -> None:
    """Serve the status app until the process is told to stop."""
    config = uvicorn.Config(
        build_status_app(node), host=host or "0.0.0.0", port=port, log_level="warning"
    )
    await uvicorn.Server(config).serve()
