"""The router's Prometheus metrics (``molink_router_*``), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROUTER_REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "molink_router_requests_total",
    "Requests the router answered, by route and outcome (ok, client_error, unavailable, "
    "failed: a stream cut that no head could continue).",
    ["route", "outcome"],
    registry=ROUTER_REGISTRY,
)
HEAD_FAILURES = Counter(
    "molink_router_head_failures_total",
    "Requests a head failed (unreachable, cut mid-stream, or a 502/503/504).",
    registry=ROUTER_REGISTRY,
)
RESUMED = Counter(
    "molink_router_resumed_total",
    "Requests sent to another head after theirs failed: 'restart' (nothing had reached the "
    "client) or 'continue' (the rest of a stream, from the tokens already sent).",
    ["how"],
    registry=ROUTER_REGISTRY,
)
PAUSE_SECONDS = Histogram(
    "molink_router_pause_seconds",
    "Time a stream stood still when its head failed: from the last chunk of the lost head to "
    "the first chunk of the next one.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=ROUTER_REGISTRY,
)
HEADS = Gauge(
    "molink_router_heads",
    "Heads the router knows, by state (ready or not_ready).",
    ["state"],
    registry=ROUTER_REGISTRY,
)
OUTSTANDING = Gauge(
    "molink_router_outstanding_requests",
    "Requests in flight through the router.",
    registry=ROUTER_REGISTRY,
)
