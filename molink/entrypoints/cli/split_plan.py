"""``molink split-plan --model M --nodes N``: the ``--serving_layers`` of each node for stages of
equal decode time (the cost model is :mod:`molink.core.split_plan`).

Also runnable as ``python -m molink.entrypoints.cli.split_plan``.
"""

from __future__ import annotations

import argparse
import sys

from molink.core.split_plan import LAYER_OVERHEAD_PARAMS, decode_costs, plan


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m molink.entrypoints.cli.split_plan",
        description="Print the --serving_layers of each node for stages of equal decode time.",
    )
    parser.add_argument("--model", required=True, help="local checkpoint folder or Hub id")
    parser.add_argument("--nodes", type=int, required=True, help="pipeline stages")
    parser.add_argument(
        "--layer-overhead",
        type=float,
        default=LAYER_OVERHEAD_PARAMS,
        help="parameter-equivalents of a layer's non-GEMM work (default %(default).3g)",
    )
    args = parser.parse_args(argv)
    try:
        costs = decode_costs(args.model, args.layer_overhead)
        spans = plan(costs, args.nodes)
    except ValueError as e:
        parser.error(str(e))
    total = costs.stage(0, len(costs.layers) - 1, last=True)
    for i, (start, end) in enumerate(spans):
        share = costs.stage(start, end, last=i == len(spans) - 1) / total
        role = "head" if i == 0 else f"node {i}"
        sys.stdout.write(
            f"{role:<8} --serving_layers {start},{end}   "
            f"({end - start + 1} layers, {share:.0%} of a decode step)\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
