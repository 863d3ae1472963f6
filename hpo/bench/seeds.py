"""Benchmark: a reference Keras model and seed counts in; wall times of one native Keras
fit, of R native fits one after another and of R replicas trained together (fresh and for a
repeated shape, fixed cost apart from per-epoch cost), their ratios and peak memory out.

Every ratio compares figures measured in the same process, one right after the other, so
they say more than the absolute seconds on a shared or throttled machine.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from hpo.errors import BackendError
from hpo.words import plural

# The models `hpo bench --model` can time: plain Keras models as a user would write them
# (none is a built-in family), on windows of the built-in noisy sine.
MODELS = {
    "lstm": "LSTM(32) + Dense(1), windows of 20 (the reference)",
    "conv1d": "Conv1D(32, 5) + Conv1D(32, 5) + GlobalAveragePooling1D + Dense(1), windows of 20",
    "embedding_gru": "Embedding(64, 16) + GRU(32) + Dense(1), the sine quantised to 64 tokens, windows of 20",
}


@dataclass
class BenchRow:
    """Figures for one seed count; `sequential_s` is None when it was skipped.

    `vectorized_s` trains R replicas of a shape this process has not compiled yet;
    `repeat_s` the same shape again with other seeds (what a later trial of a study pays).
    `fixed_s`/`fixed_repeat_s` are their costs beyond the epochs, `epoch_s` the median
    epoch. `peak_rss_mb` is the process's high-water mark after the vectorised fits.
    """

    seeds: int
    single_fit_s: float
    vectorized_s: float
    repeat_s: float
    fixed_s: float
    fixed_repeat_s: float
    epoch_s: float
    peak_rss_mb: float
    sequential_s: float | None = None

    @property
    def ratio_vectorized_to_single(self) -> float:
        return self.vectorized_s / self.single_fit_s

    @property
    def ratio_repeat_to_single(self) -> float:
        return self.repeat_s / self.single_fit_s

    @property
    def ratio_sequential_to_single(self) -> float | None:
        return None if self.sequential_s is None else self.sequential_s / self.single_fit_s


@dataclass
class BenchResult:
    """All rows of one `run_bench` call and the configuration they measured."""

    config: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """One object; per-seed-count figures are lists aligned with `seeds`."""
        names = [f for f in asdict(self.rows[0])] if self.rows else []
        out: dict[str, Any] = {"config": self.config}
        for name in names + ["ratio_vectorized_to_single", "ratio_repeat_to_single", "ratio_sequential_to_single"]:
            out[name] = [_round(getattr(row, name)) for row in self.rows]
        return out


def reference_data(model: str, samples: int = 1000) -> tuple[np.ndarray, ...]:
    """(x, y, x_val, y_val) for a bench model: windows of 20 of the built-in noisy sine."""
    from hpo.train.data import load_dataset
    from hpo.specs import DataSpec

    data = load_dataset(DataSpec(name="noisy_sine", window=20, n_samples=samples), window=20, sequence=True,
                        split_seed=0)
    x, xv = data.x_train, data.x_val
    if model == "embedding_gru":
        edges = np.linspace(x.min(), x.max(), 63)
        x, xv = np.digitize(x[..., 0], edges).astype("int32"), np.digitize(xv[..., 0], edges).astype("int32")
    return x, data.y_train, xv, data.y_val


def reference_builder(model: str, units: int = 32) -> Callable[[], Any]:
    """A function building and compiling the bench model (Adam 1e-3, MSE)."""
    import keras

    def build() -> Any:
        if model == "embedding_gru":
            inputs = keras.Input((20,), dtype="int32")
            h = keras.layers.GRU(units)(keras.layers.Embedding(64, 16)(inputs))
        elif model == "conv1d":
            inputs = keras.Input((20, 1))
            h = keras.layers.Conv1D(units, 5, activation="relu")(inputs)
            h = keras.layers.GlobalAveragePooling1D()(keras.layers.Conv1D(units, 5, activation="relu")(h))
        else:
            inputs = keras.Input((20, 1))
            h = keras.layers.LSTM(units)(inputs)
        net = keras.Model(inputs, keras.layers.Dense(1)(h))
        net.compile(keras.optimizers.Adam(1e-3), "mse", metrics=["mae"])
        return net

    return build


def run_bench(seed_counts: list[int], *, model: str = "lstm", epochs: int = 20, samples: int = 1000,
              units: int = 32, sequential: bool = True, echo: Any = None) -> BenchResult:
    """Time the bench model for each seed count (batch 32, no early stopping).

    Args:
        seed_counts: R values, e.g. [1, 5, 30].
        model: A name from `MODELS`.
        epochs: Epochs of every fit.
        samples: Points of the noisy sine (shrink for a smoke test).
        units: Width of the recurrent or convolutional layers.
        sequential: Also time R native fits one after another (the slowest part).
        echo: Called with a progress line per measurement, if given.
    """
    from hpo.backend import use_backend
    from hpo.backend import configure_determinism
    from hpo.train.fit import release_memory

    backend = use_backend()
    if backend != "jax":
        raise BackendError(f"hpo bench times the vectorised JAX engine; this process runs {backend} "
                           "(unset HPO_BACKEND or set it to jax)")
    # A cache of its own, empty: "a new shape" is one no process has compiled yet.
    os.environ["HPO_CACHE_DIR"] = tempfile.mkdtemp(prefix="hpo-bench-cache-")
    configure_determinism(backend)
    build = reference_builder(model, units)
    data = reference_data(model, samples)
    result = BenchResult(config={"model": model, "description": MODELS[model], "samples": samples,
                                 "units": units, "batch_size": 32, "epochs": epochs, "early_stopping": False,
                                 "backend": backend, "device": _device(backend), "versions": _versions(),
                                 "cpus": os.cpu_count(),
                                 "load_average_at_start": round(os.getloadavg()[0], 2)})
    say = echo or (lambda line: None)
    # A throwaway fit first, so that no measurement pays for the framework's start-up.
    _time_native_fit(build, data, 1, seed=0)
    release_memory()
    for r in seed_counts:
        # The single fit runs right before the replicas, so their ratio sees the same load.
        single = _time_native_fit(build, data, epochs, seed=0)
        release_memory()
        say(f"R={r}: one native fit {single:.2f} s")
        fresh = _time_replicas(build, data, epochs, list(range(r)), clear=True)
        repeat = _time_replicas(build, data, epochs, list(range(1000, 1000 + r)), clear=False)
        release_memory()
        say(f"R={r}: {plural(r, 'replica')} together {fresh[0]:.2f} s, again with other seeds {repeat[0]:.2f} s")
        result.rows.append(BenchRow(r, single, fresh[0], repeat[0], fresh[1], repeat[1], repeat[2], _peak_rss_mb()))
    for row in result.rows if sequential else []:
        row.sequential_s = sum(_time_native_fit(build, data, epochs, seed=s) for s in range(row.seeds))
        release_memory()
        say(f"R={row.seeds}: {plural(row.seeds, 'native fit')} one after another {row.sequential_s:.2f} s")
    # Other processes on the machine skew every figure; the load says how much to trust them.
    result.config["load_average_at_end"] = round(os.getloadavg()[0], 2)
    return result


def format_table(result: BenchResult) -> str:
    """The rows as a fixed-width table."""
    # The README's column names and cell formats: a figure reads the same in both.
    head = ["seeds", "one native fit", "R native fits", "R replicas, new shape", "R replicas, shape seen before",
            "R native / one", "new / one", "seen / one", "fixed cost, new / seen", "per epoch", "peak RSS MB"]
    rows = []
    for row in result.rows:
        seq = "-" if row.sequential_s is None else f"{row.sequential_s:.2f} s"
        seq_ratio = "-" if row.ratio_sequential_to_single is None else f"{row.ratio_sequential_to_single:.2f}x"
        rows.append([str(row.seeds), f"{row.single_fit_s:.2f} s", seq, f"{row.vectorized_s:.2f} s",
                     f"{row.repeat_s:.2f} s", seq_ratio, f"{row.ratio_vectorized_to_single:.2f}x",
                     f"{row.ratio_repeat_to_single:.2f}x", f"{row.fixed_s:.2f} s / {row.fixed_repeat_s:.3f} s",
                     f"{row.epoch_s:.3f} s", f"{row.peak_rss_mb:.0f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in rows]
    c = result.config
    lines.append(f"({c.get('model')} on {c.get('device')}, {c.get('versions')}, {c.get('cpus')} CPUs, "
                 f"load average {c.get('load_average_at_start')} -> {c.get('load_average_at_end')})")
    return "\n".join(lines)


def _time_native_fit(build: Callable[[], Any], data: tuple, epochs: int, seed: int) -> float:
    """One native Keras fit as a user would write it: build, compile, one `fit` call,
    without hpo's persistent compilation cache (which would hand each new model's
    `fit` the programs of the one before)."""
    import jax
    import keras
    from jax.experimental.compilation_cache import compilation_cache

    x, y, xv, yv = data
    cache_dir = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    try:
        start = time.perf_counter()
        keras.utils.set_random_seed(seed)
        build().fit(x, y, batch_size=32, epochs=epochs, validation_data=(xv, yv), verbose=0)
        return time.perf_counter() - start
    finally:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        compilation_cache.reset_cache()


def _time_replicas(build: Callable[[], Any], data: tuple, epochs: int, seeds: list[int],
                   clear: bool) -> tuple[float, float, float]:
    """(wall seconds, fixed seconds, median epoch seconds) of R replicas for `epochs`."""
    from hpo.train import engine

    if clear:
        engine.clear_cache()
    start = time.perf_counter()
    replicas = engine.Replicas(build, seeds, *data, batch_size=32)
    epoch_times = []
    for _ in range(epochs):
        t = time.perf_counter()
        replicas.run_epoch(np.ones(len(seeds), bool))
        epoch_times.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    median = statistics.median(epoch_times)
    return wall, max(0.0, wall - epochs * median), median


def _device(backend: str) -> str:
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        kind = getattr(device, "device_kind", "")
        # A CPU's kind is "cpu" again; a GPU's names the card.
        return device.platform if kind in ("", device.platform) else f"{device.platform}: {kind}"
    return "cpu"


def _versions() -> str:
    import jax
    import keras

    return f"keras {keras.__version__}, jax {jax.__version__}"


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value
