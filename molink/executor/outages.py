"""The head's record of chain losses, KV resizes and recoveries: one log line each, metrics,
recent events.

A loss line names the stage (its address and span), the cause, and how long detection took (from
the oldest step the chain had not answered); a restore line names the new chain and how long the
restore took from detection. A rewiring the head chooses (a KV resize for another head on a
shared stage, or a rebalance onto a less loaded replica) interrupts the chain the same way, but
is no loss. The last
:data:`MAX_EVENTS` events are kept for the head's ``/swarm`` view.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from vllm.logger import init_logger

from molink.telemetry import metrics

logger = init_logger(__name__)

MAX_EVENTS = 50


class OutageRecord:
    """Losses and recoveries of one head's chain (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._detected_at: float | None = None  # monotonic, while an outage lasts
        self._rewiring = ""  # the outage's cause when the head chose it (no loss)

    def lost(
        self,
        stage: str,
        reason: str,
        cause: str,
        epoch: int,
        oldest_unanswered: float | None,
    ) -> None:
        """A loss was detected now.

        Args:
            stage: the stage lost ("10.0.0.2:50052 [16-31]"), or "" when unknown (a timeout).
            reason: what happened, as the head saw it.
            cause: ``lost``, ``timeout`` or ``leaving`` (the metric's label).
            epoch: the failure epoch that starts now.
            oldest_unanswered: when the oldest step still unanswered was sent (monotonic), or
                None if none was in flight.
        """
        now = time.monotonic()
        detect_s = None if oldest_unanswered is None else max(0.0, now - oldest_unanswered)
        with self._lock:
            if self._detected_at is None:
                self._detected_at = now
            self._rewiring = ""
            self._events.append(
                {
                    "kind": "loss",
                    "time": time.time(),
                    "stage": stage,
                    "cause": cause,
                    "reason": reason,
                    "detect_s": detect_s,
                    "epoch": epoch,
                }
            )
        metrics.STAGE_LOSSES.labels(cause).inc()
        metrics.CHAIN_READY.set(0)
        logger.error(
            "Lost %s: %s; %s; recovering (epoch %d)",
            f"stage {stage}" if stage else "the chain",
            reason,
            "no step was in flight"
            if detect_s is None
            else f"detected {detect_s:.2f} s after the oldest unanswered step was sent",
            epoch,
        )

    def rewiring(self, cause: str, reason: str, epoch: int) -> None:
        """The head rewires its chain without a loss: ``cause`` is ``kv_resize``,
        ``rebalance`` or ``hot_standby``, ``reason`` says who asked or what moves."""
        with self._lock:
            if self._detected_at is None:
                self._detected_at = time.monotonic()
                self._rewiring = cause
            self._events.append(
                {"kind": cause, "time": time.time(), "reason": reason, "epoch": epoch}
            )
        metrics.REWIRES.labels(cause).inc()
        metrics.CHAIN_READY.set(0)
        logger.warning("%s; rewiring (epoch %d)", reason, epoch)

    def restored(self, epoch: int, chain: str, stages: int, mode: str = "recompute") -> None:
        """A full chain (``chain`` described, ``stages`` long, the head's included) serves;
        after a loss its requests go on by ``mode``: ``replay`` or ``recompute``."""
        now = time.monotonic()
        with self._lock:
            detected_at, self._detected_at = self._detected_at, None
            rewiring, self._rewiring = self._rewiring, ""
            restore_s = None if detected_at is None else now - detected_at
            self._events.append(
                {
                    "kind": "restore",
                    "time": time.time(),
                    "chain": chain,
                    "restore_s": restore_s,
                    "epoch": epoch,
                    "mode": mode,
                }
            )
        metrics.CHAIN_READY.set(1)
        metrics.CHAIN_STAGES.set(stages)
        if restore_s is None:  # the first chain
            return
        if rewiring:
            logger.info(
                "Pipeline serving again (epoch %d) %.1f s after the %s: %s",
                epoch,
                restore_s,
                rewiring.replace("_", " "),
                chain,
            )
            return
        metrics.RECOVERIES.labels(mode).inc()
        metrics.RECOVERY_SECONDS.observe(restore_s)
        logger.info(
            "Pipeline restored (epoch %d) %.1f s after the loss was detected, by %s: %s",
            epoch,
            restore_s,
            mode,
            chain,
        )

    def recent(self) -> list[dict[str, Any]]:
        """The last events, oldest first."""
        with self._lock:
            return list(self._events)
