"""Which weights a node serves: digests of the checkpoint's tensors per layer, cached beside it.

Nodes that agree on ``config.json`` may still hold different weights: a fine-tune of the same
architecture, a quantized copy, a corrupted download. Each would change every answer without an
error. So every node digests its checkpoint: one digest per decoder layer (the tensors whose name
holds ``layers.<i>.``) and one for the rest (embeddings, final norm, LM head). A node announces
the digest of the span it serves (:meth:`WeightDigests.span`); the head computes the same from
its own checkpoint and leaves out nodes whose digest differs (:mod:`molink.comm.chain`).

Safetensors files are read through their header (no tensor is deserialized); each tensor's
name, dtype, shape and bytes go into its layer's digest. Other checkpoint formats are digested by
their files' contents as a whole, so every span then compares the whole checkpoint.

Digesting reads every weight byte once (about 1 GB/s here), so the result is cached: in
``.molink-weights.json`` beside the checkpoint, or under ``~/.cache/molink/weights`` when that
folder is read-only, keyed by each file's name, size and modification time.

The digest catches honest mistakes, not a malicious node, which can announce any digest; swarm
admission (:mod:`molink.security`) is what keeps strangers out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vllm.logger import init_logger

logger = init_logger(__name__)

CACHE_NAME = ".molink-weights.json"
CACHE_VERSION = 1
# Tensor names of decoder layer i: "model.layers.3.mlp.up_proj.weight", "transformer.h.3.attn...".
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 16 * 2**20
_DIGEST_CHARS = 16  # 64 bits: a checksum against mistakes, not an adversary
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class WeightDigests:
    """Digests of one checkpoint: one per decoder layer and one for everything else."""

    layers: tuple[str, ...]  # empty when the checkpoint isn't per-tensor readable (whole files)
    other: str

    def span(self, start: int, end: int, num_layers: int) -> str:
        """The digest of what a node serving layers ``start..end`` (inclusive) computes with:
        those layers, plus the non-layer tensors when it is the first or the last stage."""
        if not self.layers:
            return self.other
        if not 0 <= start <= end < len(self.layers):
            raise ValueError(f"layers {start}-{end} are outside 0-{len(self.layers) - 1}")
        parts = list(self.layers[start : end + 1])
        if start == 0 or end == num_layers - 1:
            parts.append(self.other)
        return _short(hashlib.sha256("|".join(parts).encode()).hexdigest())

    def to_dict(self) -> dict[str, object]:
        return {"layers": list(self.layers), "other": self.other}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> WeightDigests:
        layers = d.get("layers") or []
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise ValueError("layers must be a list of strings")
        return cls(layers=tuple(layers), other=str(d["other"]))


def checkpoint_dir(model: str) -> Path | None:
    """The local folder holding ``model``'s weights (a path, or a downloaded Hub repo)."""
    if os.path.isdir(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001  # not downloaded, or not a repo id
        return None


def weight_digests(model: str, num_layers: int) -> WeightDigests | None:
    """The digests of ``model``'s checkpoint, from the cache when its files are unchanged.

    None when the weights can't be found locally (then nothing is compared).
    """
    folder = checkpoint_dir(model)
    if folder is None:
        logger.warning("No local checkpoint found for %s: its weights can't be compared", model)
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if any(p.name.endswith(".safetensors") for p in files):  # what vLLM loads when present
        files = [p for p in files if p.name.endswith(".safetensors")]
    if not files:
        logger.warning("No weight files in %s: its weights can't be compared", folder)
        return None
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    cached = _read_cache(folder, stamp, num_layers)
    if cached is not None:
        return cached
    total = sum(size for size, _ in stamp.values())
    logger.info(
        "Digesting the weights in %s (%.1f GB, once; cached beside them)", folder, total / 1e9
    )
    started = time.monotonic()
    digests = _digest(files, num_layers, total)
    logger.info("Weights digested in %.1f s", time.monotonic() - started)
    _write_cache(folder, stamp, num_layers, digests)
    return digests


# ---------------------------------------------------------------- digesting
def _short(hexdigest: str) -> str:
    return hexdigest[:_DIGEST_CHARS]


class _Progress:
    """Logs how far a long digest has come, at most every ``period_s`` seconds."""

    def __init__(self, total: int, period_s: float = 10.0) -> None:
        self.total, self.done, self.period_s = total, 0, period_s
        self._next = time.monotonic() + period_s

    def add(self, n: int) -> None:
        self.done += n
        if time.monotonic() >= self._next and self.total:
            self._next = time.monotonic() + self.period_s
            logger.info("Digesting weights: %.0f%%", 100.0 * self.done / self.total)


def _digest(files: list[Path], num_layers: int, total: int) -> WeightDigests:
    progress = _Progress(total)
    if not all(p.name.endswith(".safetensors") for p in files):
        h = hashlib.sha256()
        for path in files:
            size = path.stat().st_size
            h.update(f"{path.name}:{size}|".encode())
            with path.open("rb") as f:
                for chunk in _read_chunks(f, 0, size, progress):
                    h.update(chunk)
        return WeightDigests(layers=(), other=_short(h.hexdigest()))
    per_tensor: dict[str, str] = {}
    for path in files:
        per_tensor.update(_safetensors_digests(path, progress))
    groups: list[list[str]] = [[] for _ in range(num_layers)]
    other: list[str] = []
    for name in sorted(per_tensor):
        layer = layer_of(name)
        (groups[layer] if layer is not None and layer < num_layers else other).append(
            per_tensor[name]
        )
    return WeightDigests(
        layers=tuple(_combine(g) for g in groups),
        other=_combine(other),
    )


def _combine(digests: Iterable[str]) -> str:
    return _short(hashlib.sha256("|".join(digests).encode()).hexdigest())


def layer_of(tensor_name: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to (None: embeddings, final norm, head)."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files in a checkpoint folder (empty when there are none)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors"))


