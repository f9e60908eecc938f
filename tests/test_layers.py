"""The package's shape: every import (at module level or inside a function) points down the
layer table below or stays within its layer, no modules import each other in a circle, and the
planner is pure arithmetic. Read from the source with ast; nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "step_gguf"

# the package's folders, bottom to top: a module imports only its own folder and those below
LAYERS = ["core", "files", "synth", "native", "pipeline", "plan", "runtime", "cli"]


def layer_of(module: str) -> int:
    """A module's rank is its folder's; the package's own __init__ (the version) is the bottom."""
    return LAYERS.index(module.split(".")[0]) if "." in module else 0


# what the planner's modules, and everything they import, may not touch: files, processes,
# sockets, native code, or readers of model files
IMPURE = {"os", "pathlib", "io", "shutil", "tempfile", "glob", "mmap", "ctypes", "subprocess",
          "socket", "urllib", "importlib", "gguf", "numpy", "safetensors", "llama_cpp", "yaml"}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(step_gguf modules, other top-level modules) that `name` imports anywhere in its source;
    `from . import x` counts x when x is a module."""
    package = name.split(".")[:-1]
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("step_gguf."):
                    ours.add(a.name.removeprefix("step_gguf."))
                else:
                    others.add(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("step_gguf"):
                others.add((node.module or "").split(".")[0])
                continue
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                target = node.module.removeprefix("step_gguf").removeprefix(".")
            for a in node.names:
                sub = f"{target}.{a.name}" if target else a.name
                if sub in known:
                    ours.add(sub)
                elif target in known:
                    ours.add(target)
                elif f"{target}.__init__" in known or not target:
                    ours.add(f"{target}.__init__" if target else "__init__")
    return ours - {name}, others


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    mods = _modules()
    known = set(mods) | {m.removesuffix(".__init__") for m in mods if m.endswith(".__init__")}
    alias = {m.removesuffix(".__init__"): m for m in mods if m.endswith(".__init__")}
    out = {}
    for name, path in mods.items():
        ours, others = _imports(name, path, known)
        out[name] = ({alias.get(m, m) for m in ours}, others)
    return out


def test_every_module_lives_in_a_layer_folder(graph):
    """`ls step_gguf` shows the architecture: no module outside the layer folders."""
    loose = [m for m in graph if m != "__init__" and m.split(".")[0] not in LAYERS]
    assert not loose, f"{loose}: move them into a folder of LAYERS"


def test_imports_point_down(graph):
    upward = [f"{a} imports {b}" for a, (ours, _) in graph.items() for b in ours if layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_no_import_cycle(graph):
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, (set(), set()))[0]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail(" -> ".join(cycle))


def test_the_planner_opens_no_file_and_loads_no_native_code(graph):
    planner = {m for m in graph if m.startswith("plan.")}
    reach, todo = set(), list(planner)
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo += graph[m][0]
    assert reach - planner <= {"core.errors", "core.model_facts", "core.gguf_names", "core.units"}, reach - planner
    for m in reach:
        assert not graph[m][1] & IMPURE, (m, graph[m][1] & IMPURE)
        tree = ast.parse((PACKAGE / (m.replace(".", "/") + ".py")).read_text())
        assert not any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "open"
                       for n in ast.walk(tree)), m


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    """The walk itself: a module that imports the CLI from a function is caught."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from .cli import main\n    from . import plan\n")
    ours, _ = _imports("errors", fake, {"cli", "plan", "plan.__init__"})
    assert ours == {"cli", "plan"}


def test_modules_and_functions_stay_small():
    """A module that outgrows ~400 lines, or a function ~60, is doing more than one job."""
    big = []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            big.append(f"{name}: {len(text.splitlines())} lines")
        big += [f"{name}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(ast.parse(text))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 60]
    assert not big, big


def _readme_layers() -> dict[str, set[str]]:
    """README's Layout table: folder -> the modules its row names."""
    text = (PACKAGE.parent / "README.md").read_text()
    rows: dict[str, set[str]] = {}
    for line in text[text.index("## Layout"):].splitlines():
        if m := re.match(r"\| `(\w+)/` \| (.+?) \| ", line):
            rows[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    return rows


def test_readme_draws_the_layer_folders():
    readme = _readme_layers()
    assert list(readme) == LAYERS
    for folder in LAYERS:
        on_disk = {p.stem for p in (PACKAGE / folder).glob("*.py")} - {"__init__", "__main__"}
        assert readme[folder] == on_disk, folder
