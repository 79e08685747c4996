"""Model factory and pretrained-weight loading for FC-HarDNet.

``load_pretrained`` reads the three weight formats in circulation:

- the released checkpoint (``hardnet70_cityscapes_model.pkl``): a dict whose ``model_state`` holds the state_dict of
  an ``nn.DataParallel`` wrapper, so every key starts with ``module.``;
- a plain state_dict of :class:`FCHarDNet` (also inside a ``state_dict`` or ``model`` entry, as training
  checkpoints store it; ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes are removed);
- the ImageNet "petite" backbone (``hardnet_petite_base.pth``): a state_dict of ``base`` alone (``0.conv.weight`` ...).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segmentation.models.hardnet import FCHarDNet

logger = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[nn.Module]] = {"fchardnet70": FCHarDNet}
HEAD_KEYS = ("finalConv.weight", "finalConv.bias")
_PREFIXES = ("module.", "_orig_mod.")
_MAX_NAMES = 10  # names listed in an error message before "... and N more"


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        path: the file read.
        source: ``"released"``, ``"state_dict"`` or ``"backbone"``.
        loaded: state_dict keys copied into the model.
        kept: model keys left at their current values (the head when ``num_classes`` differs).
        message: one human-readable line.
    """

    path: str
    source: str
    loaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    message: str = ""


def build_model(cfg: Any) -> nn.Module:
    """Build the network named by ``cfg.arch`` and load ``cfg.pretrained`` when it is set.

    Args:
        cfg: a :class:`segmentation.config.ModelConfig` (``arch``, ``num_classes``, ``pretrained``).

    Returns:
        The model in train mode.

    Raises:
        ValueError: unknown ``arch`` (the message lists the available ones) or invalid ``num_classes``.
        FileNotFoundError: ``pretrained`` is set but the file does not exist.
    """
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"Unknown model arch '{cfg.arch}' (model.arch); available: {sorted(ARCHITECTURES)}")
    model = ARCHITECTURES[cfg.arch](num_classes=cfg.num_classes)
    if cfg.pretrained:
        report = load_pretrained(model, cfg.pretrained)
        logger.info(report.message)
    return model


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMES])
    return shown + (f" ... and {len(keys) - _MAX_NAMES} more" if len(keys) > _MAX_NAMES else "")


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles of whole modules or foreign objects are refused by weights_only
        raise ValueError(
            f"{path}: cannot be read as a weights file with torch.load(weights_only=True): "
            f"{str(exc).splitlines()[0]}. Expected a state_dict or a dict with 'model_state'."
        ) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    source = "state_dict"
    for container in ("model_state", "state_dict", "model"):
        if isinstance(obj.get(container), Mapping):
            source = "released" if container == "model_state" else "state_dict"
            obj = obj[container]
            break
    state = _strip_prefixes(obj)
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not state or not_tensors:
        raise ValueError(
            f"{path}: not a state_dict: expected a dict of tensors (optionally under 'model_state'), "
            f"found {'no keys' if not state else 'non-tensor entries ' + _names(not_tensors)}"
        )
    if all(re.match(r"\d+\.", key) for key in state):
        state = {f"base.{key}": value for key, value in state.items()}
        source = "backbone"
    return state, source


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load FC-HarDNet weights into ``model`` in place, refusing anything that does not match exactly.

    A checkpoint with a different number of classes loads everything but the head (``finalConv``), which keeps
    its current initialisation; the report says so. A backbone-only file loads ``base`` and leaves the decoder.

    Args:
        model: an :class:`FCHarDNet`.
        path: released checkpoint, plain state_dict or backbone-only file.

    Returns:
        A :class:`LoadReport`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, another architecture, or missing/unexpected keys or shape mismatches
            (listed by name with the shapes found and expected).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    state, source = _read_state(path)
    expected = model.state_dict()
    if source == "backbone":
        expected = {k: v for k, v in expected.items() if k.startswith("base.")}
    if not set(state) & set(expected):
        raise ValueError(
            f"{path}: not a checkpoint of {type(model).__name__}: none of its {len(state)} keys match the "
            f"model's {len(expected)} (first keys found: {_names(sorted(state))}; expected e.g. "
            f"{_names(list(expected)[:3])})"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    kept = [k for k in mismatched if k in HEAD_KEYS]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    shape_errors = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched if k not in kept
    ]
    if shape_errors:
        problems.append(f"shape mismatches: {_names(shape_errors)}")
    if problems:
        raise ValueError(f"{path} ({source}) does not match {type(model).__name__}: " + "; ".join(problems))

    to_load = {k: v for k, v in state.items() if k not in kept}
    model.load_state_dict(to_load, strict=False)
    message = f"loaded {len(to_load)} tensors from {path} ({source})"
    if kept:
        found = state[HEAD_KEYS[0]].shape[0]
        message += (
            f"; the checkpoint has {found} classes and the model {expected[HEAD_KEYS[0]].shape[0]}, "
            f"so the head ({', '.join(kept)}) keeps its initialisation"
        )
    if source == "backbone":
        message += "; the decoder and head keep their initialisation"
    return LoadReport(str(path), source, list(to_load), kept, message)
