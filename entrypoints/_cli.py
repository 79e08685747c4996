"""Argument types shared by the entry points (MLflow passes every parameter as a string)."""

from __future__ import annotations

import argparse


def str2bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no) as MLflow's string parameters carry them."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
