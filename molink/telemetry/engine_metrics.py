"""MoLink's metrics from the head's engine process, served by its API server process.

vLLM runs the head's scheduler, executor and stage 0 in an EngineCore process, while ``/metrics``
is served by the API server process from vLLM's registry. :func:`export_metrics` turns the
engine process's MoLink registries (:mod:`molink.telemetry.metrics`) into plain data (it travels
back through the executor's ``collective_rpc``), and :class:`EngineMetrics`, registered in
vLLM's registry, yields the latest such copy, so one scrape gets vLLM's metrics and MoLink's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from molink.telemetry.metrics import HEAD_REGISTRY, STAGE_REGISTRY

#: The ``collective_rpc`` method the head's executor answers with its pipeline's state
#: (``PipelineExecutor.pipeline_snapshot``, whose ``metrics`` entry is :func:`export_metrics`).
PIPELINE_SNAPSHOT_RPC = "molink_pipeline_snapshot"


def export_metrics(
    registries: tuple[CollectorRegistry, ...] = (STAGE_REGISTRY, HEAD_REGISTRY),
) -> list[dict[str, Any]]:
    """Every metric family in ``registries`` as msgpack-friendly data."""
    return [
        {
            "name": family.name,
            "documentation": family.documentation,
            "type": family.type,
            "samples": [[s.name, dict(s.labels), float(s.value)] for s in family.samples],
        }
        for registry in registries
        for family in registry.collect()
    ]


class EngineMetrics:
    """A prometheus_client collector that yields the families last received from the engine."""

    def __init__(self) -> None:
        self._families: list[dict[str, Any]] = []

    def update(self, families: list[dict[str, Any]]) -> None:
        """Replace the exported families (the output of :func:`export_metrics`)."""
        self._families = families

    def describe(self) -> list[Metric]:
        return []  # names are only known once the engine reported them

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            metric = Metric(family["name"], family["documentation"], family["type"])
            for name, labels, value in family["samples"]:
                metric.add_sample(name, labels, value)
            yield metric
