"""Whether MoLink can serve a model, decided from its config before any weights load.

A node refuses at start, with the model's name and the reason, a model that vLLM can't split into
pipeline stages: its model class doesn't implement vLLM's ``SupportsPP``, so a stage would have no
way to take hidden states in or hand them on. (No encoder-decoder model of vLLM 0.32 implements
it, so cross-attention state never reaches a stage.)
"""

from __future__ import annotations

from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.models import ModelRegistry


class UnsupportedModel(ValueError):
    """MoLink can't serve this model; the message says which model and why."""


def check_servable(engine_args: EngineArgs, name: str) -> None:
    """Raise :class:`UnsupportedModel` when MoLink can't serve ``engine_args.model``.

    Reads only the model's config (vLLM caches what it learns of a model class), so it runs
    before the node joins the swarm or loads a weight.
    """
    model_config = engine_args.create_model_config()
    architectures = model_config.architectures
    shown = ", ".join(architectures) or "an unknown architecture"
    if not ModelRegistry.is_pp_supported_model(architectures, model_config):
        raise UnsupportedModel(
            f"MoLink can't serve {name} ({shown}): vLLM can't split this architecture into "
            "pipeline stages (its model class doesn't implement vLLM's SupportsPP interface)"
        )
