"""MoLink's Prometheus metrics. Every name starts with ``molink_``.

They live in MoLink's own registries, not in prometheus_client's default one, because the same
modules run in two processes on a head: the engine process records them (its stage 0, executor
and scheduler) and the API server process re-exports that process's values
(:mod:`molink.telemetry.engine_metrics`); its own, always-zero copies must not show.

* :data:`STAGE_REGISTRY`: every node that computes layers (a follower serves it on its
  ``/metrics``; the head's stage 0 records into it too). Per-step metrics carry a ``layers``
  label (``"16-31"``).
* :data:`HEAD_REGISTRY`: the head's pipeline (micro-batching, losses, recoveries, failures).
* The relay's metrics belong to the node process (its gRPC service), not to the engine: they
  are in prometheus_client's default registry, which vLLM's ``/metrics`` on a head and a
  follower's ``/metrics`` both serve.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

STAGE_REGISTRY = CollectorRegistry(auto_describe=True)
HEAD_REGISTRY = CollectorRegistry(auto_describe=True)

# Step times of CPU stages run from milliseconds (decode) to seconds (long prefills).
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# ---------------------------------------------------------------- every stage
STEP_SECONDS = Histogram(
    "molink_stage_step_seconds",
    "Compute time of one pipeline step on this node's layers.",
    ["layers"],
    buckets=_STEP_BUCKETS,
    registry=STAGE_REGISTRY,
)
QUEUE_WAIT_SECONDS = Histogram(
    "molink_stage_queue_wait_seconds",
    "Time a step waited on this node between arriving and starting to compute.",
    ["layers"],
    buckets=_STEP_BUCKETS,
    registry=STAGE_REGISTRY,
)
STAGE_TOKENS = Counter(
    "molink_stage_tokens",
    "Tokens this node's layers computed (rate() gives tokens per second).",
    ["layers"],
    registry=STAGE_REGISTRY,
)
JOINED_PASSES = Counter(
    "molink_stage_joined_passes",
    "Forward passes that ran the steps of several heads together.",
    ["layers"],
    registry=STAGE_REGISTRY,
)
JOINED_STEPS = Counter(
    "molink_stage_joined_steps",
    "Steps that ran in a forward pass shared with other heads' steps.",
    ["layers"],
    registry=STAGE_REGISTRY,
)
JOIN_WAIT_SECONDS = Counter(
    "molink_stage_join_wait_seconds",
    "Time this node waited for other heads' steps to share a forward pass (--join-wait).",
    ["layers"],
    registry=STAGE_REGISTRY,
)
STAGE_THROUGHPUT = Gauge(
    "molink_stage_throughput_tokens_per_second",
    "Tokens per busy second this node measured lately (what it announces to heads).",
    registry=STAGE_REGISTRY,
)
BYTES_SENT = Counter(
    "molink_hop_bytes_sent",
    "Bytes this node sent to the next hop: stream=steps (activations and step data to the "
    "next stage) or results (sampled tokens to the head).",
    ["stream"],
    registry=STAGE_REGISTRY,
)
BYTES_RECEIVED = Counter(
    "molink_hop_bytes_received",
    "Bytes this node received: stream=steps (from the previous stage) or results (on the head, "
    "from the last stage).",
    ["stream"],
    registry=STAGE_REGISTRY,
)
KV_BLOCKS_USED = Gauge(
    "molink_stage_kv_blocks_used",
    "KV cache blocks the requests on this node's stage hold.",
    registry=STAGE_REGISTRY,
)
KV_BLOCKS_TOTAL = Gauge(
    "molink_stage_kv_blocks_total",
    "KV cache blocks this node's stage allocated (the head's plan).",
    registry=STAGE_REGISTRY,
)

# ---------------------------------------------------------------- the head
MICRO_BATCHES_IN_FLIGHT = Gauge(
    "molink_micro_batches_in_flight",
    "Steps with tokens the head has sent down the pipeline and not got back yet.",
    registry=HEAD_REGISTRY,
)
MICRO_BATCHES_PLANNED = Gauge(
    "molink_micro_batches_planned",
    "How many micro-batches the policy keeps in flight now.",
    registry=HEAD_REGISTRY,
)
MICRO_BATCH_PREFILL_TOKENS = Gauge(
    "molink_micro_batch_prefill_tokens",
    "Prefill tokens the policy lets each micro-batch carry now.",
    registry=HEAD_REGISTRY,
)
MICRO_BATCH_STEPS = Counter(
    "molink_micro_batch_steps",
    "Steps the head scheduled under a plan of `batches` micro-batches in flight (the policy's "
    "choices over time).",
    ["batches"],
    registry=HEAD_REGISTRY,
)
CHAIN_READY = Gauge(
    "molink_chain_ready",
    "1 while a full chain of stages serves, 0 during an outage.",
    registry=HEAD_REGISTRY,
)
CHAIN_STAGES = Gauge(
    "molink_chain_stages",
    "Stages in the chain the head drives (its own stage 0 included).",
    registry=HEAD_REGISTRY,
)
STAGE_LOSSES = Counter(
    "molink_stage_losses",
    "Times the head lost its chain: cause=lost (a stage or link failed), timeout (no answer "
    "within --step-timeout) or leaving (a node announced it leaves).",
    ["cause"],
    registry=HEAD_REGISTRY,
)
RECOVERIES = Counter(
    "molink_recoveries",
    "Times the head had a full chain serving again after a loss: mode=replay (only the lost "
    "span was refilled, from the replay log) or recompute (every request recomputed).",
    ["mode"],
    registry=HEAD_REGISTRY,
)
REPLAYED_TOKENS = Counter(
    "molink_replayed_tokens",
    "Token positions replayed through a lost span's replacement from the replay log.",
    registry=HEAD_REGISTRY,
)
REPLAY_LOG_BYTES = Gauge(
    "molink_replay_log_bytes",
    "Bytes the head's own replay log holds (the activations it sent to stage 1).",
    registry=HEAD_REGISTRY,
)
RECOVERY_SECONDS = Histogram(
    "molink_recovery_seconds",
    "Seconds from a loss being detected to a full chain serving again.",
    buckets=(0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0),
    registry=HEAD_REGISTRY,
)
REWIRES = Counter(
    "molink_rewires",
    "Times the head rewired its chain without a loss: cause=kv_resize (it shrank its KV cache "
    "for another head on a shared stage), rebalance (it moved to a less loaded replica) or "
    "hot_standby (a standby became hot, --hot-standby).",
    ["cause"],
    registry=HEAD_REGISTRY,
)
RECOMPUTED_TOKENS = Counter(
    "molink_recomputed_tokens",
    "Tokens computed again because their KV cache was dropped: cause=stage_loss (a chain "
    "broke), kv_resize or rebalance (the head rewired its chain, see molink_rewires) or "
    "kv_cache_full (vLLM preempted the request).",
    ["cause"],
    registry=HEAD_REGISTRY,
)
REQUESTS_FAILED = Counter(
    "molink_requests_failed",
    "Requests MoLink failed: cause=outage (no full chain within --outage-timeout), "
    "repeated_losses (on too many lost chains), multimodal (can't be recomputed) or "
    "recompute_impossible.",
    ["cause"],
    registry=HEAD_REGISTRY,
)


def track_kv_blocks(blocks: Callable[[], tuple[int, int]]) -> None:
    """Have the KV gauges read ``blocks()`` = (used, total) at every scrape (the stage's own)."""
    KV_BLOCKS_USED.set_function(lambda: blocks()[0])
    KV_BLOCKS_TOTAL.set_function(lambda: blocks()[1])


# ---------------------------------------------------------------- every node's relay
RELAY_NODES = Gauge(
    "molink_relay_nodes",
    "Nodes behind NAT that take their calls through this node (it is their relay).",
    registry=REGISTRY,
)
RELAY_TUNNELS = Gauge(
    "molink_relay_tunnels",
    "Connections to nodes behind NAT that this node relays now.",
    registry=REGISTRY,
)
RELAY_BYTES = Counter(
    "molink_relay_bytes_total",
    "Bytes this node forwarded between the two sides of its tunnels.",
    registry=REGISTRY,
)
