"""``molink keygen PATH``: make a new swarm key (or, with ``--node``, a node key).

Copy the swarm key to every node of the swarm over a channel you trust (scp, a secrets manager)
and start each node with ``--swarm-key-file PATH``. A node key (``--node PATH``) is one node's own
identity; its node id (logged here) is what goes into another node's ``--allowed-nodes-file``.
Also runnable as ``python -m molink.entrypoints.cli.keygen``.
"""

from __future__ import annotations

import argparse
import sys

from vllm.logger import configure_logging_from_args, init_logger

from molink.security.node_key import NodeKey
from molink.security.swarm_key import generate_swarm_key

logger = init_logger("molink.entrypoints.cli.keygen")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m molink.entrypoints.cli.keygen",
        description=__doc__,
    )
    parser.add_argument("path", help="file to create (mode 0600; never overwritten)")
    parser.add_argument(
        "--node", action="store_true", help="make a node key instead of a swarm key"
    )
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    try:
        if args.node:
            key = NodeKey.load_or_create(args.path)
            logger.info("Node key in %s; node id %s", args.path, key.node_id)
        else:
            swarm_key = generate_swarm_key(args.path)
            logger.info(
                "New swarm key in %s (fingerprint %s). Copy it to every node and start them "
                "with --swarm-key-file %s",
                args.path,
                swarm_key.fingerprint,
                args.path,
            )
    except FileExistsError:
        logger.error("%s exists; not overwriting it", args.path)
        return 1
    except (OSError, ValueError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
