"""Seeds: `seeds = 5` (fixed) or `seeds = { min, max }` (adaptive), and the [confirm] table (the refit of the
best trials on fresh seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpo.errors import SpecError
from hpo.specs.table import Table


# Limits of the study-wide counts, shared with the command-line options that override them.
MAX_SEEDS = 1000


@dataclass(frozen=True)
class ConfirmSpec:
    """Refit the `top` trials on `seeds` fresh seeds when the budget is spent (top = 0: off)."""

    top: int = 0
    seeds: int = 10


def parse_seeds(top: "Table") -> tuple[int, int | None]:
    """`seeds = 5` (fixed) or `seeds = { min = 3, max = 15 }` (adaptive): (min, max or None)."""
    if not isinstance(top.raw.get("seeds"), dict):
        return top.int("seeds", default=3, low=1, high=MAX_SEEDS,
                       expected="a whole number (seeds = 5), or seeds = { min = 3, max = 15 } to add seeds while a "
                                "trial cannot be told apart"), None
    t = top.table("seeds")
    given = set(t.raw)
    low = t.int("min", default=3, low=1, high=MAX_SEEDS)
    high = t.int("max", default=low, low=1, high=MAX_SEEDS)
    t.finish()
    for key in ("min", "max"):
        if key not in given:
            # Else `seeds = {}` would quietly mean 3 fixed seeds.
            raise SpecError(top.source, f"seeds.{key}", "is missing; adaptive seeds take both bounds, e.g. "
                                                        "seeds = { min = 3, max = 15 }; or write seeds = 3 for a "
                                                        "fixed count")
    if high < low:
        raise SpecError(top.source, "seeds.max", f"max = {high} is below min = {low}; set max >= min")
    if high > low and low < 2:
        # A race at one seed would never start: Welch's test needs two scores a side.
        raise SpecError(top.source, "seeds.min", "adaptive seeds test each trial against the best by Welch's "
                                                 "test, which needs 2 seeds or more; set min = 2 or more")
    return low, (high if high > low else None)


def parse_confirm(t: "Table") -> ConfirmSpec:
    spec = ConfirmSpec(top=t.int("top", default=0, low=0, high=1000),
                       seeds=t.int("seeds", default=10, low=2, high=1000))
    t.finish()
    return spec
