"""The import structure: every stage's code deps in dvc.yaml are complete, the runtime stays below the
factory, pipeline_lib has no import cycle, and the registry and the OpenVINO helpers are leaves.

Imports are read from the source with `ast` (nothing is imported, except in the one test that checks
what importing the runtime loads). A module's imports are every ``import`` / ``from ... import`` in
it, at module level or inside functions (a lazy import runs when its function does), except inside a
package's module-level ``__getattr__``: that runs only when one of its lazy attributes is read, and
except under ``if TYPE_CHECKING:`` (its ``else`` branch counts): type checkers read it, Python never runs it.
Importing ``pipeline_lib.a.b`` also runs ``pipeline_lib/__init__.py`` and ``pipeline_lib/a/__init__.py``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline_lib"
# The params check: every stage reaches it through pipeline_lib.stage.load_params, and it imports the
# factory's modules to validate values (the thresholds' fields, quantize_onnx_int8's arguments, the
# checkpoint config). It decides whether a stage starts, not what the stage writes; DVC reruns a stage
# when its params change. So the deps check does not follow it, and stages need not list it.
PARAMS_CHECK = f"{PACKAGE}.config"
RUNTIME_MUST_NOT_LOAD = ("pipeline_lib.convert", "pipeline_lib.quantize_ort", "pipeline_lib.openvino_stateful", "torch")


def _file_of(module: str) -> Path | None:
    """The source file of a pipeline_lib module (or package), None for anything else."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = REPO_ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


@lru_cache(maxsize=None)
def _imports(path: Path, module_level: bool) -> frozenset[str]:
    """Every module name imported by the file (pipeline_lib's or not), resolved as far as the source
    shows: ``from pipeline_lib.a import b`` names pipeline_lib.a and, if it is a module, pipeline_lib.a.b."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = _module_of(path)
    return _tree_imports(tree, here if _is_package(path) else here.rpartition(".")[0], module_level)


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``: an ``if`` on it never runs its body."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING" and isinstance(test.value, ast.Name)
         and test.value.id == "typing")


def _tree_imports(tree: ast.Module, package: str, module_level: bool) -> frozenset[str]:
    """`_imports` of a parsed file in `package` (relative imports resolve against it)."""
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if module_level or (node is tree and child.name == "__getattr__"):
                    continue
                visit(child, True)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for branch in child.orelse:  # the body never runs
                    visit(ast.Module(body=[branch], type_ignores=[]), in_function)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.add(base)
                for a in child.names:
                    if _file_of(f"{base}.{a.name}") is not None:
                        found.add(f"{base}.{a.name}")
            else:
                visit(child, in_function)

    visit(tree, False)
    return frozenset(found)


def _executed(module: str) -> list[str]:
    """The pipeline_lib files that importing `module` runs: its ancestors' __init__.py and itself."""
    parts = module.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if _file_of(m) is not None]


def _closure(start: Path, module_level: bool = False, stop: tuple[str, ...] = ()) -> set[str]:
    """The pipeline_lib modules that running `start` may import, transitively (not following `stop`)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for name in _imports(todo.pop(), module_level):
            for module in _executed(name) if _file_of(name) is not None else ():
                if module not in seen and module not in stop:
                    seen.add(module)
                    todo.append(_file_of(module))
    return seen


def _stages() -> dict[str, dict]:
    """dvc.yaml's stages, a foreach stage as its `do` body (what each of its instances runs)."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (stage["do"] if "foreach" in stage else stage) for name, stage in stages.items()}


def test_convert_stages_are_the_registered_targets():
    """convert@ / parity_convert@ run foreach over params convert.targets, which is exactly the registry's
    targets within convert.backends x convert.precisions (no onnx-bf16), named <backend>-<precision>."""
    from pipeline_lib import registry

    raw = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["convert"]
    for name in ("convert", "parity_convert"):
        assert raw[name]["foreach"] == "${convert.targets}", name
    want = registry.target_labels(params["backends"], params["precisions"])
    assert list(params["targets"]) == want
    assert "onnx-bf16" not in want and {"openvino-bf16", "onnx-int4"} <= set(want)
    assert all(params["targets"][t] == dict(zip(("backend", "precision"), t.split("-"))) for t in want)


def _script(stage: dict) -> Path:
    m = re.search(r"python (stages/\S+\.py)", stage["cmd"])
    assert m, f"cmd {stage['cmd']!r}: expected `python stages/<name>.py ...`"
    return REPO_ROOT / m.group(1)


def _covered(path: str, deps: list[str]) -> bool:
    for dep in deps:
        dep = dep.rstrip("/")
        if path == dep or path.startswith(dep + "/"):
            return True
    return False


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_cover_the_code_it_runs(name):
    """Every pipeline_lib file a stage script may import (module level or in a function, transitively)
    is a dep of the stage in dvc.yaml: the file itself or a folder holding it. Empty files are exempt."""
    stage = _stages()[name]
    script = _script(stage)
    deps = [str(d) for d in stage.get("deps", []) if "${" not in str(d)]
    assert script.relative_to(REPO_ROOT).as_posix() in deps, f"{name}: the stage script is not among its deps"
    files = {_file_of(m) for m in _closure(script, stop=(PARAMS_CHECK,))}
    needed = sorted(f.relative_to(REPO_ROOT).as_posix() for f in files if f.read_text(encoding="utf-8").strip())
    missing = [f for f in needed if not _covered(f, deps)]
    assert not missing, (f"stage {name} ({script.name}) runs code that dvc.yaml does not list as its deps: {missing}; "
                         "add each file (or its package folder) to the stage's deps")


