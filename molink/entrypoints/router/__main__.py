"""``python -m molink.entrypoints.router --initial_peer HOST:PORT --port 8080``: the front door.

Also ``molink router ...``. See :mod:`molink.entrypoints.router`.
"""

from __future__ import annotations

import argparse
import os
import sys

from aiohttp import web
from vllm.logger import configure_logging_from_args, init_logger

from molink.comm.announcement import check_api_url
from molink.entrypoints import dump_stacks_on_sigusr1
from molink.security.settings import SecurityFiles, is_loopback
from molink.security.swarm_security import SwarmSecurity

logger = init_logger("molink.entrypoints.router")


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m molink.entrypoints.router",
        description="One OpenAI endpoint in front of every head of a MoLink swarm.",
    )
    parser.add_argument(
        "--initial-peer",
        "--initial_peer",
        dest="initial_peer",
        action="append",
        default=[],
        help="any node of the swarm: its gRPC HOST:PORT or a DHT multiaddr (repeatable); the "
        "router follows every head announced there",
    )
    parser.add_argument(
        "--head",
        action="append",
        default=[],
        help="a head's API base URL (http://HOST:PORT) to use besides those found (repeatable)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="key clients must send (Authorization: Bearer KEY); repeatable; default: "
        "$MOLINK_ROUTER_API_KEY, else none",
    )
    parser.add_argument(
        "--head-api-key-file",
        default=None,
        help="file holding the heads' --api-key, sent to them (default: $MOLINK_HEAD_API_KEY)",
    )
    parser.add_argument("--model", default=None, help="only heads serving this model name")
    parser.add_argument("--swarm-key-file", "--swarm_key_file", dest="swarm_key_file")
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between checks of the heads"
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=300.0,
        help="a head that sends nothing for this many seconds has failed the request",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to reach the swarm")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = make_parser(prog).parse_args(argv)
    configure_logging_from_args(args)
    dump_stacks_on_sigusr1()
    if not args.initial_peer and not args.head:
        logger.error("Name the swarm (--initial_peer HOST:PORT) or heads (--head URL)")
        return 2
    try:
        for url in args.head:
            check_api_url(url.rstrip("/"))
    except ValueError as e:
        logger.error("--head: %s", e)
        return 2
    keys = [k for k in (args.api_key or [os.environ.get("MOLINK_ROUTER_API_KEY", "")]) if k]
    head_key = os.environ.get("MOLINK_HEAD_API_KEY") or None
    if args.head_api_key_file:
        with open(args.head_api_key_file) as f:
            head_key = f.read().strip() or None
    if not keys and not is_loopback(args.host):
        logger.warning(
            "The router on port %d is open to anyone who reaches it; pass --api-key KEY to "
            "require a key",
            args.port,
        )

    from molink.entrypoints.router.heads import HeadDirectory
    from molink.entrypoints.router.proxy import Router

    membership = None
    if args.initial_peer:
        from molink.comm.bootstrap import resolve_initial_peers
        from molink.comm.membership import Membership

        try:
            security = SwarmSecurity.from_files(SecurityFiles(swarm_key_file=args.swarm_key_file))
            maddrs = resolve_initial_peers(tuple(args.initial_peer), args.timeout, security)
            membership = Membership(
                initial_peers=maddrs, host="127.0.0.1", client_mode=True, security=security
            )
        except Exception as e:  # noqa: BLE001  # bad key file, no answer, p2pd failure
            logger.error("Can't reach the swarm: %s", e)
            return 2
    try:
        directory = HeadDirectory(
            membership.nodes if membership else None,
            static_urls=args.head,
            model=args.model,
            headers={"Authorization": f"Bearer {head_key}"} if head_key else None,
            poll_s=args.poll_interval,
        )
        router = Router(directory, keys, head_key, args.read_timeout)
        router.url = f"http://{args.host}:{args.port}"
        logger.info("MoLink router on %s, following the swarm's heads", router.url)
        web.run_app(router.app(), host=args.host, port=args.port, print=None, access_log=None)
    finally:
        if membership is not None:
            membership.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
