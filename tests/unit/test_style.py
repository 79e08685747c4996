"""The style guide's tooling, run as part of the test command: ruff's formatter and linter agree with the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


def ruff(*args: str) -> subprocess.CompletedProcess:
    assert RUFF, "ruff is not installed: `pip install -e '.[dev]'` installs it"
    return subprocess.run([RUFF, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_ruff_format_leaves_the_tree_unchanged():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}{result.stderr}"


def test_ruff_check_passes():
    result = ruff("check", ".")
    assert result.returncode == 0, f"run `ruff check --fix .`:\n{result.stdout}{result.stderr}"
