"""The [sampler] and [pruner] tables: Optuna's sampler and pruner, by name and settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpo.specs.table import Table


SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp")
PRUNERS = ("median", "hyperband", "successive_halving", "percentile", "none")


@dataclass(frozen=True)
class SamplerSpec:
    kind: str = "tpe"
    seed: int | None = None
    n_startup_trials: int = 10


@dataclass(frozen=True)
class PrunerSpec:
    kind: str = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 2
    percentile: float = 25.0
    min_resource: int = 1
    reduction_factor: int = 3


def parse_sampler(t: "Table", study_seed: int) -> SamplerSpec:
    kind = t.str("kind", default="tpe")
    t.choice("kind", kind, SAMPLERS)
    spec = SamplerSpec(kind=kind, seed=t.int("seed", default=study_seed, low=0, high=2**31 - 1),
                       n_startup_trials=t.int("n_startup_trials", default=10, low=0, high=100_000))
    t.finish()
    return spec


def parse_pruner(t: "Table", default_kind: str) -> PrunerSpec:
    kind = t.str("kind", default=default_kind)
    t.choice("kind", kind, PRUNERS)
    spec = PrunerSpec(
        kind=kind,
        n_startup_trials=t.int("n_startup_trials", default=5, low=0, high=100_000),
        n_warmup_steps=t.int("n_warmup_steps", default=2, low=0, high=100_000),
        percentile=t.float("percentile", default=25.0, low=0.0, high=100.0),
        min_resource=t.int("min_resource", default=1, low=1, high=100_000),
        reduction_factor=t.int("reduction_factor", default=3, low=2, high=100),
    )
    t.finish()
    return spec
