"""The layering contract (docs/design.md, "Layers"), checked on the source tree with ``ast``.

import-linter cannot follow setuptools ``package-dir`` mappings (``adapters/`` installs as
``namm_transfer.adapters``), so the contract is checked here, transitively over project modules:
- the core (``namm_transfer/``) imports none of transformers, gymnasium, minari, decord, nor the
  outer layers;
- ``envs`` does not import ``adapters``;
- nothing below ``pipelines`` imports ``pipelines``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"namm_transfer": "core", "adapters": "adapters", "envs": "envs", "pipelines": "pipelines"}
MODEL_LIBS = {"transformers", "gymnasium", "minari", "decord"}
FORBIDDEN = {
    "core": MODEL_LIBS | {"namm_transfer.adapters", "namm_transfer.envs", "namm_transfer.pipelines"},
    "envs": {"namm_transfer.adapters", "namm_transfer.pipelines"},
    "adapters": {"namm_transfer.pipelines", "namm_transfer.envs"},
    "pipelines": set(),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] != "namm_transfer":
        parts.insert(0, "namm_transfer")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return LAYERS.get(parts[1], "core") if len(parts) > 1 else "core"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    graph = {}
    for folder in LAYERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            graph[module_name(path)] = imports_of(path)
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module in graph:
        forbidden = FORBIDDEN[layer_of(module)]
        seen, stack, chain = set(), [module], {module: [module]}
        while stack:
            current = stack.pop()
            for target in graph.get(current, ()):
                hit = next((f for f in forbidden if target == f or target.startswith(f + ".")), None)
                if hit:
                    found.append(" -> ".join(chain[current] + [target]))
                internal = target if target in graph else target.rsplit(".", 1)[0]
                if internal in graph and internal not in seen:
                    seen.add(internal)
                    chain[internal] = chain[current] + [internal]
                    stack.append(internal)
    return sorted(set(found))


def test_layering_contract_holds():
    graph = project_graph()
    assert "namm_transfer.adapters.attach" in graph and "namm_transfer.namm" in graph
    assert violations(graph) == []


@pytest.mark.parametrize(
    ("module", "target"),
    [("namm_transfer.features", "transformers"), ("namm_transfer.envs.x", "namm_transfer.adapters.attach")],
)
def test_checker_catches_a_violation(module, target):
    graph = {module: {target}}
    assert violations(graph) == [f"{module} -> {target}"]


def test_checker_follows_transitive_imports():
    graph = {"namm_transfer.a": {"namm_transfer.b"}, "namm_transfer.b": {"decord"}}
    assert "namm_transfer.a -> namm_transfer.b -> decord" in violations(graph)
