"""Keras backend: the spec's choice (or `HPO_BACKEND`) in; `KERAS_BACKEND` set before
Keras is first imported, or a clear error when this process already loaded another. Also
the rest of the process's training environment: JAX's persistent compilation cache
(`HPO_CACHE_DIR`), shared by every process that trains; deterministic ops; thread caps.
Below every stage: a study file naming a KerasTuner `build(hp)` already needs Keras
loaded on its backend to read its space.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from hpo.errors import BackendError

# The Keras backends hpo trains on (a study's [training] backend, `HPO_BACKEND`).
BACKENDS = ("jax", "tensorflow")

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
    # Where anything does import TensorFlow (its backend, a user's loader), its native
    # start-up lines would otherwise reach the user's terminal.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return name


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (its backend, or a Keras text layer, needs it) without its native
    start-up lines (oneDNN, CUDA stubs), which go to fd 2 before its own log settings
    apply; a failing import still raises. A machine without TensorFlow (a GPU box with
    only the JAX CUDA wheels) skips this."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    if importlib.util.find_spec("tensorflow") is None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _LoadedTensorFlow:
    """Keras' lazy `tensorflow` module as two of Keras' own modules see it: available
    only once something else has imported TensorFlow.

    `keras.utils.set_random_seed` and Keras' serialisation (`get_config`, saving) ask
    whether TensorFlow is available, and asking imports it: 3 s and ~570 MB in every JAX
    process, for a library no JAX trial calls (a value cannot be a `tf.TensorShape`, nor a
    TensorFlow generator need a seed, while TensorFlow is not loaded). Where the user's
    code or a text layer imports it, both see it again and seed and serialise it as Keras does.
    """

    def __init__(self, lazy: object) -> None:
        self._lazy = lazy

    @property
    def available(self) -> bool:
        return "tensorflow" in sys.modules and self._lazy.available

    def __getattr__(self, name: str) -> object:
        return getattr(self._lazy, name)


def keep_tensorflow_unloaded() -> None:
    """Stop Keras importing TensorFlow on another backend just to ask whether it is there
    (see `_LoadedTensorFlow`); Keras is imported. A Keras without these modules is left as it is."""
    for name in ("keras.src.utils.rng_utils", "keras.src.saving.serialization_lib"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        lazy = getattr(module, "tf", None)
        if lazy is not None and type(lazy).__name__ == "LazyModule":
            module.tf = _LoadedTensorFlow(lazy)


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


# The persistent compilation cache: every process that trains (a worker, `hpo confirm`,
# `hpo replay`, a re-run, the tests) reads the programs another one compiled instead of
# compiling them again. Bounded: JAX evicts the least recently used entries past this,
# under a file lock that makes concurrent writers safe.
CACHE_DIR_ENV = "HPO_CACHE_DIR"
CACHE_OFF = ("off", "none", "0", "false")
CACHE_MAX_BYTES = 2 * 1024**3
# Every program is written, the tiny eager ops Keras compiles while it builds a model too:
# with a threshold of 0.1 s a second process still compiled 19 programs of the reference
# LSTM (1.6 s to its first epoch's end against 1.2-1.4 s with none; 50 files, 336 KB).
CACHE_MIN_COMPILE_SECONDS = 0.0

_cache_dir: Path | None = None
_cache_configured = False


def user_cache_dir() -> Path:
    """hpo's folder in the user's cache folder: `$XDG_CACHE_HOME/hpo`, else `~/.cache/hpo`."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "hpo"


def compilation_cache_dir() -> Path | None:
    """Where compiled programs are kept: `$HPO_CACHE_DIR`, else `jax` in `user_cache_dir()`;
    None when `HPO_CACHE_DIR=off`."""
    value = os.environ.get(CACHE_DIR_ENV, "").strip()
    if value.lower() in CACHE_OFF:
        return None
    if value:
        return Path(value).expanduser()
    return user_cache_dir() / "jax"


def use_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at `compilation_cache_dir()` (once per
    process; JAX is imported) and return the folder, or None where it is off or the
    folder cannot be created (then every process compiles for itself, as without it)."""
    global _cache_dir, _cache_configured
    if _cache_configured:
        return _cache_dir
    _cache_configured = True
    path = compilation_cache_dir()
    if path is None or importlib.util.find_spec("filelock") is None:
        # Without filelock JAX can neither bound the cache nor lock it for concurrent writers.
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.stderr.write(f"warning: compilation cache off: cannot create {path} ({e.strerror}); "
                         f"set {CACHE_DIR_ENV} to a writable folder, or {CACHE_DIR_ENV}=off\n")
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _cache_dir = path
    return path


def available_cores() -> int:
    """Cores this process may run on (what `--workers auto` starts one worker per)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_determinism_configured = False


def configure_determinism(backend: str) -> None:
    """Import Keras and, on TensorFlow, import it quietly and make its ops deterministic
    (once per process), so a replay is exact; on JAX, use the persistent compilation cache
    (and leave TensorFlow unimported: `keep_tensorflow_unloaded`). Then `_freeze_imports`."""
    global _determinism_configured
    if _determinism_configured:
        return
    if backend != "tensorflow":
        import keras  # noqa: F401

        keep_tensorflow_unloaded()
        use_compilation_cache()
    else:
        import_tensorflow_quietly()
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    _freeze_imports()
    _determinism_configured = True


def _freeze_imports() -> None:
    """Move what the process holds now (the modules of JAX, Keras, TensorFlow, Optuna:
    some 300,000 objects) out of the garbage collector's sight, so each full collection
    (Python's own, and the one after every trial) scans what trials make, not them: one
    took 0.15 s, 0.01 s frozen. Garbage is collected first; a frozen object is still freed
    when its last reference goes, only a reference cycle among frozen objects is not."""
    import gc

    gc.collect()
    gc.freeze()


# The training threads `limit_threads` capped this process to (None: not capped).
_thread_cap: int | None = None


def thread_cap() -> int | None:
    """The training threads `limit_threads` capped this process to (None: not capped)."""
    return _thread_cap


# XLA's CPU client (JAX) reads its thread settings from XLA_FLAGS once, when JAX starts.
_XLA_THREAD_FLAGS = ("--xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads")


def limit_threads(threads: int) -> None:
    """Cap this process's training threads, JAX's (XLA_FLAGS) and TensorFlow's (and
    OpenMP's); call before either loads. XLA flags the user set already are kept."""
    global _thread_cap
    _thread_cap = threads
    for name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    flags = os.environ.get("XLA_FLAGS", "")
    if not any(f in flags for f in _XLA_THREAD_FLAGS):
        # One thread: Eigen's own pool off too, or it takes a thread per core anyway.
        ours = f"intra_op_parallelism_threads={threads}"
        if threads == 1:
            ours = f"--xla_cpu_multi_thread_eigen=false {ours}"
        os.environ["XLA_FLAGS"] = f"{flags} {ours}".strip()


def share_gpu() -> None:
    """Let this worker share its GPU with others (call before JAX starts).

    JAX takes 75% of a GPU's memory as a process starts, so a second worker on the same
    GPU failed every trial (cuSolver found no memory; seen on an H100 with `hpo run
    --workers 2`). A worker allocates as needed instead, unless the user set how; on a
    CPU this changes nothing.
    """
    if not {"XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION"} & set(os.environ):
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident memory in MB (this one by default; Linux, 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0
