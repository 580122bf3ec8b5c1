"""The package's import structure: no cycles inside vidtron/, and imports point down the layers.

    launch -> recipes / tools -> platform -> models -> parallel -> kernels -> errors

Every `import` / `from ... import` in vidtron/*.py counts, including those inside functions (a lazy import is still a
dependency). A module may import its own layer or any layer below; `platform` never imports `recipes`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "vidtron"
LAYERS = {
    "errors": 0,
    "kernels": 1,
    "parallel": 2,
    "models": 3,
    "platform": 4,
    "recipes": 5,
    "tools": 5,
    "testing": 5,
    "launch": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """vidtron modules that `path` imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("vidtron."):
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between a package's __init__ and its own modules are Python's normal re-exports: not counted."""
    found = []
    for comp in cycles(graph):
        inits = {m for m in comp if (ROOT.parent / m.replace(".", "/") / "__init__.py").exists()}
        rest = set(comp) - inits
        if not all(any(m.startswith(i + ".") for i in inits) for m in rest) or len(inits) != 1:
            found.append(comp)
    return found


def test_every_subpackage_has_a_layer():
    unknown = {m.split(".")[1] for m in modules() if m.count(".") >= 1 and layer(m) is None}
    assert not unknown, f"give these packages a layer in LAYERS: {sorted(unknown)}"


def test_no_import_cycles():
    found = package_cycles(import_graph())
    assert not found, "import cycles inside vidtron/: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_point_down_the_layers():
    graph = import_graph()
    up = sorted(
        f"{m} -> {dep}"
        for m, deps in graph.items()
        for dep in deps
        if layer(m) is not None and layer(dep) is not None and layer(dep) > layer(m)
    )
    assert not up, "imports that point up the layers:\n" + "\n".join(up)


def test_platform_imports_nothing_from_recipes():
    graph = import_graph()
    bad = sorted(f"{m} -> {d}" for m, ds in graph.items() if ".platform" in m for d in ds if ".recipes" in d)
    assert not bad, bad


def test_parallel_names_no_model_attribute():
    """Mechanisms only: the DiT's block and layer names live in vidtron/models/dit/sharding.py."""
    names = ("double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "text_refiner", "final_layer")
    hits = [
        f"{p.relative_to(ROOT.parent)}: {n}"
        for p in (ROOT / "parallel").rglob("*.py")
        for n in names
        if n in p.read_text().replace(f"`{n}`", "")
    ]
    assert not hits, hits


@pytest.mark.parametrize("sample", [("vidtron.platform.trainer", "vidtron.recipes.registry")])
def test_the_checker_sees_an_upward_import(sample, tmp_path):
    """The layer rule is live: a platform module importing a recipe module would be flagged."""
    low, high = sample
    assert layer(high) > layer(low)
    fake = tmp_path / "m.py"
    fake.write_text(f"def f():\n    import {high}\n")
    assert high in imports_of(fake, set(modules()))
