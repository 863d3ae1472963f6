"""The [training] and [objective] tables: epochs, patience, backend, loss and score; what a trial's seeds
are judged by. `TrainingSpec` and `ObjectiveSpec` out.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpo.backend import BACKENDS
from hpo.specs.table import Table


OBJECTIVE_MODES = ("mean", "mean+k*std", "pareto")

METRICS = {
    "val_loss": "minimize",
    "val_mae": "minimize",
    "val_mse": "minimize",
    "val_accuracy": "maximize",
}

MAX_EPOCHS = 100_000


@dataclass(frozen=True)
class ObjectiveSpec:
    mode: str = "mean"
    k: float = 1.0


@dataclass(frozen=True)
class TrainingSpec:
    max_epochs: int = 30
    patience: int = 5
    min_delta: float = 0.0
    # None: HPO_BACKEND, else hpo's default (backend.py).
    backend: str | None = None
    # A Keras loss name; None: the output kind's (mse, sparse categorical cross-entropy).
    loss: str | None = None
    # "best": a seed's score is its best epoch's (early stopping); "last": its final epoch's,
    # as in experiments that train a fixed number of epochs and report where they ended.
    score: str = "best"


def parse_objective(t: "Table") -> ObjectiveSpec:
    mode = t.str("mode", default="mean")
    t.choice("mode", mode, OBJECTIVE_MODES)
    k = t.float("k", default=1.0, low=0.0, high=100.0)
    t.finish()
    return ObjectiveSpec(mode=mode, k=k)


def parse_training(t: "Table") -> TrainingSpec:
    spec = TrainingSpec(
        max_epochs=t.int("max_epochs", default=30, low=1, high=MAX_EPOCHS),
        patience=t.int("patience", default=5, low=0, high=100_000),
        min_delta=t.float("min_delta", default=0.0, low=0.0, high=1e9),
        backend=t.str("backend", default=None),
        loss=t.str("loss", default=None),
        score=t.str("score", default="best"),
    )
    if spec.backend is not None:
        t.choice("backend", spec.backend, BACKENDS)
    t.choice("score", spec.score, ("best", "last"))
    t.finish()
    return spec
