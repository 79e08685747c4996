"""The search space of a hyperparameter sweep: a small YAML file mapping dotted config keys to distributions.

.. code-block:: yaml

    params:
      train.lr: {type: float, low: 0.002, high: 0.1, log: true}
      loss.min_k: {type: int, low: 128, high: 1024, step: 128}
      optimizer.name: {type: categorical, choices: [sgd, adamw]}
    overrides: [train.max_steps=200]                 # optional: fixed for every trial
    pruner: {n_startup_trials: 3, n_warmup_steps: 100}  # optional

Everything is checked when the file loads (:func:`load_search_space`): unknown config keys (the schema's
:func:`~segmentation.config.valid_keys`), unknown distribution types or fields, bounds that are not numbers or not
ordered, ``log`` with a bound <= 0. :func:`check_against_config` then loads the trial config at every bound and every
choice, so a value the config refuses (``loss.min_k: 0``, a string for a float) fails before the first trial.
Numbers are read as YAML 1.2 reads them: ``1e-5`` is a float (plain PyYAML would read a string).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segmentation.config import valid_keys
from segmentation.config_loading import ConfigError, load_config, override_keys

DISTRIBUTIONS = ("float", "int", "categorical")
FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
TOP_LEVEL = ("params", "overrides", "pruner")
PRUNER_FIELDS = {"n_startup_trials": 3, "n_warmup_steps": 0}


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` and ``2E3`` as floats (YAML 1.2), as a person writing bounds expects."""


# Only scientific notation without a dot (``1e-5``), which YAML 1.1 leaves a string; the rest as PyYAML reads it.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


@dataclass(frozen=True)
class Distribution:
    """One searched config key: ``float``/``int`` in ``[low, high]`` (``log``, ``step``) or ``categorical``."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def bounds(self) -> tuple[Any, ...]:
        """The values a trial can take at the edges: ``(low, high)`` or every choice."""
        return self.choices if self.type == "categorical" else (self.low, self.high)


@dataclass(frozen=True)
class PrunerSettings:
    """Median pruning: no trial is pruned before ``n_startup_trials`` trials completed, nor before training step
    ``n_warmup_steps`` (the first validations of a from-scratch training are the noisiest)."""

    n_startup_trials: int = PRUNER_FIELDS["n_startup_trials"]
    n_warmup_steps: int = PRUNER_FIELDS["n_warmup_steps"]


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    params: tuple[Distribution, ...]
    overrides: tuple[str, ...] = ()
    pruner: PrunerSettings = field(default_factory=PrunerSettings)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]


def _number(where: str, name: str, value: Any, integer: bool) -> float | int:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{where}: '{name}' must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: '{name}' must be finite, got {value!r}")
    return value


def _distribution(where: str, key: str, spec: Any) -> Distribution:
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ConfigError(
            f"{where}: expected a mapping with 'type' ({', '.join(DISTRIBUTIONS)}), e.g. "
            f"{{type: float, low: 0.001, high: 0.1, log: true}}; got {spec!r}"
        )
    kind = spec["type"]
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution type {kind!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    unknown = sorted(set(spec) - FIELDS[kind])
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} for type {kind}; allowed: {sorted(FIELDS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: 'choices' must be a non-empty list, got {choices!r}")
        for choice in choices:
            if not isinstance(choice, (bool, int, float, str)) or (isinstance(choice, str) and not choice.strip()):
                raise ConfigError(f"{where}: choice {choice!r} is not a number, a boolean or a non-empty string")
            if isinstance(choice, str) and any(c.isspace() for c in choice):
                raise ConfigError(f"{where}: choice {choice!r} contains whitespace, which overrides cannot carry")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: 'choices' lists a value twice: {choices}")
        return Distribution(key, kind, choices=tuple(choices))
    integer = kind == "int"
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"{where}: '{name}' is missing (type {kind} needs low and high)")
    low, high = _number(where, "low", spec["low"], integer), _number(where, "high", spec["high"], integer)
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be smaller than high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: 'log' must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0, got low={low}")
    step = spec.get("step")
    if step is not None:
        step = _number(where, "step", step, integer)
        if step <= 0:
            raise ConfigError(f"{where}: 'step' must be > 0, got {step}")
        if log:
            raise ConfigError(f"{where}: 'step' and log: true cannot be combined; drop one of them")
    return Distribution(key, kind, low, high, log, step)


def _pruner(where: str, spec: Any) -> PrunerSettings:
    if spec is None:
        return PrunerSettings()
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{n_startup_trials: 3, n_warmup_steps: 100}}")
    unknown = sorted(set(spec) - set(PRUNER_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(PRUNER_FIELDS)}")
    values = {name: _number(where, name, spec.get(name, default), True) for name, default in PRUNER_FIELDS.items()}
    negative = {k: v for k, v in values.items() if v < 0}
    if negative:
        raise ConfigError(f"{where}: {negative} must be >= 0")
    return PrunerSettings(**values)


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space YAML file.

    Raises:
        FileNotFoundError: no such file (the message lists the shipped ones).
        ConfigError: invalid YAML, an unknown section, config key, distribution type or field, or bad bounds; the
            message names the file, the entry, what was found and what is allowed.
    """
    path = Path(path)
    if not path.is_file():
        shipped = sorted(str(p) for p in (Path(__file__).resolve().parents[2] / "configs" / "sweeps").glob("*.yaml"))
        raise FileNotFoundError(f"search space not found: {path} (shipped: {', '.join(shipped) or 'none'})")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping with {', '.join(TOP_LEVEL)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; allowed: {', '.join(TOP_LEVEL)}")
    params = data.get("params")
    if not isinstance(params, Mapping) or not params:
        raise ConfigError(f"{path}: 'params' must map at least one dotted config key to a distribution")
    keys = valid_keys()
    space = []
    for key, spec in params.items():
        if key not in keys:
            section = str(key).split(".")[0]
            nearby = [k for k in keys if k.startswith(section + ".")] or keys
            raise ConfigError(f"{path}: params: unknown config key '{key}'. Valid keys: {', '.join(nearby)}")
        space.append(_distribution(f"{path}: params.{key}", key, spec))
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{path}: 'overrides' must be a list of key=value strings, got {overrides!r}")
    return SearchSpace(path, tuple(space), tuple(overrides), _pruner(f"{path}: pruner", data.get("pruner")))


def trial_overrides(values: Mapping[str, Any]) -> list[str]:
    """Dotted ``key=value`` overrides of one trial's values (``True`` as ``true``, floats at full precision)."""
    return [
        f"{key}={str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else v}"
        for key, v in values.items()
    ]


def check_against_config(space: SearchSpace, config: str | Path, overrides: Iterable[str] = ()) -> None:
    """Load the trial config at every bound and every choice, so a value the config refuses fails now.

    ``overrides`` are the fixed ones (command line); a key both searched and fixed there is an error.

    Raises:
        ConfigError: the value is refused (the message names the space file, the key and the config's reason),
            or a searched key is also fixed by an override.
        FileNotFoundError: no such config file.
    """
    fixed = list(space.overrides) + list(overrides)
    clash = sorted(override_keys(fixed) & set(space.keys))
    if clash:
        raise ConfigError(
            f"{space.path}: {clash} searched and also fixed by an override; drop the override or the search"
        )
    load_config(config, fixed)
    for dist in space.params:
        for value in dist.bounds():
            try:
                load_config(config, fixed + trial_overrides({dist.key: value}))
            except ConfigError as exc:
                raise ConfigError(f"{space.path}: params.{dist.key}: value {value!r} is refused: {exc}") from None
