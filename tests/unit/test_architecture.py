"""The package tree is the architecture; these checks read the source with ``ast`` and keep its rules true.

1. Only ``segmentation/mlops`` and ``segmentation/steps`` import ``mlflow``; only ``segmentation/training`` imports
   ``accelerate``; entry points import neither.
2. No import cycles between ``segmentation`` modules, and no function-level import of a ``segmentation`` module
   (the usual way to hide a cycle).
3. Entry points stay thin: at most ~50 lines, they parse arguments and hand one step to ``_cli.run``.
4. Library modules stay small: at most 300 lines each (one concern per module, named for what it holds).
5. The entry points that only talk to MLflow (the pipeline, preprocessing) load no deep-learning runtime: every
   process ``mlflow run`` starts pays for what its entry point imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "segmentation"
MAX_ENTRY_POINT_LINES = 60
MAX_MODULE_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported module, at module level?)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from segmentation.mlops import registry` imports the submodule segmentation.mlops.registry
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.append((node.module, id(node) in top_level))
            found += [
                (name, id(node) in top_level) for name in names if (REPO / (name.replace(".", "/") + ".py")).is_file()
            ]
    return found


def library_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def top(name: str) -> str:
    return name.split(".")[0]


def test_only_mlops_and_steps_import_mlflow_and_only_training_imports_accelerate():
    offenders = []
    for path in library_files():
        folder = path.relative_to(PACKAGE).parts[0]
        for name, _ in imports(path):
            if top(name) == "mlflow" and folder not in ("mlops", "steps"):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
            if top(name) == "accelerate" and folder != "training":
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    for path in sorted((REPO / "entrypoints").glob("*.py")):
        offenders += [
            f"{path.relative_to(REPO)} imports {n}" for n, _ in imports(path) if top(n) in ("mlflow", "accelerate")
        ]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles_and_no_function_level_imports_of_segmentation_modules():
    graph: dict[str, set[str]] = {}
    nested = []
    modules = {module_name(p): p for p in library_files()}
    for name, path in modules.items():
        graph[name] = set()
        for imported, at_top in imports(path):
            if top(imported) != "segmentation":
                continue
            if not at_top:
                nested.append(f"{path.relative_to(REPO)} imports {imported} inside a function")
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target in modules and target != name:
                graph[name].add(target)
    assert not nested, "\n".join(nested)
    # Importing a package runs its __init__: an edge to segmentation.x.y also reaches segmentation.x (unless the
    # importer lives inside segmentation.x, whose __init__ is already running or done).
    for name in list(graph):
        for target in list(graph[name]):
            parent = target.rsplit(".", 1)[0]
            while parent != "segmentation" and parent in modules and not (name + ".").startswith(parent + "."):
                graph[name].add(parent)
                parent = parent.rsplit(".", 1)[0]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("path", sorted((REPO / "entrypoints").glob("[!_]*.py")), ids=lambda p: p.name)
def test_entry_points_are_thin(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_ENTRY_POINT_LINES, f"{path.name} has {len(lines)} lines"
    tree = ast.parse(path.read_text())
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "run" in calls, f"{path.name} must hand its step to entrypoints._cli.run (one exit-code table)"
    steps = {n for n, _ in imports(path) if n.startswith("segmentation.steps.")}
    assert len(steps) == 1, f"{path.name} should call one step module, imports {sorted(steps)}"


def test_readme_layout_names_every_package_folder():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    folders = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    missing = [f for f in folders if f"{f}/" not in layout]
    assert not missing, f"README Layout does not name {missing}"


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_library_modules_are_at_most_300_lines():
    offenders = [
        f"{path.relative_to(REPO)}: {line_count(path)} lines"
        for path in library_files()
        if line_count(path) > MAX_MODULE_LINES
    ]
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines (split them along their concerns):\n" + "\n".join(
        offenders
    )


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def third_party_imports_at_start(path: Path) -> set[str]:
    """Top-level names of what importing ``path`` loads, following our own module-level imports (and the
    ``__init__`` of each package on the way)."""
    todo, seen, found = [path], set(), set()
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        parent = file.parent
        while parent != REPO:
            if (parent / "__init__.py").is_file():
                todo.append(parent / "__init__.py")
            parent = parent.parent
        for name, at_top in imports(file):
            if not at_top:
                continue
            if top(name) in ("segmentation", "entrypoints"):
                todo += [f for f in [_module_file(name)] if f is not None]
            else:
                found.add(top(name))
    return found


@pytest.mark.parametrize("entry_point", ["main", "preprocess"])
def test_mlflow_only_entry_points_start_without_deep_learning_runtimes(entry_point):
    loaded = third_party_imports_at_start(REPO / "entrypoints" / f"{entry_point}.py")
    assert "mlflow" in loaded  # the walk reaches the steps
    heavy = loaded & {"torch", "torchvision", "onnx", "onnxruntime", "albumentations", "accelerate"}
    assert not heavy, f"entrypoints.{entry_point} imports {sorted(heavy)} at start"
