"""The package's import structure, checked from the source (every import, lazy ones inside functions too).

Layers, lowest first (README, "Layout"): a module may import its own layer or lower ones, never a higher
one, and no import loop may form. `mage/` is self-contained: it imports only itself and the foundation.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mage_bench"

# Longest matching prefix decides a module's layer.
LAYERS = {
    "mage_bench": 0, "mage_bench.errors": 0, "mage_bench.registry": 0, "mage_bench.schema": 0,
    "mage_bench.metrics": 0, "mage_bench.io": 0, "mage_bench.schedule": 0, "mage_bench.threads": 0,
    "mage_bench.mage": 1, "mage_bench.cards": 1,
    "mage_bench.config": 2, "mage_bench.tokenizer": 2, "mage_bench.data": 2,
    # the trainers (MAGE's and the tokenizer's) share one skeleton, `training`
    "mage_bench.runs": 3, "mage_bench.results": 3, "mage_bench.samples": 3, "mage_bench.train": 3,
    "mage_bench.training": 3, "mage_bench.tokenizer.train": 3, "mage_bench.inpainting": 3,
    "mage_bench.import_mage": 3, "mage_bench.bench": 3, "mage_bench.token_cache": 3,
    "mage_bench.eval": 3, "mage_bench.proxies": 3,  # eval: a peer of train (ARCHITECTURE.md)
    "mage_bench.confounds": 5, "mage_bench.sweep_spec": 5, "mage_bench.run_job": 5, "mage_bench.bench_eval": 5,
    "mage_bench.device_check": 5,
    "mage_bench.executors": 6, "mage_bench.report": 6,
    "mage_bench.sweep": 7,
    "mage_bench.cli": 8,
}
FOUNDATION = ("mage_bench.errors", "mage_bench.registry", "mage_bench.schema")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + [node.module] if node.module else base) if node.level else node.module
                targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_every_module_has_a_layer():
    assert all(any(m == p or m.startswith(p + ".") for p in LAYERS) for m in _modules())


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m)]
    assert upward == []


def test_no_import_cycle():
    graph, seen, cycles = _graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        seen[module] = "open"
        for target in sorted(graph[module]):
            if seen.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in seen:
                visit(target, path + [target])
        seen[module] = "done"

    for module in sorted(_modules()):
        if module not in seen:
            visit(module, [module])
    assert cycles == []


def test_the_model_package_imports_nothing_above_it():
    outside = {t for m, targets in _graph().items() if m.startswith("mage_bench.mage")
               for t in targets if not t.startswith(("mage_bench.mage", *FOUNDATION))}
    assert outside == set()
