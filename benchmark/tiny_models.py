"""Tiny random-weight checkpoints of many model families, built offline (no HF hub access).

Tests and benchmarks build the models they run here, in seconds, instead of downloading any:

    path = build_checkpoint("/tmp/ckpt/qwen3-tiny", "qwen3", num_layers=6)

* :data:`FAMILIES` lists the families, each as a transformers config and model class with small
  shapes (hidden 128, head_dim 64, which vLLM's CPU attention needs; 2 query heads), plus what the
  family exercises in a pipeline (MoE layers, sliding windows, MLA, SSM state). Layer-dependent
  settings put different layer kinds in the two halves of the stack, so that a two-stage split
  gives each stage one kind.
* :func:`build_tokenizer` trains a small byte-level BPE tokenizer on :data:`CORPUS` and saves it
  as a ``PreTrainedTokenizerFast`` with ``<s>``/``</s>`` and a ChatML-style chat template; every
  family shares it.
* :func:`build_checkpoint` saves a random float32 model of a family, with that tokenizer; vLLM
  can load the folder directly.

Both are deterministic and cached by path: a finished folder (its marker file is written last)
is returned without rebuilding.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = ".molink-test-checkpoint.json"

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START, IM_END]
TOKENIZER_VOCAB_SIZE = 1536

# ChatML-like: "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """
The quick brown fox jumps over the lazy dog while the farmer watches from the porch.
Once upon a time there was a small village at the edge of a great forest. The people of the
village grew wheat and barley, kept goats and chickens, and traded wool at the market in the
town beyond the river. Every spring the river flooded the low fields, and every summer the
children swam in the cool water under the old stone bridge.

The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome,
and the capital of Spain is Madrid. Paris is known for the Eiffel Tower, the Louvre museum and
its many cafes along the Seine. Berlin has a long and complicated history, and Rome was once the
center of a vast empire that stretched from Britain to Egypt.

Computers follow instructions written by programmers. A program reads input, performs some
computation, and produces output. Modern software is built from many layers: the operating
system manages memory and processes, libraries provide reusable functions, and applications
solve problems for people. Networks connect machines across the world, so a request sent from
one computer can be answered by a server thousands of kilometers away.

Large language models predict the next word in a sentence. They are trained on enormous amounts
of text and learn patterns of grammar, facts about the world, and even some reasoning skills.
Serving such a model requires fast matrix multiplication, careful memory management, and
scheduling of many requests at the same time. When a model is too large for one machine, its
layers can be split into stages, and each stage runs on a different computer. The hidden states
flow from the first stage to the last one, which turns them into probabilities over tokens.

In the kitchen, my grandmother baked bread every morning. She mixed flour, water, salt and
yeast, then kneaded the dough until it was smooth and elastic. While the bread was rising she
made coffee and told stories about her childhood in the mountains, where winters were long and
snow covered the roads for months. The smell of fresh bread filled the whole house.

Science begins with curiosity. Why is the sky blue? Why do leaves change color in autumn? How do
birds find their way south in winter? Scientists observe, measure, and test ideas with careful
experiments. Physics studies energy, motion and forces; chemistry studies atoms and molecules;
biology studies living things, from tiny bacteria to enormous whales swimming in the ocean.

Numbers are everywhere: one, two, three, four, five, six, seven, eight, nine, ten. Monday,
Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday make up the week. January, February,
March, April, May, June, July, August, September, October, November and December are the months.
Red, orange, yellow, green, blue, indigo and violet are the colors of the rainbow.

Hello! How are you today? I am fine, thank you. What would you like to talk about? Can you help
me write a short letter to my friend? Of course. Dear friend, I hope this letter finds you well.
The weather here has been warm and sunny, and the garden is full of tomatoes, beans and roses.
Please write back soon and tell me about your new job in the city. With love, your old friend.

