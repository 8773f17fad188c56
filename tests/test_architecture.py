"""Where code lives: the library (models, sampling, search, rl, data, checkpointing, sharding)
never imports a command-line module, the package has no import cycle between modules, and no
function is too long to read."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "zsjax")
LIBRARY = ("models", "sampling", "search", "rl", "data", "checkpointing.py", "sharding.py",
           "errors.py")
MAX_FUNCTION_LINES = 120
CLI = ("zsjax.cli", "zsjax.generate", "zsjax.evaluate", "zsjax.infer", "zsjax.train",
       "zsjax.sft", "zsjax.tools")


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)
                name = "zsjax." + rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                yield rel, name, path


def _imports(path):
    """Every zsjax module a file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("zsjax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zsjax"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("rel,name,path", [m for m in _modules()
                                           if m[0].split(os.sep)[0] in LIBRARY])
def test_library_modules_import_no_command_line_module(rel, name, path):
    bad = sorted(m for m in _imports(path) if any(m == c or m.startswith(c + ".") for c in CLI))
    assert not bad, f"{rel} imports {bad}"


def test_no_import_cycle_between_modules():
    modules = {name: path for _, name, path in _modules()}
    graph = {name: {m for m in _imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of ideas
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".")
                                                      and modules[m].endswith("__init__.py"))}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_function_is_longer_than_the_limit():
    long = []
    for rel, _, path in _modules():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"split these functions (limit {MAX_FUNCTION_LINES} lines): {long}"
