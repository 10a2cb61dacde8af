"""Which model families a MoLink pipeline serves exactly: tiny checkpoints, 2 and 3 stages, one
vLLM process as the reference.

    python -m benchmark.arch_matrix                       # every family, 2 and 3 stages
    python -m benchmark.arch_matrix --families deepseek_v2,jamba --stages 2

For each family of :data:`benchmark.tiny_models.FAMILIES` it builds a tiny random float32
checkpoint (4 layers; the two halves hold different layer kinds where the family has them: dense
and MoE, sliding and full attention, Mamba and attention), serves it with one plain vLLM process,
then with pipelines of 2 and 3 stages on this machine, sends the same greedy requests to each
(concurrently, with chunked prefill), and compares token ids and logprobs. A family that fails
gets the error line from the logs. The table (Markdown) and the raw results (JSON) are written
to ``--out`` (default ``resources/arch_matrix.{md,json}``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai

from benchmark.processes import SHARED_CORES_ENV, ProcessExited
from benchmark.swarm import Swarm, SwarmSpec, even_split, plain_vllm
from benchmark.tiny_models import FAMILIES, build_checkpoint

#: Engine flags for the reference and every node: chunked prefill (64 tokens a step), few
#: sequences, float32 so that identical math gives identical tokens.
ENGINE_ARGS = [
    "--dtype", "float32",
    "--enforce-eager",
    "--max-model-len", "512",
    "--max-num-seqs", "8",
    "--max-num-batched-tokens", "64",
    "--seed", "0",
]  # fmt: skip
#: Families served one request at a time, and why: vLLM itself isn't exact for them when
#: requests share a batch, so a comparison under concurrency would measure vLLM, not MoLink.
ONE_AT_A_TIME = {
    "deepseek_v2": "vLLM 0.32's CPU MLA path gives batch-dependent, run-to-run different "
    "outputs when several requests share a step (one process, --max-num-seqs 8); with one "
    "request per step it is deterministic",
    "lfm2": "vLLM 0.32's CPU short-convolution path gives batch-dependent outputs when several "
    "requests share a step (one process, --max-num-seqs 8); with one request per step it is "
    "deterministic",
}
#: Known upstream causes of a family's failure, shown when it fails (a fixed vLLM drops them).
UPSTREAM = {
    "jamba": "vLLM 0.32's CPU build has no Mamba-1 selective-scan kernel, so one vLLM process "
    "fails too: `ops.selective_scan_fwd` (vllm/model_executor/layers/mamba/ops/mamba_ssm.py:821) "
    "calls `torch.ops._C.selective_scan_fwd` (vllm/_custom_ops.py:1975), absent from the CPU "
    "build's `_C`",
    "mamba2": "vLLM's `Mamba2ForCausalLM` doesn't implement `SupportsPP` "
    "(vllm/model_executor/models/mamba2.py:170): MoLink refuses it at start, as vLLM refuses a "
    "pipeline of it (vllm/config/model.py:1557)",
    "qwen3_moe_dense_half": "vLLM's `Qwen3MoeForCausalLM` raises `No Qwen3MoE layer found` on "
    "a pipeline stage whose layers are all dense (vllm/model_executor/models/qwen3_moe.py:607): "
    "a vLLM pipeline fails the same way. Released Qwen3-MoE models have no dense layers "
    "(qwen3_moe serves)",
    "granitemoehybrid": "vLLM's GraniteMoeHybrid weight loader doesn't skip the weights of layers "
    "another pipeline stage holds: `_load` (vllm/model_executor/models/granitemoehybrid.py:447) "
    "indexes `params_dict` without the `is_pp_missing_parameter` check that `_load_shard` has "
    "(:455), and loads every plain weight (:578); any vLLM pipeline of it fails the same way",
    "granitemoehybrid_moe": "as granitemoehybrid (its MoE router weights go through the same "
    "`_load`, :568)",
}
WORDS = (
    "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree "
    "and people walk along the river to see the boats and the bright sun above the hills"
).split()
NUM_LAYERS = 4
MAX_TOKENS = 24
#: A logprob difference below this counts as rounding (the same tokens, summed differently).
LOGPROB_TOLERANCE = 1e-4
EXCEPTION = re.compile(r"\b[A-Za-z_.]*(Error|Exception)\b: .*|MoLink can't serve .*")
#: Exceptions that only report another one, logged above them.
WRAPPERS = re.compile(
    r"EngineDeadError|Engine core initialization failed|InternalServerError|"
    r"ProcessExited|APIConnectionError|WorkerProc hit an exception|ulimit"
)


def make_prompts(n: int = 6) -> list[str]:
    """``n`` prompts of 6 to ~150 words: several prefill chunks, past the sliding window."""
    return [
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + (i * 37) % 150))
        for i in range(n)
    ]


@dataclass
class Run:
    """One server setup's answers, or why it gave none."""

    setup: str  # "vllm", "2 stages [0-1 | 2-3]", ...
    outputs: list[dict] = field(default_factory=list)  # {"token_ids", "logprobs"} per prompt
    error: str | None = None
    seconds: float = 0.0


