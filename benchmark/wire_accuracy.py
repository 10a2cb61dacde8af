"""What each wire dtype, or a stage in another dtype, changes against one vLLM process.

    python -m benchmark.wire_accuracy                      # demo model, 2 stages, -> resources/
    python -m benchmark.wire_accuracy --quick              # 4 prompts, 16 tokens (smoke test)

Activations cross each hop in ``--wire_dtype``. With the model's own dtype on the wire a pipeline
computes exactly what one vLLM process computes; a narrower wire dtype rounds the hidden states
and residual at every hop. This starts one plain vLLM server (the reference) and then, for each
wire dtype, a 2-stage swarm of the model (``benchmark/swarm.py``, one machine), sends every one
the same greedy requests with logprobs, and compares them with the reference:

* greedy agreement: the share of requests whose generated tokens are all identical, and the mean
  share of tokens generated before the first difference;
* the largest difference of a chosen token's logprob while the outputs still agree.

It also runs mixed swarms (``--follower-dtypes``): the head in the model dtype of
``--engine-args``, the follower computing in float16 or bfloat16, activations crossing in the
head's dtype and cast by the follower. ``scripts/gpu_check.sh`` runs it on a GPU.

Writes ``wire_accuracy.json`` and ``wire_accuracy.md`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmark.swarm import Swarm, SwarmSpec, demo_model, plain_vllm

SERVED_NAME = "wire"
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "In 1969, the first person to walk on the moon was",
    "A simple recipe for pancakes needs",
    "The largest planet in our solar system is",
    "Photosynthesis is the process by which",
    "The difference between a list and a tuple in Python is",
    "To stay healthy, doctors recommend",
    "The main causes of the French Revolution were",
    "A haiku about autumn leaves:",
    "The speed of light in a vacuum is about",
    "Machine learning models learn from",
    "The Great Wall of China was built to",
    "When writing a cover letter, you should",
    "The theory of evolution was proposed by",
]


def complete(url: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "logprobs": 1,
        "ignore_eos": True,
    }
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        choice = json.load(r)["choices"][0]
    lp = choice["logprobs"]
    return {"tokens": lp["tokens"], "logprobs": lp["token_logprobs"]}


def generate(url: str, args: argparse.Namespace) -> list[dict]:
    """Greedy outputs of the server at ``url`` for the first ``--num-prompts`` prompts."""
    prompts = PROMPTS[: args.num_prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: complete(url, p, args.max_tokens), prompts))


def run_vllm(model: str, args: argparse.Namespace) -> list[dict]:
    """Greedy outputs of one plain vLLM process with the same engine arguments."""
    log = args.output_dir / "logs" / "wire-vllm.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    vllm_args = ["--served-model-name", SERVED_NAME, *args.engine_args]
    with plain_vllm(model, vllm_args, args.port, log, {"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
        return generate(url, args)


def run(
    model: str, wire_dtype: str, args: argparse.Namespace, follower_dtype: str | None = None
) -> list[dict]:
    """Greedy outputs of a 2-stage swarm; ``follower_dtype``: the follower computes in it (the
    head keeps the dtype of ``--engine-args``)."""
    node_args = ["--served-model-name", SERVED_NAME, "--wire_dtype", wire_dtype, *args.engine_args]
    head_args = []
    if follower_dtype:
        node_args += ["--dtype", follower_dtype]
        head_args = ["--dtype", head_dtype(args)]
    spec = SwarmSpec(
        model=model,
        stages=2,
        port=args.port,
        node_args=node_args,
        head_args=head_args,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        log_dir=args.output_dir / "logs" / f"wire-{wire_dtype}-{follower_dtype or 'same'}",
        shared_cores=True,
    )
    with Swarm(spec) as s:
        return generate(s.base_url, args)


def head_dtype(args: argparse.Namespace) -> str:
    """The model dtype of ``--engine-args`` (the head's, and the reference's)."""
    return args.engine_args[args.engine_args.index("--dtype") + 1]


def compare(reference: list[dict], other: list[dict]) -> dict:
    identical, agreed_share, max_diff = 0, [], 0.0
    for ref, out in zip(reference, other, strict=True):
        n = len(ref["tokens"])
        agree = next((i for i in range(n) if ref["tokens"][i] != out["tokens"][i]), n)
        identical += agree == n
        agreed_share.append(agree / n)
        for i in range(agree):
            max_diff = max(max_diff, abs(ref["logprobs"][i] - out["logprobs"][i]))
    return {
        "identical_requests": identical,
        "requests": len(reference),
        "mean_agreeing_prefix": sum(agreed_share) / len(agreed_share),
        "max_logprob_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.wire_accuracy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model path (default: the demo model)")
    parser.add_argument(
        "--wire-dtypes",
        nargs="+",
        default=["float32", "float16", "bfloat16"],
        help="the model's own dtype first: the pipeline's exactness",
    )
    parser.add_argument(
        "--follower-dtypes",
        nargs="*",
        default=["float16", "bfloat16"],
        help="also run a mixed swarm per dtype: the follower computes in it",
    )
    parser.add_argument("--num-prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output-dir", type=Path, default=Path("resources"))
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--quick", action="store_true", help="4 prompts, 16 tokens")
    parser.add_argument(
        "--engine-args",
        type=shlex.split,
        default=shlex.split("--dtype float32 --enforce-eager --max-model-len 1024"),
        help="flags for vLLM and every node, as one string: "
        '--engine-args="--dtype float16 --max-model-len 1024"',
    )
    args = parser.parse_args()
    if args.quick:
        args.num_prompts, args.max_tokens = 4, 16
    model = args.model or demo_model()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print("one vLLM process (the reference)", file=sys.stderr, flush=True)
    reference = run_vllm(model, args)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "model": Path(model).name,
        "command": " ".join(["python -m benchmark.wire_accuracy", *sys.argv[1:]]),
        "max_tokens": args.max_tokens,
        "dtypes": {},
    }
    model_dtype = head_dtype(args)
    for dtype in args.wire_dtypes:
        print(f"{dtype} wire", file=sys.stderr, flush=True)
        results["dtypes"][f"{dtype} wire"] = compare(reference, run(model, dtype, args))
    for dtype in args.follower_dtypes:
        print(f"follower in {dtype}", file=sys.stderr, flush=True)
        outputs = run(model, model_dtype, args, follower_dtype=dtype)
        results["dtypes"][f"{model_dtype} wire, follower computing in {dtype}"] = compare(
            reference, outputs
        )
    (args.output_dir / "wire_accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Wire and stage dtypes vs one vLLM process ({results['date']})",
        "",
        f"Model {results['model']} in {model_dtype}, 2 stages, {args.num_prompts} greedy "
        f"requests of {args.max_tokens} tokens, compared with one vLLM process with the same "
        f"engine arguments. Command: `{results['command']}`",
        "",
        "| Setup | Identical outputs | Mean agreeing prefix | Max logprob difference |",
        "|---|---:|---:|---:|",
    ]
    for dtype, r in results["dtypes"].items():
        lines.append(
            f"| {dtype} | {r['identical_requests']}/{r['requests']} | "
            f"{100 * r['mean_agreeing_prefix']:.0f}% | {r['max_logprob_diff']:.4f} |"
        )
    (args.output_dir / "wire_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
