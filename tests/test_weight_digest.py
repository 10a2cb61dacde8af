"""Weight digests: per layer from safetensors headers, whole files otherwise, cached beside the
checkpoint (or in the user's cache when that folder can't be written)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import molink.weight_digest as wd
from molink.weight_digest import CACHE_NAME, WeightDigests, weight_digests

NUM_LAYERS = 4


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g)}
    for i in range(NUM_LAYERS):
        out[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(8, 8, generator=g)
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(8)
    out["model.norm.weight"] = torch.ones(8)
    return out


def checkpoint(folder: Path, weights: dict[str, torch.Tensor]) -> str:
    """Two shards, like a Hub checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(weights)
    half = len(names) // 2
    save_file({n: weights[n] for n in names[:half]}, folder / "model-00001-of-00002.safetensors")
    save_file({n: weights[n] for n in names[half:]}, folder / "model-00002-of-00002.safetensors")
    return str(folder)


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def test_altering_one_layer_changes_only_the_spans_that_hold_it(tmp_path: Path) -> None:
    base = weight_digests(checkpoint(tmp_path / "a", tensors()), NUM_LAYERS)
    altered = tensors()
    altered["model.layers.2.mlp.up_proj.weight"][0, 0] += 1e-3
    tuned = weight_digests(checkpoint(tmp_path / "b", altered), NUM_LAYERS)
    assert base is not None and tuned is not None
    assert len(base.layers) == NUM_LAYERS
    assert [a == b for a, b in zip(base.layers, tuned.layers, strict=True)] == [
        True,
        True,
        False,
        True,
    ]
    assert base.other == tuned.other
    assert base.span(1, 1, NUM_LAYERS) == tuned.span(1, 1, NUM_LAYERS)
    assert base.span(1, 2, NUM_LAYERS) != tuned.span(1, 2, NUM_LAYERS)
    assert base.span(3, 3, NUM_LAYERS) == tuned.span(3, 3, NUM_LAYERS)
    # The same tensors in other shards (and another folder) digest the same.
    same = tensors()
    folder = tmp_path / "c"
    folder.mkdir()
    save_file(same, folder / "model.safetensors")
    assert weight_digests(str(folder), NUM_LAYERS) == base


def test_the_first_and_last_spans_cover_the_other_tensors(tmp_path: Path) -> None:
    base = weight_digests(checkpoint(tmp_path / "a", tensors()), NUM_LAYERS)
    altered = tensors()
    altered["model.norm.weight"] *= 2
    other = weight_digests(checkpoint(tmp_path / "b", altered), NUM_LAYERS)
    assert base is not None and other is not None
    assert base.layers == other.layers and base.other != other.other
    assert base.span(1, 2, NUM_LAYERS) == other.span(1, 2, NUM_LAYERS)  # a middle stage
    assert base.span(2, 3, NUM_LAYERS) != other.span(2, 3, NUM_LAYERS)  # the last stage
    assert base.span(0, 1, NUM_LAYERS) != other.span(0, 1, NUM_LAYERS)  # the head
    with pytest.raises(ValueError):
        base.span(2, NUM_LAYERS, NUM_LAYERS)


def test_digests_are_cached_beside_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = checkpoint(tmp_path / "a", tensors())
    first = weight_digests(model, NUM_LAYERS)
    assert (Path(model) / CACHE_NAME).is_file()

    def no_rehash(*args: object) -> WeightDigests:
        raise AssertionError("digested again")

    monkeypatch.setattr(wd, "_digest", no_rehash)
    assert weight_digests(model, NUM_LAYERS) == first  # a second start reads the cache
    shard = Path(model) / "model-00001-of-00002.safetensors"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    with pytest.raises(AssertionError, match="digested again"):
        weight_digests(model, NUM_LAYERS)


def test_a_folder_that_cant_hold_the_cache_uses_the_users(
    tmp_path: Path, _user_cache: Path
) -> None:
    model = checkpoint(tmp_path / "a", tensors())
    (Path(model) / CACHE_NAME).mkdir()  # the cache file can't be written there
    first = weight_digests(model, NUM_LAYERS)
    assert list((_user_cache / "molink" / "weights").glob("*.json"))
    assert weight_digests(model, NUM_LAYERS) == first


def test_other_formats_are_digested_as_whole_files(tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x00" * 1000)
    digests = weight_digests(str(folder), NUM_LAYERS)
    assert digests is not None and digests.layers == ()
    assert digests.span(1, 2, NUM_LAYERS) == digests.span(0, 3, NUM_LAYERS) == digests.other
    (folder / "pytorch_model.bin").write_bytes(b"\x01" * 1000)
    assert weight_digests(str(folder), NUM_LAYERS) != digests


def test_no_local_weights_means_nothing_to_compare(tmp_path: Path) -> None:
    assert weight_digests(str(tmp_path / "missing-repo-id"), NUM_LAYERS) is None
    (tmp_path / "empty").mkdir()
    assert weight_digests(str(tmp_path / "empty"), NUM_LAYERS) is None


def test_a_broken_safetensors_header_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length"):
        weight_digests(str(folder), NUM_LAYERS)


def test_round_trip_through_plain_data(tmp_path: Path) -> None:
    digests = weight_digests(checkpoint(tmp_path / "a", tensors()), NUM_LAYERS)
    assert digests is not None
    assert WeightDigests.from_dict(digests.to_dict()) == digests
