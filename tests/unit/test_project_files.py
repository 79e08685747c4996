"""The packaging files agree with each other: conda.yaml installs what pyproject.toml declares."""

from __future__ import annotations

import re

import tomllib
import yaml

from benchmarks.run_all import BENCHMARKS


def _normalise(req: str) -> str:
    return req.replace(" ", "").lower()


def test_conda_env_lists_the_same_requirements_as_pyproject(repo):
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((repo / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_reqs = {_normalise(r) for r in pip_section if not r.startswith("-e")}
    assert conda_reqs == {_normalise(r) for r in project["dependencies"]}
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    major_minor = tuple(int(x) for x in python.split("=")[1].split(".")[:2])
    minimum = tuple(int(x) for x in project["requires-python"].lstrip(">=").split(".")[:2])
    assert major_minor >= minimum


def test_ci_runs_the_readme_test_command(repo):
    readme = (repo / "README.md").read_text()
    ci = (repo / ".ci" / "run").read_text()
    assert "pip install -e '.[dev]'" in readme and "pip install -e '.[dev]'" in ci
    ci_commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert ci_commands[-1] == "pytest"
    assert "\npytest\n" in readme


def test_pytest_markers_are_declared_and_used(repo):
    config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = {m.split(":")[0] for m in config["markers"]}
    used = set()
    for path in (repo / "tests").rglob("test_*.py"):
        used |= set(re.findall(r"pytest\.mark\.(\w+)", path.read_text()))
    used -= {"parametrize", "skipif", "xfail", "usefixtures", "filterwarnings"}
    assert used == declared, f"declared {sorted(declared)}, used {sorted(used)}"
    assert "--strict-markers" in config["addopts"]


def test_run_all_runs_every_benchmark(repo):
    scripts = {p.stem for p in (repo / "benchmarks").glob("*.py")} - {"__init__", "common", "run_all"}
    assert sorted(BENCHMARKS) == sorted(scripts), "benchmarks/run_all.py must list every benchmark script"
