"""What nodes compare to be sure they serve the same model: its name, config hash and depth."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelIdentity:
    """What nodes compare to be sure they serve the same model."""

    name: str
    config_hash: str
    num_layers: int


def model_identity(model: str, trust_remote_code: bool = False) -> ModelIdentity:
    """Name, config hash and layer count of a model path or name (reads config.json only)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    text_config = config.get_text_config()
    d = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        d.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()
    name = model.rstrip("/").split("/")[-1]
    return ModelIdentity(
        name=name, config_hash=digest[:16], num_layers=int(text_config.num_hidden_layers)
    )
