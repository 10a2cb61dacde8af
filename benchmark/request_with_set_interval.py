"""Send requests at a fixed interval, whatever the server's speed (MoLink's classic interval test).

    python -m benchmark.request_with_set_interval --model smollm2 --num-requests 20 --interval 0.5
Reports throughput and TTFT/TPOT/ITL/end-to-end percentiles over all requests.
"""

from __future__ import annotations

import argparse
import asyncio

from benchmark.loadgen import add_common_args, make_prompts, run_load, write_result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.request_with_set_interval", description=__doc__
    )
    add_common_args(parser)
    parser.add_argument("--num-requests", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between requests")
    args = parser.parse_args()

    prompts = make_prompts(args.num_requests, args.input_len, args.vocab_range, args.seed)
    result = asyncio.run(
        run_load(
            args.base_url,
            args.model,
            prompts,
            args.output_len,
            request_rate=None,
            interval=args.interval,
            timeout=args.timeout,
        )
    )
    write_result(args, result)


if __name__ == "__main__":
    main()
