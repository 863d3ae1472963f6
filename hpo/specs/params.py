"""The [space] table: the built-in families' hyperparameter vocabulary (defaults, allowed values, bounds) in,
validated `IntRange`/`FloatRange`/`Choice`/`Fixed` parameters out; and what an Optuna trial suggests for each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import optuna

from hpo.errors import SpecError, did_you_mean
from hpo.specs.model import CUSTOM
from hpo.specs.table import Table


# Range bounds beyond this are refused: Optuna computes high - low (infinite for ±1e308,
# which crashed the sampler outside any trial); 1e100 leaves a wide margin.
MAX_BOUND = 1e100

# The search-space vocabulary of the built-in families, with the value used when the
# spec leaves a name out.
DEFAULT_PARAMS: dict[str, Any] = {
    "units": 32,
    "layers": 1,
    "dropout": 0.0,
    "recurrent_dropout": 0.0,
    "learning_rate": 1e-3,
    "batch_size": 32,
    "optimizer": "adam",
    "momentum": 0.0,
    "nesterov": False,
    "lr_schedule": "constant",
    "lr_decay": 0.0,
    "l1": 0.0,
    "l2": 0.0,
    "initializer": "glorot_uniform",
    "activation": "tanh",
    "clipnorm": 0.0,
    "window": None,
    "maxlen": None,
    "vocab_size": None,
    "embedding_dim": 16,
}
CHOICES = {
    "optimizer": ("adam", "rmsprop", "sgd"),
    "lr_schedule": ("constant", "time", "exponential"),
    "initializer": ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal", "orthogonal"),
    "activation": ("tanh", "relu", "elu", "selu", "sigmoid", "gelu", "swish"),
    "nesterov": (True, False),
}
# name -> (lowest allowed, highest allowed, must be int)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "units": (1, 4096, True),
    "layers": (1, 16, True),
    "dropout": (0.0, 0.99, False),
    "recurrent_dropout": (0.0, 0.99, False),
    "learning_rate": (1e-8, 10.0, False),
    "batch_size": (1, 1 << 16, True),
    "momentum": (0.0, 0.999, False),
    "lr_decay": (0.0, 100.0, False),
    "l1": (0.0, 10.0, False),
    "l2": (0.0, 10.0, False),
    "clipnorm": (0.0, 1e6, False),
    "window": (1, 10_000, True),
    "maxlen": (1, 100_000, True),
    "vocab_size": (3, 10_000_000, True),
    "embedding_dim": (1, 100_000, True),
}
# Vocabulary names that shape the data rather than the model.
DATA_PARAMS = ("window", "maxlen", "vocab_size")


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False
    step: int = 1


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class Choice:
    choices: tuple


@dataclass(frozen=True)
class Fixed:
    value: Any


Param = Union[IntRange, FloatRange, Choice, Fixed]


def param_to_raw(p: Param) -> Any:
    """One parameter of a space as a study file writes it."""
    if isinstance(p, Fixed):
        return {"value": p.value}
    if isinstance(p, Choice):
        return {"choices": list(p.choices)}
    raw = {"low": p.low, "high": p.high, "log": p.log}
    if p.step is not None:
        raw["step"] = p.step
    return raw


def parse_space(t: "Table", family: str) -> dict[str, Param]:
    space: dict[str, Param] = {}
    for name in list(t.raw):
        field_name = f"{t.prefix}{name}"
        if family not in ("analytic", CUSTOM) and name not in DEFAULT_PARAMS:
            raise SpecError(t.source, field_name, f"unknown parameter; the {family} family understands "
                                                  f"{', '.join(DEFAULT_PARAMS)}{did_you_mean(name, list(DEFAULT_PARAMS))}")
        space[name] = _parse_param(t.source, field_name, name, t.raw[name], family)
    t.raw = {}
    if family == "analytic" and not any(isinstance(p, (IntRange, FloatRange)) for p in space.values()):
        raise SpecError(t.source, "space", "the analytic family needs numeric ranges, e.g. x = { low = -4.5, high = 4.5 }")
    return space


def _parse_param(source: str, field_name: str, name: str, raw: Any, family: str) -> Param:
    if not isinstance(raw, dict):
        raw = {"value": raw}
    keys = set(raw)
    if keys <= {"value"} and keys:
        param: Param = Fixed(raw["value"])
    elif "choices" in keys:
        extra = keys - {"choices"}
        if extra:
            raise SpecError(source, field_name, f"a list of choices takes no {', '.join(sorted(extra))}; remove it")
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpecError(source, field_name, f"choices must be a non-empty list, got {choices!r}")
        if len({repr(c) for c in choices}) != len(choices):
            raise SpecError(source, field_name, f"choices {choices} repeat a value; list each once")
        param = Choice(tuple(choices))
    elif {"low", "high"} <= keys:
        extra = keys - {"low", "high", "log", "step"}
        if extra:
            raise SpecError(source, field_name, f"unknown key {', '.join(sorted(extra))}; a range takes low, high, log, step")
        low, high, log, step = raw["low"], raw["high"], raw.get("log", False), raw.get("step")
        for key, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SpecError(source, field_name, f"{key} must be a number, got {v!r}")
            if not math.isfinite(v) or abs(v) > MAX_BOUND:
                raise SpecError(source, field_name, f"{key} = {v!r} is not a finite number within "
                                                    f"±{MAX_BOUND:g}; choose a smaller {key}")
        if not isinstance(log, bool):
            raise SpecError(source, field_name, f"log must be true or false, got {log!r}")
        if low > high:
            raise SpecError(source, field_name, f"low={low} is above high={high}; swap them")
        if log and low <= 0:
            raise SpecError(source, field_name, f"log=true needs low > 0, got low={low}; raise low or set log = false")
        if log and step not in (None, 1):
            raise SpecError(source, field_name, "log=true cannot take a step; remove step or log")
        is_int = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
        if name in BOUNDS and BOUNDS[name][2] and not is_int:
            raise SpecError(source, field_name, f"{name} is a whole number; write low and high without a decimal point")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0
                                 or not math.isfinite(step)):
            raise SpecError(source, field_name, f"step must be a positive number, got {step!r}")
        if step is not None and not _step_fits(low, high, step):
            raise SpecError(source, field_name, f"step {step} does not divide high - low = {high - low:g} (Optuna "
                                                f"would quietly shrink the range); choose high = low + a whole "
                                                f"number of steps, e.g. high = {_fitting_high(low, high, step):g}")
        param = IntRange(low, high, log, step or 1) if is_int else FloatRange(float(low), float(high), log,
                                                                              None if step is None else float(step))
    else:
        raise SpecError(source, field_name, f"expected a range {{ low = .., high = .. }}, a list {{ choices = [..] }} "
                                            f"or a fixed value, got {raw!r}")
    values = [param.value] if isinstance(param, Fixed) else list(param.choices) if isinstance(param, Choice) else []
    for v in values:
        if isinstance(v, float) and (not math.isfinite(v) or abs(v) > MAX_BOUND):
            raise SpecError(source, field_name, f"{v!r} is not a finite number within ±{MAX_BOUND:g}; choose another")
    if family != "analytic":
        _check_param_values(source, field_name, name, param)
    return param


def _step_fits(low: float, high: float, step: float) -> bool:
    steps = (high - low) / step
    return abs(steps - round(steps)) <= 1e-9 * max(1.0, abs(steps))


def _fitting_high(low: float, high: float, step: float) -> float:
    return low + math.floor((high - low) / step + 1e-9) * step


def _check_param_values(source: str, field_name: str, name: str, param: Param) -> None:
    values: list[Any]
    if isinstance(param, Fixed):
        values = [param.value]
    elif isinstance(param, Choice):
        values = list(param.choices)
    else:
        values = [param.low, param.high]
    if name in CHOICES:
        for v in values:
            if v not in CHOICES[name] or isinstance(v, bool) != isinstance(CHOICES[name][0], bool):
                raise SpecError(source, field_name, f"{v!r} is not one of {', '.join(map(repr, CHOICES[name]))}"
                                                    f"{did_you_mean(str(v), [str(c) for c in CHOICES[name]])}")
        return
    if name in BOUNDS:
        lo, hi, must_int = BOUNDS[name]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (must_int and not isinstance(v, int)):
                kind = "a whole number" if must_int else "a number"
                raise SpecError(source, field_name, f"expected {kind}, got {v!r}")
            if not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
                raise SpecError(source, field_name, f"{v!r} is outside {lo}..{hi}; choose values in that range")


def suggest_param(trial: optuna.trial.BaseTrial, name: str, p: Param) -> Any:
    """The trial's suggestion for one parameter of a space (a fixed one's value)."""
    if isinstance(p, Fixed):
        return p.value
    if isinstance(p, Choice):
        return trial.suggest_categorical(name, list(p.choices))
    if isinstance(p, IntRange):
        return trial.suggest_int(name, p.low, p.high, step=p.step, log=p.log)
    if isinstance(p, FloatRange):
        return trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    raise TypeError(f"unknown parameter kind {p!r}")
