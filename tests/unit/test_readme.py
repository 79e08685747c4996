"""The README's entry-point tables list exactly MLproject's parameters, with the same defaults."""

from __future__ import annotations

import re

import pytest
import yaml


def readme_tables(text: str) -> dict[str, dict[str, str]]:
    """``{entry point: {parameter: default}}`` from the `### <name>` tables of the README."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in text.splitlines():
        heading = re.match(r"^### (\w+)\s*$", line)
        if heading:
            section = heading.group(1)
            continue
        row = re.match(r"^\| `(\w+)` \| (.*?) \|", line)
        if section and row:
            tables.setdefault(section, {})[row.group(1)] = row.group(2).strip().strip("`")
    return tables


def mlproject_params(repo) -> dict[str, dict[str, str]]:
    spec = yaml.safe_load((repo / "MLproject").read_text())["entry_points"]
    out = {}
    for name, entry in spec.items():
        params = {}
        for key, value in entry.get("parameters", {}).items():
            default = value.get("default") if isinstance(value, dict) else None
            params[key] = "required" if default is None else ('""' if default == "" else str(default))
        out[name] = params
    return out


def test_every_entry_point_is_documented_with_its_parameters(repo):
    documented = readme_tables((repo / "README.md").read_text())
    for name, params in mlproject_params(repo).items():
        assert name in documented, f"README has no '### {name}' table"
        assert documented[name] == params, f"README table for '{name}' differs from MLproject"


def test_the_parser_reads_tables(repo):
    text = "### demo\n\n| parameter | default | meaning |\n|---|---|---|\n| `a` | `1` | x |\n| `b` | required | y |\n"
    assert readme_tables(text) == {"demo": {"a": "1", "b": "required"}}


@pytest.mark.parametrize("placeholder", ["SERVING_SECTION", "TEAM_SECTION", "RELIABILITY_SECTION", "FIGURES_SECTION"])
def test_no_placeholder_left(repo, placeholder):
    assert placeholder not in (repo / "README.md").read_text()


def test_readme_carries_the_tested_serving_commands(repo):
    serving = (repo / "docs" / "serving.md").read_text().split("\n", 1)[1].strip()
    assert serving in (repo / "README.md").read_text()


def test_readme_speaks_to_users_not_to_the_tracker(repo):
    # Users cannot follow "issue 9" or "task 12": the README names what a figure or a target is about instead.
    for path in [repo / "README.md", *sorted((repo / "docs").glob("*.md")), repo / "benchmarks" / "RESULTS.md"]:
        found = re.findall(r"\b(?:issue|task|ticket)s?\s*#?\d+", path.read_text(), flags=re.IGNORECASE)
        assert not found, f"{path.name} refers to the issue tracker: {found}"
