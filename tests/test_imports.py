"""The package's import graph: no circles, and no arrow that DESIGN.md's dependency rules forbid.

The graph is read from the source with ``ast`` (nothing is imported), so it also sees the
imports inside functions (a lazy import is still an arrow). Modules are named as installed:
``python/flexiq_tvm/*`` -> ``flexiq_tvm.*``, ``schedules/*`` -> ``flexiq_tvm.schedules.*``,
``target/*`` -> ``flexiq_tvm.target.*`` (setup.py maps them so).

The rules (docs/architecture.md explains them):

* the runtime (what a loaded artifact runs) imports neither torch, calibration, selection,
  quantization, the zoo, the frontends, the passes, the kernels, nor the API / CLI;
* the integer oracle (``reference``) imports no TVM;
* passes are target-independent: they import neither kernels/schedules, targets, nor the
  runtime (the lowering takes its kernels as an argument);
* kernels and schedules never reach back into passes, and the CPU and CUDA schedules and the
  NPU target never import each other;
* lower layers never import the API, the CLI or the tools built on them.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "flexiq_tvm"
# source folder -> the dotted name it installs as
SOURCES = {ROOT / "python" / PACKAGE: PACKAGE, ROOT / "schedules": f"{PACKAGE}.schedules",
           ROOT / "target": f"{PACKAGE}.target"}

# the tools on top: they may import anything below them
TOP = {f"{PACKAGE}.{m}" for m in ("api", "cli", "demo", "bench", "eval", "tune", "finetune",
                                   "usermodel")}
TOP.add(PACKAGE)  # the package's __init__ re-exports the public API

# (who, what it must not import, why): prefixes of dotted module names
RULES = [
    (f"{PACKAGE}.runtime", ["torch", *(f"{PACKAGE}.{m}" for m in (
        "calibrate", "select", "quantize", "fakequant", "zoo", "frontend", "transform",
        "schedules", "target", "baselines"))],
     "the runtime runs a loaded artifact with TVM and numpy alone"),
    (f"{PACKAGE}.reference", ["tvm", "tvm_ffi"],
     "the integer oracle is the independent judge of every compiled path"),
    (f"{PACKAGE}.bitops", ["tvm", "tvm_ffi"], "part of the integer oracle"),
    (f"{PACKAGE}.transform", [f"{PACKAGE}.schedules", f"{PACKAGE}.target",
                              f"{PACKAGE}.runtime"],
     "passes are target-independent (kernels are passed in)"),
    (f"{PACKAGE}.schedules", [f"{PACKAGE}.transform", f"{PACKAGE}.target"],
     "kernels and schedules never reach back into passes or other targets"),
    (f"{PACKAGE}.schedules.llvm", [f"{PACKAGE}.schedules.cuda"], "targets are plug-ins"),
    (f"{PACKAGE}.schedules.cuda", [f"{PACKAGE}.schedules.llvm"], "targets are plug-ins"),
    (f"{PACKAGE}.target", [f"{PACKAGE}.schedules"], "targets are plug-ins"),
]


def module_files(sources: dict[Path, str]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the source folders."""
    out = {}
    for folder, dotted in sources.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((dotted, *rel))] = f
    return out


def import_graph(sources: dict[Path, str]) -> dict[str, set[str]]:
    """Module -> the modules it imports (inside the package: resolved to the deepest module
    that exists; outside: the top-level name, e.g. ``torch``)."""
    files = module_files(sources)
    packages = {m for m, f in files.items() if f.name == "__init__.py"}

    def inside(name: str) -> str:
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        base = mod if mod in packages else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    head = ".".join(parts[: len(parts) - node.level + 1])
                    src = f"{head}.{node.module}" if node.module else head
                else:
                    src = node.module or ""
                if src == "__future__":
                    continue
                # `from pkg import sub` names a submodule where one exists
                names = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src
                         for a in node.names]
            else:
                continue
            for n in names:
                if n == PACKAGE or n.startswith(PACKAGE + "."):
                    dep = inside(n)
                    if dep != mod:
                        deps.add(dep)
                else:
                    deps.add(n.split(".")[0])
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (strongly connected components of more than one module,
    each sorted), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow the rules forbid, as ``"a -> b (why)"``."""
    bad = []
    for mod, deps in sorted(graph.items()):
        for who, banned, why in RULES:
            if _under(mod, who):
                bad += [f"{mod} -> {d} ({why})" for d in sorted(deps)
                        if any(_under(d, b) for b in banned)]
        if mod not in TOP:  # lower layers never import the API or the CLI
            bad += [f"{mod} -> {d} (a lower layer imports the tools on top)"
                    for d in sorted(deps) if d in TOP]
    return bad


@pytest.fixture(scope="module")
def graph():
    return import_graph(SOURCES)


def test_graph_sees_the_package(graph):
    assert f"{PACKAGE}.runtime.module" in graph and f"{PACKAGE}.schedules.llvm.mixed" in graph
    assert f"{PACKAGE}.target.npu.codegen" in graph
    # a known arrow of each kind: relative, absolute, lazy (inside a function), external
    assert f"{PACKAGE}.runtime.artifact" in graph[f"{PACKAGE}.runtime.module"]
    assert f"{PACKAGE}.reference" in graph[f"{PACKAGE}.schedules.cuda.lower"]
    assert f"{PACKAGE}.quantize" in graph[f"{PACKAGE}.api"]
    assert "tvm" in graph[f"{PACKAGE}.runtime.module"]


def test_no_import_circles(graph):
    assert cycles(graph) == []


def test_no_forbidden_arrows(graph):
    assert forbidden_arrows(graph) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_the_checks_catch_a_circle_and_a_forbidden_arrow(tmp_path):
    """A toy package with a circle through a lazy import, a pass that imports a schedule and a
    runtime module that imports torch and the API: every one is reported."""
    _write(tmp_path / "pkg", {
        "__init__.py": "",
        "api.py": "from .runtime import module\n",
        "runtime/__init__.py": "",
        "runtime/module.py": "import torch\n\ndef f():\n    from ..api import compile\n",
        "transform/__init__.py": "",
        "transform/lower.py": "from ..schedules.llvm import KERNELS\n",
        "reference.py": "import numpy as np\n",
    })
    _write(tmp_path / "sched", {"__init__.py": "", "llvm/__init__.py": "KERNELS = {}\n"})
    g = import_graph({tmp_path / "pkg": PACKAGE, tmp_path / "sched": f"{PACKAGE}.schedules"})
    assert g[f"{PACKAGE}.transform.lower"] == {f"{PACKAGE}.schedules.llvm"}
    assert cycles(g) == [[f"{PACKAGE}.api", f"{PACKAGE}.runtime.module"]]
    bad = forbidden_arrows(g)
    assert f"{PACKAGE}.runtime.module -> torch (the runtime runs a loaded artifact with TVM " \
           "and numpy alone)" in bad
    assert any(b.startswith(f"{PACKAGE}.transform.lower -> {PACKAGE}.schedules.llvm")
               for b in bad)
    assert any(b.startswith(f"{PACKAGE}.runtime.module -> {PACKAGE}.api (a lower layer")
               for b in bad)
    assert len(bad) == 3
