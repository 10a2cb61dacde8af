"""MoLink's metrics cross from the head's engine process into vLLM's registry unchanged."""

from __future__ import annotations

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from molink.telemetry.engine_metrics import EngineMetrics, export_metrics


def test_exported_metrics_render_the_same_in_another_registry():
    source = CollectorRegistry()
    Counter("molink_t_losses", "Losses.", ["cause"], registry=source).labels("lost").inc(2)
    Gauge("molink_t_ready", "Ready.", registry=source).set(1)
    Histogram("molink_t_step_seconds", "Steps.", ["layers"], registry=source).labels("0-9").observe(
        0.03
    )
    # The snapshot travels through vLLM's msgpack-based utility channel.
    families = msgspec.msgpack.decode(msgspec.msgpack.encode(export_metrics((source,))))

    collector = EngineMetrics()
    target = CollectorRegistry()
    target.register(collector)  # type: ignore[arg-type]
    assert generate_latest(target) == b""  # nothing before the engine reported
    collector.update(families)
    assert generate_latest(target) == generate_latest(source)
