"""The replay log of a pipeline boundary: the activations a stage sent downstream, per request.

For every running request, a stage keeps the rows of activations (``hidden_states``/``residual``,
one row per token position) it sent to the next stage. They are the next span's inputs: when the
node serving that span is lost, the node that takes its place is filled by replaying them through
its span only (:mod:`molink.executor.span_replay`), and every other stage keeps its KV cache.

A row is kept in the smallest form that replays bit for bit (see :class:`LogForm`): the sum
``hidden_states + residual`` when the next span's first layer only ever adds the two (float32,
lossless wire, a known architecture), else both tensors in the wire's dtype where it is narrower
than the model's.

The log is bounded: past ``capacity_bytes`` it drops the largest request's log (that request
falls back to recomputing, see :mod:`molink.core.scheduler`). A request's log is dropped when it
finishes; when its positions restart (it was preempted and recomputes), the rows from the restart
on replace the old ones. A log with a gap (positions not logged) is dropped until it restarts
from position 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from vllm.logger import init_logger

logger = init_logger(__name__)

#: Seconds between two warnings that logs went over the cap.
WARN_INTERVAL_S = 60.0

#: Architectures whose decoder layers start with ``input_layernorm(hidden_states, residual)``,
#: which adds the two before anything else reads them (checked in vLLM 0.32's model files).
#: For these a stage's inputs may be logged as one sum (see :class:`LogForm`).
ADD_FIRST_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "MixtralForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
    }
)

#: The name under which a folded row (``hidden_states + residual``) is kept.
SUM = "hidden_states+residual"


@dataclass(frozen=True)
class LogForm:
    """How a log keeps rows so that replaying them gives the next span the very inputs it had.

    * ``fold``: keep ``hidden_states + residual`` (float32 rows only) and replay it as
      ``hidden_states`` with a zero ``residual``. Exact when the next span's first layer adds
      the two first (:data:`ADD_FIRST_ARCHITECTURES`): float32 addition is commutative and
      ``s + 0 == s``, so the layer sees the same sum and everything after it is the same. It
      needs a lossless wire: the receiver sums what it decoded. Half the memory of both rows.
      (Not for 16-bit models: their kernels add in float32 and norm the unrounded sum, so the
      exact sum takes 4 bytes per value, as much as both 16-bit rows.)
    * ``dtype``: keep rows in this dtype where it is narrower than theirs (the wire's dtype:
      what the next stage received, bit for bit, since the replay casts it the same way).
    """

    fold: bool = False
    dtype: torch.dtype | None = None

    @classmethod
    def for_boundary(cls, architectures: list[str], wire_dtype: torch.dtype | None) -> LogForm:
        """The form for a model's ``architectures`` and a wire dtype (None: the model's)."""
        lossless = wire_dtype in (None, torch.float32)
        fold = lossless and bool(architectures) and set(architectures) <= ADD_FIRST_ARCHITECTURES
        return cls(fold=fold, dtype=wire_dtype)

    def pack(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``rows`` (each [n, hidden]) as the log keeps them: always a copy on the host."""
        h, r = rows.get("hidden_states"), rows.get("residual")
        if (
            self.fold
            and len(rows) == 2
            and h is not None
            and r is not None
            and h.dtype == r.dtype == torch.float32
        ):
            return {SUM: torch.add(h, r).cpu()}  # [n, hidden]
        return {name: self._host_copy(t) for name, t in rows.items()}

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t``, in the narrower dtype if there is one (one copy either way)."""
        if (
            self.dtype is not None
            and t.is_floating_point()
            and self.dtype.itemsize < t.element_size()
        ):
            return t.to(device="cpu", dtype=self.dtype)
        return t.to("cpu", copy=True)

    @staticmethod
    def unpack(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Kept rows (each [n, hidden]) as the next span takes them in."""
        if SUM in rows:
            s = rows[SUM]
            return {"hidden_states": s, "residual": torch.zeros_like(s)}
        return rows


@dataclass
class _RequestLog:
    """Rows [0, length) of one request, as chunks in position order."""

    chunks: list[dict[str, torch.Tensor]] = field(default_factory=list)  # each [n, hidden]
    length: int = 0
    nbytes: int = 0


