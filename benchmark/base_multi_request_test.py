"""A burst of N concurrent requests, timed over several rounds (MoLink's classic load test).

    python -m benchmark.base_multi_request_test --model smollm2 --num-requests 32 --rounds 3
Each round sends all requests at once and waits for all; reports the per-round figures and the
median over rounds. A warm-up round is run first and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from benchmark.loadgen import add_common_args, make_prompts, run_load, write_result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.base_multi_request_test", description=__doc__
    )
    add_common_args(parser)
    parser.add_argument("--num-requests", type=int, default=32, help="requests per burst")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up round")
    args = parser.parse_args()

    prompts = make_prompts(args.num_requests, args.input_len, args.vocab_range, args.seed)
    if not args.no_warmup:
        asyncio.run(run_load(args.base_url, args.model, prompts[:2], 8, progress=False))
    rounds = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}", file=sys.stderr)
        rounds.append(
            asyncio.run(
                run_load(args.base_url, args.model, prompts, args.output_len, timeout=args.timeout)
            )
        )
    result = {
        "median_output_throughput_tok_s": statistics.median(
            r["output_throughput_tok_s"] for r in rounds
        ),
        "median_duration_s": statistics.median(r["duration_s"] for r in rounds),
        "failed": sum(r["failed"] for r in rounds),
        "rounds": rounds,
    }
    write_result(args, result)


if __name__ == "__main__":
    main()
