"""The head's own HTTP routes, beside vLLM's API.

* ``GET /ready``: readiness. 200 while a full chain serves; 503 with the cause in the body while
  it does not (``/health`` stays vLLM's liveness check: the process and engine are up).
* ``GET /swarm``: the swarm as JSON (:mod:`molink.entrypoints.swarm_report`); needs an API key
  when the server has one.
* ``GET /swarm/ui``: a live page drawing that JSON (``static/swarm.html``, no external assets).
* ``/metrics``: vLLM's registry gets MoLink's metrics from the engine process, refreshed just
  before each scrape (:mod:`molink.telemetry.engine_metrics`).

The pipeline's state lives in the engine process; :class:`PipelineView` fetches it through the
executor's ``collective_rpc`` (:data:`~molink.telemetry.engine_metrics.PIPELINE_SNAPSHOT_RPC`,
:func:`molink.vllm_compat.executor.call_executor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from vllm.engine.protocol import EngineClient
from vllm.logger import init_logger
from vllm.v1.metrics.prometheus import get_prometheus_registry

from molink.entrypoints.http_auth import api_key_guard
from molink.entrypoints.swarm_report import build_swarm_report
from molink.telemetry.engine_metrics import PIPELINE_SNAPSHOT_RPC, EngineMetrics
from molink.vllm_compat.executor import call_executor
from molink.vllm_compat.serving import wrap_metrics_routes

if TYPE_CHECKING:
    from molink.entrypoints.node import Node

logger = init_logger(__name__)

#: Seconds the API server waits for the engine's snapshot when it has none recent to stand in.
SNAPSHOT_TIMEOUT_S = 3.0
#: A snapshot this recent is reused (several scrapes or page refreshes at once).
SNAPSHOT_MAX_AGE_S = 0.25
#: When the engine is too busy to answer quickly, a snapshot this recent still stands (a head
#: under load stays ready instead of flapping).
SNAPSHOT_STALE_OK_S = 15.0
#: How long a caller waits for a fresh snapshot when one within ``SNAPSHOT_STALE_OK_S`` can
#: stand in: well under the router's ``/ready`` timeout, so a busy engine never looks dead.
SNAPSHOT_STALE_WAIT_S = 0.5

_engine_metrics: EngineMetrics | None = None


def _metrics_collector() -> EngineMetrics:
    """The one collector per process that re-exports the engine's metrics in vLLM's registry."""
    global _engine_metrics
    if _engine_metrics is None:
        _engine_metrics = EngineMetrics()
        get_prometheus_registry().register(_engine_metrics)  # type: ignore[arg-type]
    return _engine_metrics


class PipelineView:
    """The engine process's pipeline snapshot, as last fetched by the API server process.

    One fetch runs at a time, in the background: callers wait for it briefly when a recent
    snapshot can stand in, longer when none can.
    """

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.metrics = _metrics_collector()
        self._snapshot: dict[str, Any] | None = None
        self._answered_at = float("-inf")  # when the engine last answered
        self._fetch: asyncio.Future[None] | None = None
        self._failed_before = False

    async def snapshot(self) -> dict[str, Any] | None:
        """A fresh snapshot; the last one when the engine is too busy to answer quickly but
        answered within :data:`SNAPSHOT_STALE_OK_S`; else None."""
        age = time.monotonic() - self._answered_at
        if age < SNAPSHOT_MAX_AGE_S:
            return self._snapshot
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.ensure_future(self._refresh())
        stands_in = self._snapshot is not None and age <= SNAPSHOT_STALE_OK_S
        wait_s = SNAPSHOT_STALE_WAIT_S if stands_in else SNAPSHOT_TIMEOUT_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._fetch), wait_s)
        if time.monotonic() - self._answered_at > SNAPSHOT_STALE_OK_S:
            return None
        return self._snapshot

    async def _refresh(self) -> None:
        try:
            snapshot = await asyncio.wait_for(
                call_executor(self.engine, PIPELINE_SNAPSHOT_RPC), SNAPSHOT_STALE_OK_S
            )
        except Exception as e:  # noqa: BLE001  # a dead or hung engine: report, don't fail
            if not self._failed_before:
                logger.warning("The engine did not report its pipeline state: %r", e)
            self._failed_before = True
            self._snapshot = None
            return
        self._snapshot, self._answered_at = snapshot, time.monotonic()
        self._failed_before = False
        self.metrics.update(snapshot["metrics"])


def swarm_page() -> str:
    """The status page's HTML (shipped in the package)."""
    return resources.files("molink.entrypoints").joinpath("static/swarm.html").read_text()


def _refresh_before_metrics(app: FastAPI, view: PipelineView) -> None:
    """Make vLLM's ``/metrics`` routes fetch the engine's MoLink metrics before each scrape
    (:func:`molink.vllm_compat.serving.wrap_metrics_routes`)."""
    if not wrap_metrics_routes(app, view.snapshot):
        logger.warning("vLLM serves no /metrics here: MoLink's metrics are not exported")


def install_head_routes(
    app: FastAPI, node: Node, engine: EngineClient, keys: list[str]
) -> PipelineView:
    """Add ``/ready``, ``/swarm``, ``/swarm/ui`` and MoLink's metrics to the head's app."""
    view = PipelineView(engine)
    page = swarm_page()

    _refresh_before_metrics(app, view)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        snapshot = await view.snapshot()
        if snapshot is None:
            return JSONResponse(
                {"ready": False, "cause": "the engine did not answer"}, status_code=503
            )
        if not snapshot["ready"]:
            return JSONResponse({"ready": False, "cause": snapshot["cause"]}, status_code=503)
        chain = " -> ".join(f"{h['address']} {h['layers']}" for h in snapshot["chain"])
        return JSONResponse({"ready": True, "chain": chain})

    @app.get("/swarm", dependencies=[Depends(api_key_guard(keys))])
    async def swarm() -> JSONResponse:
        membership = node.membership
        nodes, seen, dht_error = [], {}, None
        if membership is not None:
            try:
                nodes = await asyncio.to_thread(membership.nodes)
                seen = membership.seconds_since_stored()
            except Exception as e:  # noqa: BLE001  # report the pipeline even without the DHT
                dht_error = f"{type(e).__name__}: {e}"
        report = build_swarm_report(
            node.announcement(), nodes, await view.snapshot(), seen, node.weights
        )
        report["dht_error"] = dht_error
        return JSONResponse(report)

    @app.get("/swarm/ui")
    async def swarm_ui() -> HTMLResponse:
        return HTMLResponse(page)

    return view
