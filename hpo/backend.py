"""Keras backend: the spec's choice (or `HPO_BACKEND`) in; `KERAS_BACKEND` set before
Keras is first imported, or a clear error when this process already loaded another.
"""

from __future__ import annotations

import os
import sys

from hpo.errors import BackendError
from hpo.spec import BACKENDS

# Measured with `hpo bench` on this project's CPUs: the JAX engine trains a trial's
# seeds as one vectorised program, which the TensorFlow backend cannot.
DEFAULT_BACKEND = "jax"


def resolve_backend(requested: str | None = None) -> str:
    """The backend to train on: `requested` (the spec's), else `HPO_BACKEND`, else the default."""
    name = requested or os.environ.get("HPO_BACKEND") or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise BackendError(f"HPO_BACKEND={name!r} is not one of {', '.join(BACKENDS)}; set it to one of them or unset it")
    return name


def use_backend(requested: str | None = None) -> str:
    """Make Keras load with the resolved backend and return its name.

    Raises:
        BackendError: Keras is already loaded in this process with another backend.
    """
    name = resolve_backend(requested)
    if "keras" in sys.modules:
        import keras

        loaded = keras.backend.backend()
        if loaded in BACKENDS and not (requested or os.environ.get("HPO_BACKEND")):
            # A notebook that imported Keras before hpo chose: train on what it loaded
            # (the TensorFlow backend takes the sequential path) rather than refuse.
            return loaded
        if loaded != name:
            raise BackendError(f"this process already loaded Keras with the {loaded} backend and cannot switch to "
                               f"{name}; run it in a new process (hpo run does), or set HPO_BACKEND={loaded}")
        return name
    os.environ["KERAS_BACKEND"] = name
    # Keras imports TensorFlow for its data utilities on any backend; its native start-up
    # lines would otherwise reach the user's terminal.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return name
