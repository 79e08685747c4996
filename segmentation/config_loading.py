"""Loading a config: a YAML file merged onto the typed schema of :mod:`segmentation.config`, then dotted overrides
(``train.lr=0.02``) applied with OmegaConf, then the allowed values and ranges checked.

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key and listing the valid ones; NaN
and infinities are refused anywhere, since every comparison with NaN is False and no later bound would catch them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from segmentation.config import CHOICES, RANGES, Config, list_keys, valid_keys

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LIST_KEYS = frozenset(list_keys())


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what is allowed."""


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


def _mapping_for_list(given: Any, prefix: str = "") -> tuple[str, Any] | None:
    """The first ``(key, value)`` of ``given`` where the schema has a list and ``given`` a mapping."""
    for key, value in given.items() if isinstance(given, Mapping) else ():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name in LIST_KEYS:
            return name, value
        found = _mapping_for_list(value, name + ".")
        if found:
            return found
    return None


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source, other) from None
    except TypeError as exc:  # OmegaConf's bare "Cannot merge incompatible container types": a mapping for a list
        found = _mapping_for_list(other)
        if found is None:
            raise ConfigError(f"{source}: {exc}") from None
        key, value = found
        example = OmegaConf.select(base, key) or [1.0, 2.0]
        raise ConfigError(
            f"{source}: invalid value for '{key}': a mapping ({value!r}); allowed: a whole list of numbers, "
            f"e.g. {key}={list(example)}"
        ) from None


def _check_finite(node: Any, key: str = "") -> None:
    """Refuse NaN and infinities anywhere (comparisons with NaN are all False, so later checks let it through)."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            _check_finite(value, f"{key}.{name}" if key else name)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, (list, Mapping)):  # OmegaConf lets a container into a list of numbers
                raise ConfigError(f"invalid value for '{key}[{i}]': {value!r}; allowed: a number")
            _check_finite(value, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"invalid value for '{key}': {node!r}; allowed: a finite number")


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"invalid value for '{key}': {value!r}; allowed: {', '.join(allowed)}")
    for key, allowed_range in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:  # an optional list left unset
            continue
        numbers = {f"{key}[{i}]": v for i, v in enumerate(value)} if key in LIST_KEYS else {key: value}
        for name, number in numbers.items():
            if number not in allowed_range:
                finite = isinstance(number, (int, float)) and math.isfinite(number)
                allowed = allowed_range if finite else f"a finite number {allowed_range}"
                raise ConfigError(f"invalid value for '{name}': {number!r}; allowed: {allowed}")


def _check_together(cfg: DictConfig) -> None:
    """NaN and infinities anywhere, list lengths and the bounds that involve two keys."""
    _check_finite(OmegaConf.to_container(cfg, resolve=True))
    betas, scales, weights = cfg.optimizer.betas, cfg.eval.scales, cfg.loss.class_weights
    if len(betas) != 2:
        raise ConfigError(
            f"invalid value for 'optimizer.betas': {list(betas)}; allowed: two numbers {RANGES['optimizer.betas']}"
        )
    if not scales:
        raise ConfigError(f"invalid value for 'eval.scales': []; allowed: one or more numbers {RANGES['eval.scales']}")
    if weights is not None and len(weights) != cfg.model.num_classes:
        raise ConfigError(
            f"invalid value for 'loss.class_weights': {len(weights)} weights; allowed: one per class "
            f"(model.num_classes={cfg.model.num_classes}) or null"
        )
    if cfg.train.epochs < 1 and cfg.train.max_steps < 1:
        raise ConfigError("train.epochs and train.max_steps are both < 1: set at least one of them")
    if not 0 < cfg.augmentation.scale_min <= cfg.augmentation.scale_max:
        raise ConfigError(
            f"augmentation.scale_min/scale_max must satisfy 0 < min <= max, got "
            f"{cfg.augmentation.scale_min}/{cfg.augmentation.scale_max}"
        )


def override_keys(overrides: Iterable[str]) -> set[str]:
    """The dotted keys that ``key=value`` overrides set."""
    return {o.split("=", 1)[0].strip() for o in overrides if "=" in o}


def load_config(path: str | Path | None = None, overrides: Iterable[str] | str | None = None) -> Config:
    """Build a :class:`Config` from the schema defaults, a YAML file and dotted overrides.

    Args:
        path: YAML file whose keys are merged onto the defaults; ``None`` keeps the defaults.
        overrides: ``key=value`` strings (a list, or one string separated by spaces), e.g. ``train.lr=0.02``.

    Returns:
        A :class:`Config` instance (plain dataclasses, safe to pass around and to pickle).

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ConfigError: unknown key, wrong type (a mapping for a list included), an override that does not parse, NaN or
            an infinity anywhere, or a value outside its allowed set, range (:data:`segmentation.config.RANGES`) or
            length; the message names the key, the value and what is allowed, or lists the valid keys.
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
        dotted = OmegaConf.create()
        for item in items:  # one at a time, so the message names the one that does not parse
            try:
                dotted.merge_with_dotlist([item])
            except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as exc:
                raise ConfigError(
                    f"override {item!r} does not parse ({str(exc).splitlines()[0]}); expected key=value with a YAML "
                    "value, e.g. train.lr=0.02 or eval.scales=[0.75,1.0]"
                ) from None
        cfg = _merge(cfg, dotted, "override")
    _check_choices(cfg)
    _check_together(cfg)
    return OmegaConf.to_object(cfg)


# Recipe values exposed as MLproject parameters; "" (their default) means "the config's own value".
RECIPE_PARAMS = {"lr": "train.lr", "epochs": "train.epochs", "batch_size": "train.batch_size"}


def resolve_train_config(
    config: str, data: str = "", overrides: str = "", **recipe: str | int | float | None
) -> Config:
    """The config file with ``data`` and each non-empty recipe value (``lr``, ``epochs``, ``batch_size``) and
    ``overrides`` applied. A value given always wins over the file; an empty one keeps the file's. A key given both
    ways (``lr`` and ``train.lr=...`` in ``overrides``) is refused: one of the two would be recorded and not used.

    Raises:
        ConfigError: an unknown recipe name, a key given twice, or a value of the wrong type (the message names the
            config key).
        FileNotFoundError: the config file does not exist.
    """
    unknown = sorted(set(recipe) - set(RECIPE_PARAMS))
    if unknown:
        raise ValueError(f"unknown recipe parameter(s) {unknown}; allowed: {sorted(RECIPE_PARAMS)}")
    given = {RECIPE_PARAMS[name]: (name, value) for name, value in recipe.items() if value not in ("", None)}
    if data:
        given["data.root"] = ("data", data)
    twice = sorted(override_keys(overrides.split()) & set(given))
    if twice:
        named = ", ".join(f"{given[key][0]}={given[key][1]} and overrides {key}=..." for key in twice)
        raise ConfigError(f"{named}: the same setting given twice; give it one way")
    return load_config(config, [f"{key}={value}" for key, (_, value) in given.items()] + overrides.split())
