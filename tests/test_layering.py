"""No module of ``molink`` imports from a higher layer.

:data:`LAYERS` is the one place the layering is written down (lowest first); the docs repeat it.
Every module under ``molink/`` is parsed with :mod:`ast` (imports inside functions and
``TYPE_CHECKING`` blocks count too, and so do dotted ``"molink.x.y"`` strings, which vLLM and
``importlib`` import by name) and each ``molink.*`` name it uses is mapped to its layer by the
longest matching prefix. An import from the same layer or a lower one is fine.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "molink"

#: The layers, lowest first; a module may import only from its own layer or lower ones.
LAYERS: tuple[tuple[str, ...], ...] = (
    # 0. Plain data, settings and instruments, used by everything above.
    (
        "molink",  # the package's __init__ alone: version, log forwarding
        "molink.config",
        "molink.flag_values",
        "molink.stage_spec",
        "molink.security",
        "molink.weight_digest",
        "molink.model_identity",
        "molink.demo_model",  # builds the demo checkpoint (its CLI is entrypoints.cli.demo_model)
        "molink.telemetry",
        "molink.vllm_compat",  # every vLLM internal MoLink relies on (docs/upgrading-vllm.md)
    ),
    # 1. Pure policy (scheduling, spans, sessions) and the per-stage parallel state.
    ("molink.core", "molink.distributed"),
    # 2. Talking to other nodes: DHT, gRPC service and links, wire codec, chains.
    ("molink.comm",),
    # 3. The vLLM worker that computes a stage's layers.
    ("molink.worker",),
    # 4. A stage's engine and host, the head's pipeline config.
    ("molink.engine",),
    # 5. The head's vLLM executor that drives the chain.
    ("molink.executor",),
    # 6. Node start-up, HTTP servers and command-line tools.
    ("molink.entrypoints",),
)

#: Top-level names no module of the package may import: the test and benchmark trees (whose
#: scripts import each other by file name, e.g. ``from swarm import Swarm``).
FORBIDDEN_ROOTS = frozenset(
    {"tests", "benchmark", "conftest"}
    | {p.stem for p in (ROOT / "tests").glob("*.py")}
    | {p.stem for p in (ROOT / "benchmark").glob("*.py")}
)

_DOTTED = re.compile(r"molink(\.[A-Za-z_]\w*)+")


def layer_of(name: str) -> int | None:
    """The layer of module ``name`` (longest prefix in :data:`LAYERS`); None if unlisted."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for layer, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # the root package holds only itself: a new top-level module needs a layer too
            inside = prefix != "molink" and name.startswith(prefix + ".")
            if (name == prefix or inside) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (they may name any module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def imported_names(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module name) for every import in the module at ``path``."""
    yield from imports_in(
        path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py"
    )


def imports_in(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, module name) for every import in ``source`` (the text of ``module``), at any
    depth, and every dotted ``molink.*`` string outside docstrings."""
    tree = ast.parse(source, module)
    package = module.split(".") if is_package else module.split(".")[:-1]
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            yield node.lineno, name
            # ``from molink.comm import codec`` imports the module molink.comm.codec
            for alias in node.names:
                yield node.lineno, f"{name}.{alias.name}"
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and _DOTTED.fullmatch(node.value)
        ):
            yield node.lineno, node.value


def test_every_module_has_a_layer() -> None:
    unlisted = [
        str(p.relative_to(ROOT)) for p in package_modules() if layer_of(module_name(p)) is None
    ]
    assert not unlisted, f"add these modules to a layer in tests/test_layering.py: {unlisted}"


def test_no_module_imports_from_a_higher_layer() -> None:
    problems: dict[tuple[str, int], str] = {}  # the shortest offending name per line
    for path in package_modules():
        own = layer_of(module_name(path))
        assert own is not None
        where = str(path.relative_to(ROOT))
        for line, name in imported_names(path):
            layer = layer_of(name) if name.split(".")[0] == "molink" else None
            if layer is None or layer <= own:
                continue
            seen = problems.get((where, line))
            if seen is None or len(name) < len(seen.split()[2]):
                problems[where, line] = f"{where} imports {name} (layer {layer} > {own})"
    report = [problems[key] + f" [line {key[1]}]" for key in sorted(problems)]
    assert not report, "imports from a higher layer:\n" + "\n".join(report)


def test_no_module_imports_tests_or_benchmarks() -> None:
    problems = []
    for path in package_modules():
        for line, name in imported_names(path):
            if name.split(".")[0] in FORBIDDEN_ROOTS:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_the_checker_sees_every_kind_of_import() -> None:
    """Relative, nested and by-name imports are found; docstrings are not imports."""
    source = (
        '"""molink.entrypoints.node in a docstring is no import."""\n'
        "from . import codec\n"
        "def f():\n"
        "    from ..executor.pipeline_executor import PipelineExecutor\n"
        "    import molink.engine.stage_host\n"
        "    return 'molink.worker.stage_worker.StageWorker'\n"
    )
    names = {name for _, name in imports_in(source, "molink.comm.example", False)}
    assert "molink.comm.codec" in names
    assert "molink.executor.pipeline_executor" in names
    assert "molink.engine.stage_host" in names
    assert "molink.worker.stage_worker.StageWorker" in names
    assert "molink.entrypoints.node" not in names
    assert layer_of("molink.comm.example") == 2
    assert layer_of("molink.entrypoints.cli.main") == len(LAYERS) - 1
    assert layer_of("molink") == 0
    assert layer_of("molinkx") is None
    assert layer_of("molink.new_module") is None
    assert layer_of("vllm") is None
