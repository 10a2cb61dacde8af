"""``molink COMMAND [ARGS...]``: MoLink's command-line tools under one name.

* ``molink serve ...``: run a node (the OpenAI server on the head); the same flags as
  ``python -m molink.entrypoints.openai.api_server``.
* ``molink status --initial_peer HOST:PORT``: the swarm as a table.
* ``molink keygen PATH``: make a swarm key (``--node``: a node key).
* ``molink split-plan --model M --nodes N``: ``--serving_layers`` for stages of equal decode time.
* ``molink demo-model``: build the demo checkpoint and print its path.

``molink COMMAND --help`` lists a command's flags.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _serve(argv: list[str], prog: str) -> int:
    from molink.entrypoints.openai.api_server import main

    main(argv, prog)
    return 0


def _status(argv: list[str], prog: str) -> int:
    from molink.entrypoints.cli.status import main

    return main(argv, prog)


def _router(argv: list[str], prog: str) -> int:
    from molink.entrypoints.router.__main__ import main

    return main(argv, prog)


def _keygen(argv: list[str], prog: str) -> int:
    from molink.entrypoints.cli.keygen import main

    return main(argv, prog)


def _split_plan(argv: list[str], prog: str) -> int:
    from molink.entrypoints.cli.split_plan import main

    return main(argv, prog)


def _demo_model(argv: list[str], prog: str) -> int:
    from molink.entrypoints.cli.demo_model import main

    return main(argv, prog)


#: command -> (runner taking the remaining arguments and a prog name, one-line summary)
COMMANDS: dict[str, tuple[Callable[[list[str], str], int], str]] = {
    "serve": (_serve, "run a node: the OpenAI API server on the head, a stage elsewhere"),
    "router": (_router, "one OpenAI endpoint in front of every head of the swarm"),
    "status": (_status, "the swarm as a table, from any machine"),
    "keygen": (_keygen, "make a swarm key (or, with --node, a node key)"),
    "split-plan": (_split_plan, "--serving_layers for stages of equal decode time"),
    "demo-model": (_demo_model, "build the demo checkpoint and print its path"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: molink {" + ",".join(COMMANDS) + "} [ARGS...]",
        "",
        "MoLink: serve one LLM split across several machines.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        "`molink COMMAND --help` lists a command's flags.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        import molink

        sys.stdout.write(f"molink {molink.__version__}\n")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(usage() + f"\nmolink: error: unknown command {command!r}\n")
        return 2
    run, _ = COMMANDS[command]
    return run(rest, f"molink {command}")


if __name__ == "__main__":
    sys.exit(main())