Mountains rise above the clouds, deserts stretch to the horizon, and islands float in quiet
seas. Travelers carry maps, water, and a little courage. Some journeys take a day, others take a
lifetime. The best stories often begin with a single step through an open door.
"""


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    """Write ``info`` as the marker file of ``folder`` atomically (it must be written last)."""
    tmp = folder / f"{MARKER_NAME}.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER_NAME)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """Return the marker of a finished folder, or None when it is missing or unreadable."""
    try:
        info = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock next to ``folder`` so parallel test workers build it only once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _publish(staging: Path, target: Path, info: dict[str, Any]) -> None:
    """Move the files built in ``staging`` into ``target`` and write the marker last."""
    target.mkdir(parents=True, exist_ok=True)
    (target / MARKER_NAME).unlink(missing_ok=True)
    for item in sorted(staging.iterdir()):
        dest = target / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
    _write_marker(target, info)


def _train_tokenizer() -> Any:
    """Train the byte-level BPE tokenizer on :data:`CORPUS`; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    # Like Llama tokenizers: plain encodes get a leading <s>; chat prompts carry it through the
    # template and are encoded without special tokens.
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Train (or load, when already built) the test tokenizer and save it into ``path``.

    Args:
        path: folder to write ``tokenizer.json``, ``tokenizer_config.json`` and the chat
            template into (created if needed; other files in it are left alone).

    Returns:
        The ``transformers.PreTrainedTokenizerFast``; ``len(tokenizer)`` is the vocab size to
        give a model.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = _train_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    logger.info("Test tokenizer (%d tokens) saved to %s", len(tokenizer), folder)
    return tokenizer


