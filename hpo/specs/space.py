"""Search space: a `StudySpec` and an Optuna trial in, a plain params dict out.

No Keras here. Names the spec leaves out take the family's defaults, and parameters that
only matter under another choice (SGD momentum, a schedule's decay) are asked for only then.
A KerasTuner-style `build(hp)` declares its own space: it is run to suggest it (tuner_hp.py).
"""

from __future__ import annotations

from typing import Any

import optuna

from hpo.specs import DEFAULT_PARAMS, RECURRENT_FAMILIES, Choice, Fixed, FloatRange, IntRange, Param, StudySpec
from hpo.specs.params import suggest_param

# Parameters that are suggested only when another parameter makes them matter.
_CONDITIONS = {
    "momentum": ("optimizer", {"sgd"}),
    "nesterov": ("optimizer", {"sgd"}),
    "lr_decay": ("lr_schedule", {"time", "exponential"}),
}


def default_params(spec: StudySpec) -> dict[str, Any]:
    """The vocabulary's values when a study does not search them."""
    params = dict(DEFAULT_PARAMS)
    params["window"] = spec.data.window
    if spec.data.name == "csv_text":
        params["maxlen"], params["vocab_size"] = spec.data.maxlen, spec.data.vocab_size
    if spec.model.family == "mlp":
        params["activation"] = "relu"
    if spec.model.family not in RECURRENT_FAMILIES:
        params["recurrent_dropout"] = 0.0
    return params


def suggest_params(spec: StudySpec, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    """Ask the trial for every parameter of the spec's space and fill in the rest.

    Works with any `BaseTrial`, so `optuna.trial.FixedTrial(stored_params)` replays a trial.
    """
    if spec.model.family == "analytic":
        return {name: suggest_param(trial, name, p) for name, p in spec.space.items()}
    hp_params = _suggest_hp_params(spec, trial)
    if hp_params is not None:
        return hp_params
    params = default_params(spec)
    for name in sorted(spec.space, key=lambda n: n in _CONDITIONS):
        if name in _CONDITIONS:
            parent, values = _CONDITIONS[name]
            if params[parent] not in values:
                continue
        params[name] = suggest_param(trial, name, spec.space[name])
    return params


def _suggest_hp_params(spec: StudySpec, trial: optuna.trial.BaseTrial | None) -> dict[str, Any] | None:
    # A KerasTuner-style build(hp) declares its space as it runs: it is run once here
    # (None for a trial: each call's default); [space] holds only how it is fed.
    from hpo.specs.tuner_hp import FIT_PARAMS, hp_build, suggest_hp_params

    build = hp_build(spec)
    if build is None:
        return None
    defaults = default_params(spec)
    fit_params = {name: defaults[name] for name in FIT_PARAMS}
    for name, p in spec.space.items():
        fit_params[name] = suggest_param(trial, name, p) if trial is not None else _first_value(p)
    return suggest_hp_params(spec, trial, build, fit_params)[0]


def grid_search_space(spec: StudySpec) -> dict[str, list[Any]]:
    """Every grid point of the spec's space, for Optuna's `GridSampler`."""
    grid: dict[str, list[Any]] = {}
    for name, p in spec.space.items():
        if isinstance(p, Choice):
            grid[name] = list(p.choices)
        elif isinstance(p, IntRange):
            grid[name] = list(range(p.low, p.high + 1, p.step))
        elif isinstance(p, FloatRange) and p.step is not None:
            n = int(round((p.high - p.low) / p.step))
            grid[name] = [round(p.low + i * p.step, 12) for i in range(n + 1)]
    return grid


def first_params(spec: StudySpec) -> dict[str, Any]:
    """The params of the space's first point (low ends, first choices; a build(hp)'s
    calls' defaults), to build a study's model once before any trial."""
    hp_params = _suggest_hp_params(spec, None)
    if hp_params is not None:
        return hp_params
    first = {name: _first_value(p) for name, p in spec.space.items() if not isinstance(p, Fixed)}
    return suggest_params(spec, optuna.trial.FixedTrial(first))


def _first_value(p: Param) -> Any:
    if isinstance(p, Fixed):
        return p.value
    return p.choices[0] if isinstance(p, Choice) else p.low