def safetensors_header(f: BinaryIO, path: Path) -> tuple[dict[str, dict], int]:
    """The tensors a safetensors file holds (name -> dtype, shape, data_offsets), and the
    offset their data starts at; reads only the header of the open file ``f``."""
    size = path.stat().st_size
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{path} is not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", raw)
    if not 0 < header_len <= min(_MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"{path} has a bad safetensors header length {header_len}")
    header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _safetensors_digests(path: Path, progress: _Progress) -> dict[str, str]:
    """sha256 of each tensor's name, dtype, shape and bytes, read through the file's header."""
    size = path.stat().st_size
    out = {}
    with path.open("rb") as f:
        header, base = safetensors_header(f, path)
        tensors = sorted(
            header.items(),
            key=lambda item: item[1]["data_offsets"][0],
        )
        for name, meta in tensors:
            begin, end = meta["data_offsets"]
            if not 0 <= begin <= end <= size - base:
                raise ValueError(f"{path}: tensor {name} lies outside the file")
            h = hashlib.sha256(f"{name}|{meta['dtype']}|{meta['shape']}|".encode())
            for chunk in _read_chunks(f, base + begin, end - begin, progress):
                h.update(chunk)
            out[name] = h.hexdigest()
    return out


def _read_chunks(f: BinaryIO, offset: int, length: int, progress: _Progress) -> Iterable[bytes]:
    """``length`` bytes of the open file ``f`` from ``offset``, in chunks."""
    f.seek(offset)
    left = length
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise ValueError(f"{f.name} ended early")
        left -= len(chunk)
        progress.add(len(chunk))
        yield chunk


# ---------------------------------------------------------------- cache
def _cache_paths(folder: Path) -> list[Path]:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return [folder / CACHE_NAME, home / "molink" / "weights" / f"{key}.json"]


def _read_cache(folder: Path, stamp: dict, num_layers: int) -> WeightDigests | None:
    for path in _cache_paths(folder):
        try:
            doc = json.loads(path.read_text())
            if (
                doc.get("version") == CACHE_VERSION
                and doc.get("files") == stamp
                and doc.get("num_layers") == num_layers
            ):
                return WeightDigests.from_dict(doc["digests"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _write_cache(folder: Path, stamp: dict, num_layers: int, digests: WeightDigests) -> None:
    doc = {
        "version": CACHE_VERSION,
        "files": stamp,
        "num_layers": num_layers,
        "digests": digests.to_dict(),
    }
    for path in _cache_paths(folder):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
            return
        except OSError:
            continue
    logger.warning("Could not cache the weight digests of %s", folder)
