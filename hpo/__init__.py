"""hpo: honest hyperparameter optimisation for Keras models, stored in SQL."""

import os

# TensorFlow's C++ start-up chatter drowns the progress lines; set it before any import of
# TensorFlow (users can still raise it by exporting the variable themselves).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _default_keras_backend() -> None:
    # Keras fixes its backend when first imported: a notebook that imports hpo before
    # keras trains on hpo's backend ($HPO_BACKEND, else the default), not on Keras' own.
    import sys

    from hpo.backend import BACKENDS, DEFAULT_BACKEND

    wanted = os.environ.get("HPO_BACKEND") or DEFAULT_BACKEND
    if "keras" not in sys.modules and wanted in BACKENDS:
        os.environ.setdefault("KERAS_BACKEND", wanted)


_default_keras_backend()

__version__ = "0.1.0"


# The documented modules, imported on first use too: `hpo.results.trials_frame(...)`,
# `hpo.plots.seed_scores_figure(...)`, `hpo.export.validation_split(...)`.
_MODULES = ("results", "plots", "export")


def __getattr__(name: str):
    # hpo.tune / hpo.run / hpo.load_spec / hpo.best_models / hpo.report, imported on first
    # use: `import hpo` (and `hpo --help`) stays free of Optuna's and Keras' start-up cost.
    if name in ("tune", "run", "load_spec", "best_models", "report"):
        from hpo import api

        return getattr(api, name)
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"hpo.{name}")
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")