async def _complete(base_url: str, model: str, prompts: list[str]) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)

    async def one(prompt: str) -> dict:
        resp = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            logprobs=1,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        choice = resp.choices[0]
        return {
            "token_ids": list(choice.token_ids),
            "logprobs": list(choice.logprobs.token_logprobs),
        }

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def _error_line(logs: list[Path]) -> str:
    """The first exception in ``logs`` that is not only a wrapper of another one."""
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            found = EXCEPTION.search(line)
            if found and not WRAPPERS.search(line):
                return found.group(0).strip()[:400]
    return "no exception in the logs"


def engine_args(family: str) -> list[str]:
    """The engine flags of ``family``'s reference and nodes."""
    one_at_a_time = ["--max-num-seqs", "1"] if family in ONE_AT_A_TIME else []
    return [*ENGINE_ARGS, *one_at_a_time, *FAMILIES[family].engine_args]


def run_reference(model: str, args: list[str], prompts: list[str], work: Path, port: int) -> Run:
    """``prompts`` through one plain vLLM OpenAI server."""
    log = work / "vllm.log"
    started = time.monotonic()
    try:
        with plain_vllm(model, args, port, log, SHARED_CORES_ENV) as url:
            outputs = asyncio.run(_complete(url, model, prompts))
        return Run("vllm", outputs, seconds=time.monotonic() - started)
    except (ProcessExited, TimeoutError, openai.OpenAIError) as e:
        return Run("vllm", error=f"{type(e).__name__}: {_error_line([log])}")


def run_pipeline(
    model: str, args: list[str], stages: int, prompts: list[str], work: Path, port: int
) -> Run:
    """``prompts`` through a pipeline of ``stages`` nodes (an even split), on shared cores."""
    layers = even_split(NUM_LAYERS, stages)
    setup = f"{stages} stages [" + " | ".join(f"{a}-{b}" for a, b in layers) + "]"
    log_dir = work / f"{stages}-stages"
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = SwarmSpec(
        model=model,
        stages=stages,
        layers=layers,
        port=port,
        grpc_base_port=port + 100,
        node_args=args,
        env=SHARED_CORES_ENV,
        log_dir=log_dir,
        ready_timeout=600.0,
        shared_cores=True,
    )
    started = time.monotonic()
    try:
        with Swarm(spec) as swarm:
            outputs = asyncio.run(_complete(swarm.base_url, model, prompts))
        return Run(setup, outputs, seconds=time.monotonic() - started)
    except (ProcessExited, TimeoutError, openai.OpenAIError) as e:
        logs = sorted(log_dir.glob("node*.log"))
        return Run(setup, error=f"{type(e).__name__}: {_error_line(logs)}")


