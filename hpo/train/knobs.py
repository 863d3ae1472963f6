"""Hyperparameters as inputs of a compiled step: a Keras model in, its knobs out (dropout
rates, noise, regularisation factors, clipping, momentum, a schedule's rates: numbers that
change no weight's shape), and the step traced with them as values rather than constants.

Keras reads these numbers as plain Python attributes while a step is traced. During
tracing only, each is swapped for a `_Knob`: a comparison with 0 or 1 (`rate > 0`,
`self.l2 != 0.0`, `0.0 < self.dropout < 1.0`) is answered from the number's class
(below 0, 0, between, 1, above), which is part of the program's key; Python arithmetic on
it (`1.0 - rate`) is recorded; and where a tensor op meets the result, the op reads an
input of the program whose value is that same arithmetic done in Python on the trial's
own numbers. So a replica computes exactly what the constant would have given, and two
trials that differ only in such numbers share one compiled program. Anything else
(`float(rate)`, `math.sqrt(rate)`, a comparison with 0.5) raises `Escaped`, and the model
then compiles its numbers in, as before.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

# Keras classes whose float attributes are read only while a step runs (never turned into
# other constants when the object is made), by class name in Keras' own modules.
_LAYER_KNOBS = {
    "Dropout": ("rate",), "SpatialDropout1D": ("rate",), "SpatialDropout2D": ("rate",),
    "SpatialDropout3D": ("rate",), "AlphaDropout": ("rate",), "GaussianNoise": ("stddev",),
    # GaussianDropout takes math.sqrt of its rate in Python: it escapes, so it is left out.
    "LSTMCell": ("dropout", "recurrent_dropout"), "GRUCell": ("dropout", "recurrent_dropout"),
    "SimpleRNNCell": ("dropout", "recurrent_dropout"),
}
_REGULARIZER_KNOBS = {"L1": ("l1",), "L2": ("l2",), "L1L2": ("l1", "l2")}
_OPTIMIZER_KNOBS = ("clipnorm", "clipvalue", "global_clipnorm", "momentum")
_SCHEDULE_KNOBS = {"InverseTimeDecay": ("initial_learning_rate", "decay_rate"),
                   "ExponentialDecay": ("initial_learning_rate", "decay_rate")}

# A class's stand-in where the number itself must not show (the program's key).
_CLASSES = ((lambda v: v < 0, -0.5), (lambda v: v == 0, 0.0), (lambda v: v < 1, 0.5), (lambda v: v == 1, 1.0),
            (lambda v: True, 2.0))


@dataclass(frozen=True)
class Knob:
    """One number of a model: `owner.attr`, named by `path` (the same for every model of
    one structure)."""

    path: str
    owner: Any
    attr: str

    @property
    def value(self) -> float:
        return getattr(self.owner, self.attr)


class Escaped(BaseException):
    """A knob was used in a way its class cannot answer for every value (a BaseException,
    so no `except Exception` in Keras or JAX takes it for the layer's own error)."""


def find_knobs(model: Any) -> list[Knob]:
    """The model's knobs, in an order fixed by its structure: its layers' (and RNN cells')
    dropout and noise rates, their regularisers' factors, the optimizer's clipping and
    momentum, and its learning-rate schedule's rates. Only Keras' own classes, and only
    attributes holding a float."""
    found: list[Knob] = []
    seen: set[tuple[int, str]] = set()

    def add(path: str, owner: Any, names: tuple[str, ...]) -> None:
        for name in names:
            if (id(owner), name) not in seen and type(getattr(owner, name, None)) is float:
                seen.add((id(owner), name))
                found.append(Knob(f"{path}.{name}", owner, name))

    for i, layer in enumerate(model._flatten_layers()):
        if _keras_own(layer, _LAYER_KNOBS):
            add(f"layer{i}", layer, _LAYER_KNOBS[type(layer).__name__])
        for name, value in sorted(vars(layer).items()):
            if _keras_own(value, _REGULARIZER_KNOBS):
                add(f"layer{i}.{name}", value, _REGULARIZER_KNOBS[type(value).__name__])
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and type(optimizer).__module__.startswith("keras."):
        add("optimizer", optimizer, _OPTIMIZER_KNOBS)
        schedule = getattr(optimizer, "_learning_rate", None)
        if _keras_own(schedule, _SCHEDULE_KNOBS):
            add("optimizer.schedule", schedule, _SCHEDULE_KNOBS[type(schedule).__name__])
    return found


def _keras_own(obj: Any, table: dict[str, tuple[str, ...]]) -> bool:
    return type(obj).__name__ in table and type(obj).__module__.startswith("keras.")


def value_class(value: float) -> float:
    """The stand-in of the value's class: what its comparisons with 0 and 1 answer."""
    return next(stand_in for test, stand_in in _CLASSES if test(value))


@contextlib.contextmanager
def standing_in(knobs: list[Knob]) -> Iterator[None]:
    """Each knob set to its class's stand-in, then restored: the model's config then
    shows its structure and not its numbers."""
    with _swapped(knobs, lambda i, k: value_class(k.value)):
        yield


@contextlib.contextmanager
def _swapped(knobs: list[Knob], new: Callable[[int, Knob], Any]) -> Iterator[None]:
    old = [k.value for k in knobs]
    try:
        for i, k in enumerate(knobs):
            setattr(k.owner, k.attr, new(i, k))
        yield
    finally:
        for k, v in zip(knobs, old):
            setattr(k.owner, k.attr, v)


class Inputs:
    """The numbers a traced step reads, as recorded while it was traced: each is Python
    arithmetic on the knobs' values (a knob itself, `1.0 - rate`, ...), the program's
    input at its position among `slots`."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.exprs: list[Any] = []

    def values(self, knob_values: tuple[float, ...]) -> tuple[float, ...]:
        """Each input for a model whose knobs hold `knob_values`; unused slots are 0."""
        out = [_evaluate(e, knob_values) for e in self.exprs]
        return tuple(out) + (0.0,) * (self.slots - len(out))

    @contextlib.contextmanager
    def tracing(self, knobs: list[Knob], leaves: tuple[Any, ...]) -> Iterator[None]:
        """While a step is traced: the knobs as `_Knob`s whose tensor uses read `leaves`,
        the traced inputs."""
        previous = getattr(_tracing, "active", None)
        _tracing.active = (self, leaves)
        try:
            with _swapped(knobs, lambda i, k: _Knob(("knob", i), k.value)):
                yield
        finally:
            _tracing.active = previous

    def leaf(self, expr: Any, leaves: tuple[Any, ...]) -> Any:
        if expr not in self.exprs:
            if len(self.exprs) == self.slots:
                raise Escaped
            self.exprs.append(expr)
        return leaves[self.exprs.index(expr)]


# The `Inputs` and traced leaves of the step this thread is tracing.
_tracing = threading.local()

_NUMBER = (int, float)


def _evaluate(expr: Any, values: tuple[float, ...]) -> Any:
    if not isinstance(expr, tuple):
        return expr
    op, *args = expr
    if op == "knob":
        return values[args[0]]
    return _OPS[op](*(_evaluate(a, values) for a in args))


_OPS: dict[str, Callable[..., Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "pow": operator.pow, "neg": operator.neg, "abs": abs,
}


class _Knob:
    """A knob (or Python arithmetic on knobs) while a step is traced."""

    __array_priority__ = 1000  # NumPy defers to our reflected operators

    def __init__(self, expr: Any, value: float) -> None:
        self._expr, self._value = expr, value

    def _tensor(self) -> Any:
        active = getattr(_tracing, "active", None)
        if active is None:
            raise Escaped
        inputs, leaves = active
        return inputs.leaf(self._expr, leaves)

    def __jax_array__(self) -> Any:
        return self._tensor()

    @property
    def dtype(self) -> Any:
        # What JAX and Keras take a Python float for.
        import keras
        import numpy as np

        return np.dtype(keras.config.floatx())

    def _binary(self, op: str, other: Any, reflected: bool) -> Any:
        if isinstance(other, _Knob):
            a, b = (other, self) if reflected else (self, other)
            return _Knob((op, a._expr, b._expr), _OPS[op](a._value, b._value))
        if type(other) in _NUMBER:
            args = (other, self._expr) if reflected else (self._expr, other)
            values = (other, self._value) if reflected else (self._value, other)
            return _Knob((op, *args), _OPS[op](*values))
        tensor = self._tensor()
        return _OPS[op](other, tensor) if reflected else _OPS[op](tensor, other)

    def __add__(self, o): return self._binary("add", o, False)  # noqa: E704
    def __radd__(self, o): return self._binary("add", o, True)  # noqa: E704
    def __sub__(self, o): return self._binary("sub", o, False)  # noqa: E704
    def __rsub__(self, o): return self._binary("sub", o, True)  # noqa: E704
    def __mul__(self, o): return self._binary("mul", o, False)  # noqa: E704
    def __rmul__(self, o): return self._binary("mul", o, True)  # noqa: E704
    def __truediv__(self, o): return self._binary("truediv", o, False)  # noqa: E704
    def __rtruediv__(self, o): return self._binary("truediv", o, True)  # noqa: E704
    def __pow__(self, o): return self._binary("pow", o, False)  # noqa: E704
    def __rpow__(self, o): return self._binary("pow", o, True)  # noqa: E704

    def __neg__(self) -> "_Knob":
        return _Knob(("neg", self._expr), -self._value)

    def __abs__(self) -> "_Knob":
        return _Knob(("abs", self._expr), abs(self._value))

    def _compare(self, op: Callable[[Any, Any], bool], other: Any) -> bool:
        # Answered from the class: only a knob itself against 0 or 1.
        if self._expr[0] != "knob" or type(other) not in _NUMBER or other not in (0, 1):
            raise Escaped
        return op(self._value, other)

    def __eq__(self, o): return self._compare(operator.eq, o)  # noqa: E704
    def __ne__(self, o): return self._compare(operator.ne, o)  # noqa: E704
    def __lt__(self, o): return self._compare(operator.lt, o)  # noqa: E704
    def __le__(self, o): return self._compare(operator.le, o)  # noqa: E704
    def __gt__(self, o): return self._compare(operator.gt, o)  # noqa: E704
    def __ge__(self, o): return self._compare(operator.ge, o)  # noqa: E704

    def __bool__(self) -> bool:
        return self._compare(operator.ne, 0)

    __hash__ = object.__hash__

    def _escape(self, *args: Any) -> Any:
        raise Escaped

    __float__ = __int__ = __index__ = __round__ = __floor__ = __ceil__ = __trunc__ = _escape