class ReplayLog:
    """Activations sent downstream, per request (thread-safe: the stage's compute thread
    writes, the scheduler and the executor read)."""

    def __init__(
        self,
        capacity_bytes: int,
        on_size: Callable[[int], None] | None = None,
        form: LogForm | None = None,
    ) -> None:
        """``on_size`` is told the log's bytes after each change (the head's gauge); ``form``:
        how rows are kept."""
        self.capacity_bytes = capacity_bytes
        self.on_size = on_size
        self.form = form or LogForm()
        self._lock = threading.Lock()
        self._logs: dict[str, _RequestLog] = {}
        self._nbytes = 0
        self._dropped = 0  # request logs dropped over the cap since the last warning
        self._warned_at = -WARN_INTERVAL_S

    def record(self, req_id: str, start: int, rows: dict[str, torch.Tensor]) -> None:
        """Log the rows of positions [start, start + n) of ``req_id``; each tensor [n, hidden]
        (kept as a copy, in the log's :class:`LogForm`: the caller may reuse its buffers)."""
        self.record_step([(req_id, start, rows)])

    def record_step(self, entries: list[tuple[str, int, dict[str, torch.Tensor]]]) -> None:
        """:meth:`record` for each ``(req_id, start, rows)`` of one step, under one lock."""
        copied = [
            (req_id, start, self.form.pack(rows))
            for req_id, start, rows in entries
            if next(iter(rows.values())).shape[0]
        ]
        if not copied:
            return
        with self._lock:
            for req_id, start, rows in copied:
                self._append(req_id, start, rows)
            dropped = 0
            while self._nbytes > self.capacity_bytes and self._logs:
                self._drop(max(self._logs, key=lambda r: self._logs[r].nbytes))  # the largest
                dropped += 1
            if dropped:
                self._warn_dropped(dropped)
            if self.on_size is not None:
                self.on_size(self._nbytes)

    def _append(self, req_id: str, start: int, rows: dict[str, torch.Tensor]) -> None:
        """Add ``rows`` (each [n, hidden]) at position ``start`` (caller holds the lock)."""
        log = self._logs.get(req_id)
        if log is None:
            if start != 0:  # a gap: nothing to replay until it restarts
                return
            log = self._logs[req_id] = _RequestLog()
        if start < log.length:
            self._truncate(log, start)
        elif start > log.length:
            self._drop(req_id)
            return
        size = sum(t.numel() * t.element_size() for t in rows.values())
        log.chunks.append(rows)
        log.length += next(iter(rows.values())).shape[0]
        log.nbytes += size
        self._nbytes += size

    def _warn_dropped(self, dropped: int) -> None:
        """Say that requests' logs went over the cap, at most once a minute."""
        self._dropped += dropped
        now = time.monotonic()
        if now - self._warned_at < WARN_INTERVAL_S:
            return
        logger.warning(
            "Replay log over %.3g MiB: dropped %d request log(s) since the last report, the "
            "largest first (those requests recompute if their next stage is lost)",
            self.capacity_bytes / 2**20,
            self._dropped,
        )
        self._warned_at, self._dropped = now, 0

    def drop(self, req_ids: set[str] | list[str]) -> None:
        """Forget finished requests."""
        with self._lock:
            for req_id in req_ids:
                if req_id in self._logs:
                    self._drop(req_id)
            if self.on_size is not None:
                self.on_size(self._nbytes)

    def length(self, req_id: str) -> int:
        """How many leading positions of ``req_id`` the log holds."""
        with self._lock:
            log = self._logs.get(req_id)
            return log.length if log is not None else 0

    @property
    def positions(self) -> int:
        """Positions logged, over every request."""
        with self._lock:
            return sum(log.length for log in self._logs.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._logs)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def rows(self, req_id: str, start: int, end: int) -> dict[str, torch.Tensor] | None:
        """Rows of positions [start, end) of ``req_id`` (each [end - start, hidden]), or None
        when the log doesn't hold them all."""
        with self._lock:
            log = self._logs.get(req_id)
            if log is None or end > log.length or start >= end:
                return None
            pieces: dict[str, list[torch.Tensor]] = {name: [] for name in log.chunks[0]}
            offset = 0
            for chunk in log.chunks:
                n = next(iter(chunk.values())).shape[0]
                lo, hi = max(start, offset), min(end, offset + n)
                if lo < hi:
                    for name, t in chunk.items():
                        pieces[name].append(t[lo - offset : hi - offset])
                offset += n
                if offset >= end:
                    break
        return LogForm.unpack({name: torch.cat(parts) for name, parts in pieces.items()})

    def _truncate(self, log: _RequestLog, length: int) -> None:
        kept: list[dict[str, torch.Tensor]] = []
        offset = 0
        for chunk in log.chunks:
            n = next(iter(chunk.values())).shape[0]
            if offset + n <= length:
                kept.append(chunk)
            elif offset < length:
                kept.append({name: t[: length - offset].clone() for name, t in chunk.items()})
            offset += n
        nbytes = sum(t.numel() * t.element_size() for c in kept for t in c.values())
        self._nbytes += nbytes - log.nbytes
        log.chunks, log.length, log.nbytes = kept, length, nbytes

    def _drop(self, req_id: str) -> None:
        log = self._logs.pop(req_id)
        self._nbytes -= log.nbytes