def _runtime_modules() -> list[Path]:
    return sorted((REPO_ROOT / PACKAGE / "runtime").glob("*.py"))


@pytest.mark.parametrize("path", _runtime_modules(), ids=lambda p: p.name)
def test_runtime_does_not_import_the_factory_at_module_level(path):
    """Importing any runtime module (and what it imports at module level, transitively) loads neither the
    factory's conversion code nor torch: those stay behind calls that only the factory makes."""
    closure = _closure(path, module_level=True) | {_module_of(path)}
    bad = sorted(m for m in closure if m in RUNTIME_MUST_NOT_LOAD)
    assert not bad, f"{path.name} imports {bad} at module level (directly or through its imports)"
    torch_users = sorted(m for m in closure if any(n == "torch" or n.startswith("torch.")
                                                      for n in _imports(_file_of(m), True)))
    assert not torch_users, f"{path.name}: these modules it loads import torch at module level: {torch_users}"


def test_importing_the_runtime_loads_no_factory_module():
    code = ("import sys\nimport pipeline_lib.runtime.tts, pipeline_lib.runtime.scheduler, pipeline_lib.runtime.command\n"
            f"print(sorted(m for m in {RUNTIME_MUST_NOT_LOAD!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _module_graph() -> dict[str, set[str]]:
    """pipeline_lib module -> the pipeline_lib modules it imports at module level (its own ancestor
    packages left out: they are already being imported when it runs)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO_ROOT / PACKAGE).rglob("*.py")):
        module = _module_of(path)
        own = set(_executed(module)) - {module}
        graph[module] = {m for name in _imports(path, True) if _file_of(name) is not None
                         for m in _executed(name) if m not in own and m != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_no_import_cycle_in_pipeline_lib():
    assert _cycles(_module_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_type_checking_imports_are_not_followed():
    """An import under ``if TYPE_CHECKING:`` never runs (its ``else`` does), so it makes no edge and no
    cycle. The bench's engines and `measure` both read BenchConfig from bench.config: no cycle either way."""
    tree = ast.parse("import a\nif TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
                     "if typing.TYPE_CHECKING:\n    import d\nif not TYPE_CHECKING:\n    import e\n"
                     "def f():\n    if TYPE_CHECKING:\n        import g\n    import h\n")
    assert _tree_imports(tree, "", False) == {"a", "c", "e", "h"}
    assert _tree_imports(tree, "", True) == {"a", "c", "e"}
    engines = REPO_ROOT / PACKAGE / "bench" / "engines.py"
    assert f"{PACKAGE}.bench.config" in _imports(engines, False)
    assert f"{PACKAGE}.bench.measure" not in _imports(engines, False)


@pytest.mark.parametrize("module, allowed", [
    ("pipeline_lib.registry", {"pipeline_lib.errors"}),
    ("pipeline_lib.openvino_ir", {"pipeline_lib.errors"}),
    ("pipeline_lib.openvino_stateful", {"pipeline_lib.errors", "pipeline_lib.openvino_ir", "pipeline_lib.registry"}),
])
def test_leaves_import_only_utilities(module, allowed):
    """The registry and the OpenVINO helpers are leaves (in functions too): the factory and the runtime
    both use them, so they may use neither."""
    ours = {m for m in _imports(_file_of(module), False) if m.startswith(PACKAGE + ".")}
    assert ours <= allowed, f"{module} imports {sorted(ours - allowed)}"


def test_every_target_names_a_conversion_and_a_known_precision():
    from pipeline_lib import registry

    for (backend, precision), target in registry.TARGETS.items():
        assert backend in registry.BACKENDS and precision in registry.PRECISIONS
        assert callable(target.converter()), target.convert
        assert (target.stateful_converter() is not None) == registry.backend(backend).stateful_lm, target.label
    for name in registry.PRECISIONS:
        p = registry.precision(name)
        assert p.parity in (registry.PARITY_REFERENCE, registry.PARITY_QUANTIZED)
        assert {p.weights(m) for m in registry.MODELS} <= {"fp32", "int8", "int4"}, name
    assert registry.EXPORT_TARGET in registry.TARGETS


def test_backend_names_and_aliases():
    from pipeline_lib import registry
    from pipeline_lib.errors import InputError

    for spelling, runtime in [("onnx", "onnx_cpu"), (" ORT ", "onnx_cpu"), ("onnxruntime", "onnx_cpu"),
                              ("openvino_cpu", "openvino_cpu"), ("ov", "openvino_cpu")]:
        assert registry.normalize_backend(spelling) == runtime
    assert registry.BACKEND_CHOICES == {"onnx": "onnx_cpu", "onnx_cpu": "onnx_cpu", "openvino": "openvino_cpu",
                                        "openvino_cpu": "openvino_cpu"}
    with pytest.raises(InputError, match="onnx_cpu, openvino_cpu"):
        registry.normalize_backend("cuda")
    with pytest.raises(InputError, match="unknown target onnx/int3"):
        registry.target("onnx", "int3")
