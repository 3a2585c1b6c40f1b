"""bench/ is framework-free: it imports, validates grids and lists cells with torch,
tensorflow and Ray blocked (Ray is the optional extra of --ray only); and the module-level
imports of bench/ and strategies/ form no cycle, counting the imports inside functions too."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from bench.paths import ROOT

FRAMEWORKS = ("torch", "torchvision", "tensorflow", "keras")


def blocking(*also: str) -> str:
    """Code that makes importing the frameworks (and `also`) fail, to run first in a fresh
    interpreter."""
    return f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {FRAMEWORKS + also!r}:
            raise ImportError(f'{{name}} is blocked in this test')
sys.meta_path.insert(0, Block())
"""


BLOCK = blocking("ray")


def test_bench_imports_with_frameworks_blocked():
    code = BLOCK + """
import bench, bench.config.spec, bench.config.grid, bench.run.runner, bench.tracking
import bench.report.build, bench.cli, bench.checkpoints, bench.run.publish
import bench.cell.timing, bench.cell.process, bench.data, bench.cell.loop, bench.data.batching
import bench.run.pool, bench.run.execute, bench.run.claims, bench.run.progress
import bench.run.cluster, bench.run.sizing, strategies
import strategies.registry
import strategies.backbones
g = bench.config.grid.load('default')
assert g.specs
assert bench.cli.main(['run', 'default', '--dry-run']) == 0
assert bench.cli.main(['run', 'default', '--dry-run', '--parallel', '2']) == 0
for m in ('torch', 'tensorflow', 'keras', 'ray'):
    assert m not in sys.modules, m
print('ok', len(g.specs))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_block_really_blocks():
    out = subprocess.run([sys.executable, "-c", BLOCK + "import torch"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "blocked" in out.stderr


# ---- the import graph is a tree: no module imports one that imports it back -----------------
def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("bench", "strategies"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path],
             inside_functions: bool = False) -> set[str]:
    """The modules of bench/ and strategies/ that `name` imports at module level, and with
    `inside_functions` in its functions too (those keep a framework or MLflow lazy, and
    must not hide a cycle either)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if inside_functions else tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the package `name` lives in (or is)
                pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                module = ".".join(p for p in (pkg, module) if p)
            # `from bench import spec` imports the module bench.config.spec, not just bench
            found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                      for a in node.names}
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as [a, b, ..., a], or None."""
    done, path = set(), []

    def visit(m: str) -> list[str] | None:
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if n in path:
                return path[path.index(n):] + [n]
            if n not in done and (found := visit(n)):
                return found
        path.pop()
        done.add(m)
        return None

    for m in sorted(graph):
        if m not in done and (found := visit(m)):
            return found
    return None


def test_cycle_finder_names_the_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("inside_functions", [False, True], ids=["module-level", "all"])
def test_imports_form_no_cycle(inside_functions):
    modules = _modules()
    graph = {m: _imports(m, p, modules, inside_functions) for m, p in modules.items()}
    # the graph is read
    assert "bench.config.selector" in graph["bench.config.pretrained"]
    assert "bench.report.tables" in graph["bench.report.figures"]
    # a function-level import is seen only when asked for
    assert ("bench.run.cluster" in graph["bench.run.plan"]) == inside_functions
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
