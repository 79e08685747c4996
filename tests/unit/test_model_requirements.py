"""A logged model's ``requirements.txt`` is exactly what its served code imports, at installable versions."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from segmentation.mlops.model_store import CODE_DIR, pip_requirements, served_code_files

# Loads the served pyfunc's code the way `mlflow models serve` does (the models-from-code entry file) and lists the
# files of the `segmentation` modules that loading pulled in.
PROBE = r"""
import json, sys
import segmentation.mlops.serving_model  # noqa: F401
print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "segmentation")))
"""


def _imported_top_level_names(files: list[str]) -> set[str]:
    """Every module a file imports, at module level or inside a function (onnxruntime is imported lazily)."""
    names = set()
    for file in files:
        for node in ast.walk(ast.parse(Path(file).read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("segmentation", "__future__")}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.fixture(scope="module")
def loaded_files(repo) -> list[str]:
    """The files of the `segmentation` modules that loading the served pyfunc imports (one fresh process)."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=repo, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_requirements_are_exactly_the_distributions_the_served_code_imports(loaded_files):
    files = loaded_files
    assert any(f.endswith("serving.py") for f in files) and not any("/training/" in f for f in files), files
    modules = _imported_top_level_names(files)
    distributions = metadata.packages_distributions()
    unknown = sorted(m for m in modules if m not in distributions)
    assert not unknown, f"imported modules that no installed distribution provides: {unknown}"
    declared = {_normalise(r.split("==")[0]) for r in pip_requirements()}
    # A module can come from several distributions (mlflow from mlflow, mlflow-skinny, mlflow-tracing): one will do.
    providers = {m: {_normalise(d) for d in distributions[m]} for m in modules}
    missing = sorted(m for m, dists in providers.items() if not dists & declared)
    unused = sorted(d for d in declared if not any(d in dists for dists in providers.values()))
    assert not missing, f"served code imports {missing}, provided by no distribution in the requirements"
    assert not unused, f"requirements list {unused}, which the served code never imports"


def test_pins_carry_no_local_version_label():
    for requirement in pip_requirements():
        name, version = requirement.split("==")
        assert "+" not in version, requirement
        assert version == metadata.version(name).split("+")[0]


def test_the_code_logged_with_a_model_is_the_closure_of_what_serving_imports(loaded_files):
    files = {path.as_posix() for path in served_code_files()}
    for needed in ("mlops/serving_model.py", "mlops/serving.py", "inference/predictor.py", "models/hardnet.py"):
        assert f"segmentation/{needed}" in files
    assert "segmentation/__init__.py" in files and "segmentation/models/__init__.py" in files
    assert not [f for f in files if f.split("/")[1] in ("training", "steps")], sorted(files)
    # Everything loading the served model pulls in is there (the closure also holds what functions import lazily).
    loaded = {Path(f).relative_to(CODE_DIR.parent).as_posix() for f in loaded_files}
    assert loaded <= files, sorted(loaded - files)
    assert len(files) < len(list(CODE_DIR.rglob("*.py")))
