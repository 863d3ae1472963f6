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


def check_devices(backend: str) -> None:
    """Start the backend's devices once, so that a device it was told to use but cannot
    find (`JAX_PLATFORMS=cuda` on a machine without CUDA) is named before any trial,
    instead of surfacing as the model's error.

    Raises:
        BackendError: Naming the setting and what to do.
    """
    if backend != "jax":
        return
    import jax

    try:
        jax.devices()
    except Exception as e:  # noqa: BLE001 - JAX raises RuntimeError, or a bare AssertionError for a missing plugin
        platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME")
        asked = f"JAX_PLATFORMS={platforms}" if platforms else "its default platforms"
        detail = str(e).split(" (set JAX_PLATFORMS")[0] or f"no {platforms or 'usable'} device was found"
        raise BackendError(f"JAX cannot start on {asked}: {detail}; install the JAX plugin for that device "
                           "(e.g. pip install 'jax[cuda12]') or set JAX_PLATFORMS=cpu") from e
