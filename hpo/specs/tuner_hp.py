"""KerasTuner's `hp`: a KerasTuner-style `build(hp)` and an Optuna trial (or a trial's
params) in; the compiled model it builds and the space its `hp` calls declared out.

Define-by-run, as Optuna is: each `hp.Int/Float/Choice/Boolean` call is the trial's
suggestion of the same name and range, so the space is whatever the build asks for. The
model keeps its own compile (optimizer, loss, metrics); hpo only trains its seeds.
Semantics follow KerasTuner's `HyperParameters`: `step` and `sampling` as there (a log
scale with a step is a multiplicative grid), defaults (`min_value`, the first choice,
False) for the first point, and a call under an inactive condition returns None.
No Keras here and no keras-tuner: the build's own module imports Keras.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna

from hpo.specs import CUSTOM, DATA_PARAMS, Choice, Fixed, FloatRange, IntRange, Param, StudySpec, param_to_raw
from hpo.specs.params import suggest_param

# The trial user attribute holding the space a trial's `hp` calls declared (active ones,
# `hp.Fixed` included), in a study file's `[space]` form.
ATTR_HP_SPACE = "hp_space"
# What hpo's `hp` answers; any other KerasTuner method stops the check with its name.
SUPPORTED = ("Int", "Float", "Choice", "Boolean", "Fixed", "conditional_scope", "name_scope", "get", "values",
             "is_active")
# The hpo params a build(hp) study may search in `[space]`: how the model is fed, not what
# it is (its `hp` calls say that).
FIT_PARAMS = ("batch_size", *DATA_PARAMS)


class UnsupportedHyperParameter(AttributeError):
    """A KerasTuner `hp` method or argument hpo does not implement."""

    def __init__(self, call: str, detail: str = "") -> None:
        super().__init__(f"hp.{call}{detail}")
        self.call = call
        self.detail = detail


class HyperParameters:
    """The `hp` a KerasTuner build receives.

    Args:
        trial: Each new name is this trial's suggestion (`trial.suggest_*`).
        values: Without a trial: each name takes its value here (a trial's params, to
            build its model again for every seed), else its default.
    """

    def __init__(self, trial: optuna.trial.BaseTrial | None = None, values: dict[str, Any] | None = None) -> None:
        self._trial = trial
        self._given = dict(values or {})
        self._values: dict[str, Any] = {}
        self._seen: set[str] = set()
        self._scopes: list[str] = []
        self._conditions: list[tuple[str, tuple]] = []
        self.declared: dict[str, Param] = {}

    @property
    def values(self) -> dict[str, Any]:
        """The active hyperparameters' values, as KerasTuner's `hp.values`."""
        return dict(self._values)

    def get(self, name: str) -> Any:
        """The value of an active hyperparameter.

        Raises:
            ValueError: It is declared but inactive. KeyError: It is not declared.
        """
        name = self._scoped(name)
        if name in self._values:
            return self._values[name]
        if name in self._seen:
            raise ValueError(f"{name} is currently inactive.")
        raise KeyError(f"{name} does not exist.")

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __contains__(self, name: str) -> bool:
        return self._scoped(name) in self._values

    def is_active(self, name: str) -> bool:
        """Whether the hyperparameter `name` has a value in this trial."""
        return self._scoped(str(name)) in self._values

    @contextlib.contextmanager
    def name_scope(self, name: str) -> Iterator[None]:
        """Prefix the names declared inside with `name/`, as KerasTuner does."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    @contextlib.contextmanager
    def conditional_scope(self, parent_name: str, parent_values: Any) -> Iterator[None]:
        """Hyperparameters declared inside are active only while `parent_name`'s value is
        one of `parent_values`; inactive, they are not suggested and return None.

        Raises:
            ValueError: `parent_name` was not declared before.
        """
        parent = self._scoped(parent_name)
        if parent not in self._seen:
            raise ValueError(f"`HyperParameter` named: {parent} not defined.")
        values = tuple(parent_values) if isinstance(parent_values, (list, tuple, set)) else (parent_values,)
        self._conditions.append((parent, values))
        try:
            yield
        finally:
            self._conditions.pop()

    def Int(self, name: str, min_value: int, max_value: int, step: int | None = None, sampling: str | None = "linear",
            default: int | None = None, parent_name: str | None = None, parent_values: Any = None) -> int | None:
        """An integer in [min_value, max_value]; `step` apart on a linear scale (1 when
        None), a factor `step` apart on a log scale."""
        low, high = int(min_value), int(max_value)
        _check_range("Int", name, low, high)
        log = _is_log(sampling)
        if log and step is not None:
            param: Param = Choice(tuple(int(v) for v in _geometric(low, high, step)))
        else:
            step = 1 if step is None else int(step)
            param = IntRange(low, low + (high - low) // step * step, log=log, step=step)
        return self._declare(name, param, low if default is None else int(default), parent_name, parent_values)

    def Float(self, name: str, min_value: float, max_value: float, step: float | None = None,
              sampling: str | None = "linear", default: float | None = None, parent_name: str | None = None,
              parent_values: Any = None) -> float | None:
        """A float in [min_value, max_value]: continuous without `step`; `step` apart on a
        linear scale, a factor `step` apart on a log scale."""
        low, high = float(min_value), float(max_value)
        _check_range("Float", name, low, high)
        log = _is_log(sampling)
        if log and step is not None:
            param: Param = Choice(tuple(float(v) for v in _geometric(low, high, step)))
        elif step is not None:
            n = math.floor((high - low) / step + 1e-9)
            param = FloatRange(low, round(low + n * step, 12), step=float(step))
        else:
            param = FloatRange(low, high, log=log)
        return self._declare(name, param, low if default is None else float(default), parent_name, parent_values)

    def Choice(self, name: str, values: list[Any], ordered: bool | None = None, default: Any = None,
               parent_name: str | None = None, parent_values: Any = None) -> Any:
        """One of `values` (`ordered` is accepted; Optuna samples choices unordered)."""
        values = tuple(values)
        if not values:
            raise ValueError(f"hp.Choice({name!r}) needs at least one value")
        if default is None:
            default = None if None in values else values[0]
        return self._declare(name, Choice(values), default, parent_name, parent_values)

    def Boolean(self, name: str, default: bool = False, parent_name: str | None = None,
                parent_values: Any = None) -> bool | None:
        """True or False."""
        return self._declare(name, Choice((False, True)), bool(default), parent_name, parent_values)

    def Fixed(self, name: str, value: Any, parent_name: str | None = None, parent_values: Any = None) -> Any:
        """A constant: recorded with the declared space, never suggested."""
        return self._declare(name, Fixed(value), value, parent_name, parent_values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise UnsupportedHyperParameter(name)

    def _scoped(self, name: str) -> str:
        return "/".join([*self._scopes, name])

    def _declare(self, name: str, param: Param, default: Any, parent_name: str | None, parent_values: Any) -> Any:
        if parent_name is not None:
            with self.conditional_scope(parent_name, parent_values):
                return self._declare(name, param, default, None, None)
        name = self._scoped(name)
        self._seen.add(name)
        if not all(self._values.get(parent, _MISSING) in values for parent, values in self._conditions):
            return None
        if name in self._values:
            # Declared again (KerasTuner returns the value it has): one suggestion per trial.
            return self._values[name]
        if isinstance(param, Fixed):
            value = param.value
        elif self._trial is not None:
            value = suggest_param(self._trial, name, param)
        else:
            value = self._given.get(name, default)
        self.declared[name] = param
        self._values[name] = value
        return value


_MISSING = object()


def _check_range(kind: str, name: str, low: float, high: float) -> None:
    if low > high:
        raise ValueError(f"hp.{kind}({name!r}): min_value {low} is above max_value {high}; swap them")


def _is_log(sampling: str | None) -> bool:
    if sampling in (None, "linear"):
        return False
    if sampling == "log":
        return True
    if sampling == "reverse_log":
        raise UnsupportedHyperParameter("Int/Float", '(sampling="reverse_log"): Optuna has no such distribution; '
                                        'use sampling="log" or "linear"')
    raise ValueError(f'sampling must be "linear" or "log", got {sampling!r}')


def _geometric(low: float, high: float, factor: float) -> list[float]:
    if low <= 0 or factor <= 1:
        raise ValueError(f"a log scale with a step needs min_value > 0 and step > 1, got {low} and {factor}")
    values, v = [], low
    while v <= high * (1 + 1e-9):
        values.append(v)
        v *= factor
    return values


def is_hp_build(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is a KerasTuner-style `build(hp)`: it takes one argument, not hpo's
    three (`build(params, input_shape, n_outputs)`)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(0, 0, 0)
        return False
    except TypeError:
        pass
    try:
        signature.bind(0)
        return True
    except TypeError:
        return False


def load_build(spec: StudySpec) -> Callable[..., Any]:
    """The spec's `[model] build` function, its code checked against the recorded hash."""
    from hpo.specs import hooks

    return hooks.load_hook(spec.model.build, None if spec.base_dir is None else Path(spec.base_dir), spec.source,
                           "model.build", sha256=spec.model.build_sha256, parameters=(3, 1))


def hp_build(spec: StudySpec) -> Callable[..., Any] | None:
    """The spec's build when it is a KerasTuner-style `build(hp)`, else None."""
    if spec.model.family != CUSTOM:
        return None
    from hpo.backend import configure_determinism, use_backend

    # The build's module imports Keras: the backend is chosen before it is loaded.
    configure_determinism(use_backend(spec.training.backend))
    build = load_build(spec)
    return build if is_hp_build(build) else None


def suggest_hp_params(spec: StudySpec, trial: optuna.trial.BaseTrial | None, build: Callable[..., Any],
                      fit_params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Param]]:
    """Run `build(hp)` once with the trial (None: every call's default, the space's first
    point): the params its calls declared, with `fit_params` (batch size, data shape)
    under them, and the declared space. The model built here is dropped: each seed builds
    its own under its seed. A trial records the space as the `hp_space` user attribute."""
    hp = HyperParameters(trial=trial)
    build(hp)
    params = {**fit_params, **hp.values}
    if isinstance(trial, optuna.Trial):
        trial.set_user_attr(ATTR_HP_SPACE, declared_raw(hp.declared))
    return params, hp.declared


def declared_raw(declared: dict[str, Param]) -> dict[str, Any]:
    """A declared space in a study file's `[space]` form (what `hp_space` stores)."""
    return {name: param_to_raw(p) for name, p in declared.items()}


def build_hp_model(build: Callable[..., Any], params: dict[str, Any]) -> Any:
    """The model `build(hp)` returns for a trial's params (its `hp` calls answered from them)."""
    return build(HyperParameters(values=params))
