"""The package's shape: every import (at module level or inside a function) points down the
layer table below or stays within its layer, no modules import each other in a circle, and the
planner is pure arithmetic. Read from the source with ast; nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "step_gguf"

# bottom to top; a module may import its own layer and the ones below
LAYERS: list[tuple[str, set[str]]] = [
    ("facts", {"__init__", "errors", "layout", "model", "gguf_names", "model_facts", "recipe", "probe", "units",
               "choices", "synth_presets"}),
    ("files", {"source_path", "checkpoint", "gguf_source", "vocab", "imatrix", "resume", "model_card",
               "draft", "synth", "synth_script", "synth_tokenizer"}),
    ("native", {"runtime.process", "runtime.page", "runtime.cpu", "runtime.glslc_cache", "runtime.build",
                "runtime.installed",
                "runtime.ggml", "runtime.propagation", "runtime.tools"}),
    ("pipeline", {"tensor_plan", "tensor_data", "output", "convert", "sensitivity", "equalize",
                  "budget", "quantize_options", "quantize", "facts"}),
    ("planner", {"plan.__init__", "plan.machines", "plan.memory", "plan.result", "plan.speed",
                 "plan.placement"}),
    ("runtime", {"runtime.devices", "runtime.rpc", "runtime.llama", "runtime.server", "runtime.loadlog"}),
    ("cli", {"cli.__init__", "cli.__main__", "cli.progress", "cli.files", "cli.measure",
             "cli.runtime", "cli.serving", "cli.foreground", "cli.demo"}),
]
LAYER_OF = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
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


def test_every_module_has_a_layer(graph):
    assert set(graph) - {"patches.__init__"} == set(LAYER_OF), "add new modules to LAYERS"


def test_imports_point_down(graph):
    upward = [f"{a} ({LAYERS[LAYER_OF[a]][0]}) imports {b} ({LAYERS[LAYER_OF[b]][0]})"
              for a, (ours, _) in graph.items() if a in LAYER_OF
              for b in ours if b in LAYER_OF and LAYER_OF[b] > LAYER_OF[a]]
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
    assert reach - planner <= {"errors", "model_facts", "gguf_names"}, reach - planner
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
    """README's Layout table: layer -> the modules its row names (`runtime/x` is runtime.x; a row
    `plan/` (`a`, `b`) names plan.a and plan.b)."""
    text = (PACKAGE.parent / "README.md").read_text()
    rows: dict[str, set[str]] = {}
    for line in text[text.index("## Layout"):].splitlines():
        m = re.match(r"\| (\w+) \| (.+?) \| ", line)
        if not m or m.group(1) == "layer":
            continue
        folder = re.match(r"`(\w+)/` \((.+)\)", m.group(2))
        rows[m.group(1)] = ({f"{folder.group(1)}.{n}" for n in re.findall(r"`(\w+)`", folder.group(2))} if folder
                            else {n.replace("/", ".") for n in re.findall(r"`([\w/]+)`", m.group(2))})
    return rows


def test_readme_draws_the_layers_this_test_checks():
    readme = _readme_layers()
    assert list(readme) == [name for name, _ in LAYERS]
    for name, mods in LAYERS:
        assert readme[name] == {m for m in mods if not m.endswith(("__init__", "__main__"))}, name

