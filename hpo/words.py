"""Words for printed lines: a count in, the count with its noun in the right number out;
a mean and its spread over seeds in, "mean ± std" out (the mean alone for one seed).
"""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """`n` and the noun: "1 seed", "3 seeds"; `many` for an irregular plural ("studies")."""
    return f"{n} {noun_for(n, noun, many)}"


def noun_for(n: int, noun: str, many: str | None = None) -> str:
    """The noun alone in the number `n` asks for: "seed" for 1, "seeds" otherwise."""
    return noun if n == 1 else many or noun + "s"


def mean_std(mean: float, std: float | None, n_seeds: int, digits: int = 5, std_digits: int = 2) -> str:
    """"0.41 ± 0.02" over several seeds; one seed has no spread to show, so just "0.41"."""
    if n_seeds == 1 or std is None:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.{std_digits}g}"


def format_params(params: dict) -> str:
    """`units=12, learning_rate=0.003162`: a trial's params as the run summary and replay print them."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