def compare(reference: Run, run: Run) -> dict:
    """How ``run`` matches ``reference``: identical requests and the largest logprob gap."""
    if run.error or reference.error:
        return {"result": "failed", "detail": run.error or "no reference"}
    identical, gap = 0, 0.0
    for ref, got in zip(reference.outputs, run.outputs, strict=True):
        identical += got["token_ids"] == ref["token_ids"]
        for a, b in zip(ref["logprobs"], got["logprobs"], strict=False):
            gap = max(gap, abs(a - b))
            if ref["token_ids"] != got["token_ids"]:
                break  # past the first differing token the contexts differ
    total = len(reference.outputs)
    result = "identical" if identical == total and gap <= LOGPROB_TOLERANCE else "differs"
    return {
        "result": result,
        "identical": f"{identical}/{total}",
        "max_logprob_gap": gap,
        "detail": f"{identical}/{total} identical, max |Δ logprob| {gap:.1e}",
    }


def family_row(name: str, stages: list[int], work: Path, port: int) -> dict:
    """Build ``name``'s checkpoint, serve it every way, and compare; one table row."""
    family = FAMILIES[name]
    fam_work = work / name
    fam_work.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(fam_work / f"{name}-tiny", name, NUM_LAYERS)
    prompts = make_prompts()
    args = engine_args(name)
    print(f"{name}: reference (one vLLM process)", file=sys.stderr, flush=True)
    reference = run_reference(model, args, prompts, fam_work, port)
    row: dict = {
        "family": name,
        "architecture": family.model_class,
        "exercises": family.exercises,
        "engine_args": args,
        "reference": reference.error or "ok",
        "pipelines": {},
    }
    for n in stages:
        if reference.error:
            break
        print(f"{name}: {n} stages", file=sys.stderr, flush=True)
        run = run_pipeline(model, args, n, prompts, fam_work, port)
        row["pipelines"][run.setup] = {**compare(reference, run), "seconds": round(run.seconds)}
        print(f"{name}: {run.setup}: {row['pipelines'][run.setup]['detail']}", file=sys.stderr)
    return row


def note(row: dict) -> str:
    """Why ``row``'s family failed (a known upstream cause), or how it was run."""
    failed = row["reference"] != "ok" or any(
        p["result"] == "failed" for p in row["pipelines"].values()
    )
    return (UPSTREAM if failed else ONE_AT_A_TIME).get(row["family"], "")


def markdown(rows: list[dict], commands: list[str]) -> str:
    """The table of ``rows`` for the README and ``resources/``."""
    setups = sorted({s for row in rows for s in row["pipelines"]})
    lines = [
        f"Model families through a MoLink pipeline ({datetime.date.today()}, vLLM 0.32 CPU, "
        f"tiny random float32 checkpoints of {NUM_LAYERS} layers, 6 concurrent greedy requests "
        f"of {MAX_TOKENS} tokens, chunked prefill; reference: one vLLM process).",
        "",
        "Command: " + ", then ".join(f"`{c}`" for c in commands),
        "",
        "| family | architecture | exercises | " + " | ".join(setups) + " | note |",
        "|---|---|---|" + "---|" * len(setups) + "---|",
    ]
    for row in rows:
        if row["reference"] != "ok":
            cells = [f"vLLM alone fails: {row['reference']}"] + [""] * (len(setups) - 1)
        else:
            cells = [row["pipelines"].get(s, {}).get("detail", "not run") for s in setups]
        cells = [cell.replace("|", "\\|") for cell in [*cells, note(row)]]
        lines.append(
            f"| {row['family']} | `{row['architecture']}` | {row['exercises']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.arch_matrix",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated")
    parser.add_argument("--stages", default="2,3", help="pipeline lengths (default 2,3)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/molink-arch-matrix"))
    parser.add_argument("--out", type=Path, default=Path("resources/arch_matrix"))
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace only these families' rows in an existing --out table",
    )
    args = parser.parse_args()
    names = [n for n in args.families.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    stages = [int(s) for s in args.stages.split(",")]
    commands = [" ".join(["python -m benchmark.arch_matrix", *sys.argv[1:]])]
    rows = [family_row(name, stages, args.work_dir, args.port) for name in names]
    old = args.out.with_suffix(".json")
    if args.update and old.exists():
        fresh = {row["family"]: row for row in rows}
        kept = json.loads(old.read_text())
        rows = [fresh.pop(row["family"], row) for row in kept] + list(fresh.values())
        commands.insert(0, "python -m benchmark.arch_matrix")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows, commands)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