def _init_weights(model: Any, seed: int) -> None:
    """Deterministically fill every parameter of ``model`` from a seeded generator.

    The scales are larger than the usual 0.02 so that attention and MLP outputs matter next to
    the residual stream: with a tiny init the next token depends almost only on the current one,
    and greedy decoding falls into a loop of one or two tokens.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.endswith("norm.weight"):
                # RMSNorm gains (input/post-attention/final norm and Qwen3's q_norm/k_norm).
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif param.dim() == 1:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                # Linear layers and lm_head, weight shape (out, in): unit-variance outputs.
                std = 1.0 / math.sqrt(param.shape[1])
                param.copy_(std * torch.randn(param.shape, generator=generator))


def _halves(num_layers: int, first: str, second: str) -> list[str]:
    """``first`` for the lower half of the layers, ``second`` for the upper half."""
    return [first if i < num_layers // 2 else second for i in range(num_layers)]


#: A sliding window short enough that the test prompts (up to ~200 tokens) outgrow it.
SLIDING_WINDOW = 32


@dataclass(frozen=True)
class Family:
    """A model family: its transformers classes and the small shape its tiny checkpoint gets.

    ``config(num_layers)`` returns the family's own config fields on top of :data:`BASE_CONFIG`;
    ``exercises`` says what a pipeline meets in it; ``engine_args`` are the vLLM flags its
    float32 checkpoint needs on every node (and on the reference), with the reason beside them.
    """

    name: str
    config_class: str
    model_class: str
    config: Callable[[int], dict[str, Any]]
    exercises: str
    engine_args: tuple[str, ...] = ()


def _qwen3_moe(dense_layers: int) -> dict[str, Any]:
    """Qwen3-MoE: 4 experts, 2 a token; the first ``dense_layers`` layers have plain MLPs."""
    return {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "mlp_only_layers": list(range(dense_layers)),
    }


def _granite_hybrid(num_layers: int, experts: int) -> dict[str, Any]:
    """Granite 4.0-H style: Mamba2 layers, then attention layers; MoE when ``experts``."""
    return {
        "head_dim": None,
        "layer_types": _halves(num_layers, "linear_attention", "full_attention"),
        "num_local_experts": experts,
        "num_experts_per_tok": min(2, experts),
        "shared_intermediate_size": 128,
        "mamba_n_heads": 4,
        "mamba_d_head": 64,
        "mamba_n_groups": 1,
        "mamba_d_state": 16,
        "mamba_chunk_size": 64,
    }


#: Fields every family's config gets (a family may override them).
BASE_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in [
        Family("llama", "LlamaConfig", "LlamaForCausalLM", lambda n: {}, "dense, GQA"),
        Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", lambda n: {}, "dense, QKV bias"),
        Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", lambda n: {}, "dense, QK norm"),
        Family(
            "mistral",
            "MistralConfig",
            "MistralForCausalLM",
            lambda n: {"sliding_window": None},
            "dense",
        ),
        Family(
            "gemma2",
            "Gemma2Config",
            "Gemma2ForCausalLM",
            lambda n: {
                "layer_types": _halves(n, "sliding_attention", "full_attention"),
                "sliding_window": SLIDING_WINDOW,
                "query_pre_attn_scalar": 64,
                "tie_word_embeddings": True,  # vLLM's Gemma has no lm_head of its own
            },
            "sliding-window layers on one stage, full attention on the other; logit soft-capping",
        ),
        Family(
            "gemma3_text",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            lambda n: {
                "layer_types": _halves(n, "sliding_attention", "full_attention"),
                "sliding_window": SLIDING_WINDOW,
                "query_pre_attn_scalar": 64,
                "tie_word_embeddings": True,  # vLLM's Gemma has no lm_head of its own
            },
            "sliding-window layers on one stage, full attention on the other; two RoPE bases",
        ),
        Family(
            "phi3",
            "Phi3Config",
            "Phi3ForCausalLM",
            lambda n: {"head_dim": None},
            "fused QKV and gate-up projections",
        ),
        Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", lambda n: {}, "post-norm, QK norm"),
        Family(
            "qwen3_moe",
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            lambda n: _qwen3_moe(dense_layers=0),
            "MoE in every layer (as released Qwen3-MoE models)",
        ),
        Family(
            "qwen3_moe_dense_half",
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            lambda n: _qwen3_moe(dense_layers=n // 2),
            "dense layers (mlp_only_layers) on one stage, MoE layers on the other",
        ),
        Family(
            "mixtral",
            "MixtralConfig",
            "MixtralForCausalLM",
            lambda n: {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
            "MoE in every layer",
        ),
        Family(
            "deepseek_v2",
            "DeepseekV2Config",
            "DeepseekV2ForCausalLM",
            lambda n: {
                "num_key_value_heads": 2,
                "head_dim": None,
                "kv_lora_rank": 512,
                "q_lora_rank": None,
                "qk_rope_head_dim": 64,
                "qk_nope_head_dim": 64,
                "v_head_dim": 64,
                "moe_intermediate_size": 64,
                "n_routed_experts": 4,
                "n_shared_experts": 1,
                "num_experts_per_tok": 2,
                "first_k_dense_replace": n // 2,
                "topk_method": "greedy",
                "n_group": 1,
                "topk_group": 1,
            },
            "MLA (compressed latent KV); dense layers on one stage, MoE on the other",
            # On a CPU with AMX, vLLM 0.32 picks its AMX MLA backend, which takes 16-bit weights
            # only (vllm/v1/attention/backends/mla/amx_mla.py:303); the reference one takes
            # float32 (vllm/platforms/cpu.py:156).
            engine_args=("--attention-backend", "CPU_MLA"),
        ),
        Family(
            "gpt_oss",
            "GptOssConfig",
            "GptOssForCausalLM",
            lambda n: {
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "layer_types": _halves(n, "sliding_attention", "full_attention"),
                "sliding_window": SLIDING_WINDOW,
            },
            "attention sinks; sliding-window layers on one stage, full on the other; MoE",
        ),
        Family(
            "jamba",
            "JambaConfig",
            "JambaForCausalLM",
            lambda n: {
                "head_dim": None,
                "attn_layer_period": n,
                "attn_layer_offset": n - 1,
                "expert_layer_period": n + 1,
                "expert_layer_offset": n,
                "mamba_d_state": 16,
                "mamba_d_conv": 4,
                "mamba_expand": 2,
                "mamba_dt_rank": 8,
            },
            "hybrid: Mamba layers (SSM state, no paged KV) and one attention layer",
        ),
        Family(
            "granitemoehybrid",
            "GraniteMoeHybridConfig",
            "GraniteMoeHybridForCausalLM",
            lambda n: _granite_hybrid(n, experts=0),
            "hybrid: Mamba2 layers (SSM state) on one stage, attention on the other",
        ),
        Family(
            "granitemoehybrid_moe",
            "GraniteMoeHybridConfig",
            "GraniteMoeHybridForCausalLM",
            lambda n: _granite_hybrid(n, experts=4),
            "hybrid as above, with MoE layers",
        ),
        Family(
            "lfm2",
            "Lfm2Config",
            "Lfm2ForCausalLM",
            lambda n: {
                "head_dim": None,
                "layer_types": _halves(n, "conv", "full_attention"),
                "full_attn_idxs": None,
                "block_auto_adjust_ff_dim": False,
                # Older config names, which LFM2 checkpoints carry and vLLM reads.
                "conv_dim": 128,
                "block_dim": 128,
            },
            "hybrid: short-convolution layers (conv state) on one stage, attention on the other",
        ),
        Family(
            "mamba2",
            "Mamba2Config",
            "Mamba2ForCausalLM",
            lambda n: {
                "head_dim": 64,
                "num_heads": 4,
                "n_groups": 1,
                "state_size": 16,
                "expand": 2,
                "conv_kernel": 4,
                "num_key_value_heads": None,
            },
            "pure SSM: per-request state, no paged KV",
        ),
    ]
}


def build_checkpoint(
    path: str | os.PathLike[str], family: str = "qwen3", num_layers: int = 4, seed: int = 0
) -> str:
    """Build a random-weight float32 checkpoint of ``family`` (with tokenizer) that vLLM loads.

    The shape is :data:`BASE_CONFIG` with the family's own fields, ``num_layers`` decoder layers,
    untied lm_head, vocab = the test tokenizer's size. The same ``seed`` always gives the same
    weights.

    Args:
        path: output folder; returned as is when it already holds this exact checkpoint.
        family: a key of :data:`FAMILIES`.
        num_layers: number of decoder layers (pipelines split these across stages).
        seed: seed for the weights.

    Returns:
        The absolute path of the checkpoint folder.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    target = Path(path).absolute()
    wanted = {
        "format_version": FORMAT_VERSION,
        "kind": family,
        "num_layers": num_layers,
        "seed": seed,
        "fields": FAMILIES[family].config(num_layers),  # a changed family is rebuilt
    }
    if _read_marker(target) == wanted:
        return str(target)

    with _locked(target):
        marker = _read_marker(target)
        if marker == wanted:
            return str(target)
        if marker is not None:
            logger.warning("Rebuilding %s: it holds %s, wanted %s", target, marker, wanted)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            _write_model(staging, FAMILIES[family], num_layers=num_layers, seed=seed)
            _publish(staging, target, wanted)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("Random %s checkpoint (%d layers, seed %d) at %s", family, num_layers, seed, target)
    return str(target)


def _write_model(folder: Path, family: Family, num_layers: int, seed: int) -> None:
    """Write ``family``'s model, its generation config and the tokenizer into ``folder``."""
    import torch
    import transformers
    from transformers import GenerationConfig

    tokenizer = build_tokenizer(folder)
    fields = {
        **BASE_CONFIG,
        "vocab_size": len(tokenizer),
        "num_hidden_layers": num_layers,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **family.config(num_layers),
    }
    fields = {key: value for key, value in fields.items() if value is not None}
    config = getattr(transformers, family.config_class)(**fields, dtype="float32")
    config.architectures = [family.model_class]
    model = getattr(transformers, family.model_class)(config).to(torch.float32)
    _init_weights(model, seed)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(folder)
