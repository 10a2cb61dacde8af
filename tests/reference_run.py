"""Single-process vLLM run used as the reference for pipeline outputs.

Run as a script (vLLM starts its engine with spawn, so this must not run at import):
    python reference_run.py SPEC.json OUT.json
SPEC: {"model": path, "engine": {EngineArgs kwargs}, "requests": [{"prompt", "max_tokens",
"stop"}]}. OUT: one {"token_ids", "logprobs", "text"} per request, greedy.
"""

from __future__ import annotations

import json
import sys


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(spec_path) as f:
        spec = json.load(f)
    llm = LLM(model=spec["model"], **spec["engine"])
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=r["max_tokens"],
            stop=r.get("stop") or None,
            logprobs=1,
        )
        for r in spec["requests"]
    ]
    outputs = llm.generate([r["prompt"] for r in spec["requests"]], params)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        results.append(
            {
                "token_ids": list(completion.token_ids),
                "logprobs": [
                    step[token].logprob
                    for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
                ],
                "text": completion.text,
            }
        )
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
