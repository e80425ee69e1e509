"""Layers point one way (docs/design.md, "Layers"): library <- application <- entry points; no import cycle.

The import graph is read from the source (``ast``): every ``import`` / ``from ... import`` of an ``moe_ep``
module, at any depth of the file (lazy imports inside functions count). A module may import modules of its
own level or below; the library imports no application module; no module reaches itself again.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LIBRARY = 0
# Application levels, lowest first; a module may import its own level and below.
LEVELS = {"moe_ep.data": 1, "moe_ep.models": 2, "moe_ep.interop": 3, "moe_ep.hf_model": 3,
          "moe_ep.integrations": 3, "moe_ep.training": 4, "moe_ep.distill": 5}
ENTRY = 9  # ``python -m`` entry points sit above the application, as the launchers do


def _sources() -> dict[str, pathlib.Path]:
    """Module name -> file, for moe_ep/ and the top-level kernels/ folder (installed as moe_ep.kernels)."""
    out = {}
    for base, package in ((ROOT / "moe_ep", "moe_ep"), (ROOT / "kernels", "moe_ep.kernels")):
        for path in base.rglob("*.py"):
            if "kernels" in path.relative_to(base).parts[:1] and package == "moe_ep":
                continue  # the moe_ep/kernels link: read once, through kernels/
            parts = list(path.relative_to(base).with_suffix("").parts)
            name = ".".join([package] + parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _level(module: str) -> int:
    if module.endswith(".__main__"):
        return ENTRY
    for prefix, level in LEVELS.items():
        if module == prefix or module.startswith(prefix + "."):
            return level
    return LIBRARY


def _imports(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The moe_ep modules ``module`` imports (for ``from pkg import name``: the submodule when ``name`` is one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(n for n in names if n in known)
            if target in known and not any(n in known for n in names):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
    return found - {module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = _sources()
    return {module: _imports(module, path, set(sources)) for module, path in sources.items()}


def test_no_module_imports_a_higher_layer(graph):
    upward = sorted(f"{m} ({_level(m)}) imports {d} ({_level(d)})" for m, deps in graph.items() for d in deps
                    if _level(d) > _level(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycle(graph):
    """Tarjan's strongly connected components of the module graph: each must be a single module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_is_read(graph):
    """The checks above see real edges (a regression in the reader would make them pass vacuously)."""
    assert "moe_ep.dispatch" in graph["moe_ep.layer"] and "moe_ep.dispatch.dispatcher" in graph["moe_ep.dispatch"]
    assert "moe_ep.kernels.grouped_mm" in graph["moe_ep.expert_backend"]
    assert "moe_ep.training.driver" in graph["moe_ep.training.plain"]
    assert _level("moe_ep.checkpoint.save_load") == LIBRARY and _level("moe_ep.training.checkpoints") == 4


def test_import_moe_ep_needs_only_torch():
    """``import moe_ep`` (the layer library) imports none of the training application's packages beyond what
    ``import torch`` itself imports (torch.hub brings tqdm along when it is installed)."""
    code = ("import sys, torch\n"
            "before = set(sys.modules)\n"
            "import moe_ep\n"
            "heavy = {'matplotlib', 'tqdm', 'deepspeed', 'transformers', 'triton', 'tensorboard'}\n"
            "print(sorted(heavy & {name.split('.')[0] for name in set(sys.modules) - before}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
