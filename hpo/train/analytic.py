"""Analytic test functions: params in, a pseudo learning curve per seed out.

They train nothing, so the whole machinery (seeds, early stopping, pruning, storage) can
be exercised in milliseconds. Seeded Gaussian noise makes the seeds disagree.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def beale(x: float, y: float) -> float:
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def rosenbrock(x: float, y: float) -> float:
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def sphere(*xs: float) -> float:
    return float(sum(v * v for v in xs))


FUNCTIONS: dict[str, Callable[..., float]] = {"beale": beale, "rosenbrock": rosenbrock, "sphere": sphere}


def evaluate(function: str, params: dict[str, Any]) -> float:
    """The function's value at the params, taken in the spec's order."""
    values = [float(v) for v in params.values()]
    return float(FUNCTIONS[function](*values))


def curve(function: str, params: dict[str, Any], *, seed: int, epochs: int, noise: float) -> list[float]:
    """A decreasing curve that settles at the function's value, plus the seed's noise.

    Epoch e reads `f + (|f| + 1) * 0.5**e + noise * N(0, 1)`: bad regions stay bad from the
    first epoch on, which is what a pruner needs to see.
    """
    f = evaluate(function, params)
    rng = np.random.default_rng(seed)
    return [f + (abs(f) + 1.0) * 0.5**e + noise * float(rng.standard_normal()) for e in range(epochs)]
