"""hpo: honest hyperparameter optimisation for Keras models, stored in SQL."""

import os

# TensorFlow's C++ start-up chatter drowns the progress lines; set it before any import of
# TensorFlow (users can still raise it by exporting the variable themselves).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"


def __getattr__(name: str):
    # hpo.tune / hpo.run / hpo.load_spec, imported on first use: `import hpo` (and
    # `hpo --help`) stays free of Optuna's and Keras' start-up cost.
    if name in ("tune", "run", "load_spec"):
        from hpo import api

        return getattr(api, name)
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")
