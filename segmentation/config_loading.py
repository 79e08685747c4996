"""Loading a config: a YAML file merged onto the typed schema of :mod:`segmentation.config`, then dotted overrides
(``train.lr=0.02``) applied with OmegaConf, then the allowed values and ranges checked.

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key and listing the valid ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from segmentation.config import CHOICES, RANGES, Config, valid_keys

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what is allowed."""


def _allowed(low: float | None, high: float | None) -> str:
    if high is None:
        return f">= {low}"
    if low is None:
        return f"<= {high}"
    return f"in [{low}, {high}]"


def _explain(exc: OmegaConfBaseException, source: str, given: Any = None) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if not key and isinstance(given, Mapping) and len(given) == 1:
        key = next(iter(given))  # OmegaConf leaves full_key empty when a whole section is replaced
    section = key.rsplit(".", 1)[0] if "." in key else key
    nearby = [k for k in valid_keys() if k.startswith(section + ".")] if section else []
    listing = ", ".join(nearby or valid_keys())
    if isinstance(exc, (ConfigAttributeError, ConfigKeyError)):
        return ConfigError(f"{source}: unknown config key '{key}'. Valid keys: {listing}")
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{source}: invalid value for '{key or '?'}': {msg}. Valid keys here: {listing}")


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source, other) from None


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"invalid value for '{key}': {value!r}; allowed: {', '.join(allowed)}")
    for key, (low, high) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if not (math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)):
            raise ConfigError(f"invalid value for '{key}': {value!r}; allowed: {_allowed(low, high)}")
    if cfg.train.epochs < 1 and cfg.train.max_steps < 1:
        raise ConfigError("train.epochs and train.max_steps are both < 1: set at least one of them")
    if not 0 < cfg.augmentation.scale_min <= cfg.augmentation.scale_max:
        raise ConfigError(
            f"augmentation.scale_min/scale_max must satisfy 0 < min <= max, got "
            f"{cfg.augmentation.scale_min}/{cfg.augmentation.scale_max}"
        )


def load_config(path: str | Path | None = None, overrides: Iterable[str] | str | None = None) -> Config:
    """Build a :class:`Config` from the schema defaults, a YAML file and dotted overrides.

    Args:
        path: YAML file whose keys are merged onto the defaults; ``None`` keeps the defaults.
        overrides: ``key=value`` strings (a list, or one string separated by spaces), e.g. ``train.lr=0.02``.

    Returns:
        A :class:`Config` instance (plain dataclasses, safe to pass around and to pickle).

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ConfigError: unknown key, wrong type or a value outside its allowed set or range
            (:data:`segmentation.config.RANGES`); the message names the key, the value and what is allowed, or lists
            the valid keys.
    """
    cfg = OmegaConf.structured(Config)
    if path:
        path = Path(path)
        if not path.is_file():
            available = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"config file not found: {path} (shipped configs in {CONFIG_DIR}: {available})")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
        cfg = _merge(cfg, data, str(path))
    if isinstance(overrides, str):
        overrides = overrides.split()
    items = [o for o in (overrides or []) if o.strip()]
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=0.02)")
    if items:
        try:
            dotted = OmegaConf.from_dotlist(items)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"overrides {items}: {exc}") from None
        cfg = _merge(cfg, dotted, "override")
    _check_choices(cfg)
    return OmegaConf.to_object(cfg)
