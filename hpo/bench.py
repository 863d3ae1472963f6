"""Benchmark: a reference configuration and seed counts in; wall times of one native Keras
fit, of R sequential fits and of R replicas trained together, their ratios and peak memory out.

Every ratio compares figures measured in the same process, one right after the other, so
they say more than the absolute seconds on a shared or throttled machine.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from hpo.spec import StudySpec, parse_spec


@dataclass
class BenchRow:
    """Figures for one seed count; `sequential_s` is None when it was skipped.

    `peak_rss_mb` is the process's high-water mark right after the vectorised fit (single
    and vectorised fits of every R run first); `peak_rss_sequential_mb` after the R
    sequential fits, which run last because they hold R models at once.
    """

    seeds: int
    single_fit_s: float
    vectorized_s: float
    peak_rss_mb: float
    sequential_s: float | None = None
    peak_rss_sequential_mb: float | None = None

    @property
    def ratio_vectorized_to_single(self) -> float:
        return self.vectorized_s / self.single_fit_s

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
        def column(name: str) -> list[Any]:
            return [_round(getattr(row, name)) for row in self.rows]

        return {
            "config": self.config,
            "seeds": column("seeds"),
            "single_fit_s": column("single_fit_s"),
            "sequential_s": column("sequential_s"),
            "vectorized_s": column("vectorized_s"),
            "ratio_vectorized_to_single": column("ratio_vectorized_to_single"),
            "ratio_sequential_to_single": column("ratio_sequential_to_single"),
            "peak_rss_mb": column("peak_rss_mb"),
            "peak_rss_sequential_mb": column("peak_rss_sequential_mb"),
        }


def reference_spec(*, epochs: int = 20, samples: int = 1000, units: int = 32) -> StudySpec:
    """The reference configuration: built-in `noisy_sine`, windows of 20, one LSTM layer,
    batch 32, Adam 1e-3, early stopping off."""
    return parse_spec({
        "name": "bench",
        "data": {"name": "noisy_sine", "window": 20, "n_samples": samples},
        "model": {"family": "lstm", "output": "regression"},
        "training": {"max_epochs": epochs, "patience": epochs},
        "pruner": {"kind": "none"},
        "space": {"units": units, "layers": 1, "batch_size": 32, "optimizer": "adam", "learning_rate": 1e-3},
    }, source="<bench>")


def run_bench(seed_counts: list[int], *, epochs: int = 20, samples: int = 1000, units: int = 32,
              sequential: bool = True, echo: Any = None) -> BenchResult:
    """Time the reference configuration for each seed count.

    Args:
        seed_counts: R values, e.g. [1, 5, 30].
        epochs: Epochs of every fit (no early stopping).
        samples: Points of the noisy sine (shrink for a smoke test).
        units: LSTM width.
        sequential: Also time R sequential native fits, as hpo's sequential path runs them
            (one Keras `fit` call per seed and epoch, in lock-step); the slowest part.
        echo: Called with a progress line per measurement, if given.
    """
    from hpo.space import default_params
    from hpo.training import configure_determinism, fit_repeats, release_memory

    spec = reference_spec(epochs=epochs, samples=samples, units=units)
    params = default_params(spec) | {name: p.value for name, p in spec.space.items()}
    configure_determinism()
    result = BenchResult(config={"data": "noisy_sine", "samples": samples, "window": 20, "family": "lstm",
                                 "units": units, "batch_size": 32, "optimizer": "adam", "learning_rate": 1e-3,
                                 "epochs": epochs, "early_stopping": False,
                                 "cpus": os.cpu_count(), "load_average_at_start": round(os.getloadavg()[0], 2)})
    say = echo or (lambda line: None)
    # A throwaway fit first, so that no measurement pays for TensorFlow's one-off start-up.
    _time_single_fit(dataclasses.replace(spec, training=dataclasses.replace(spec.training, max_epochs=1)), params)
    release_memory()
    for r in seed_counts:
        # The single fit runs right before the replicas, so their ratio sees the same load.
        single = _time_single_fit(spec, params)
        release_memory()
        say(f"R={r}: one native fit {single:.2f} s")
        start = time.perf_counter()
        fit_repeats(spec, params, dataclasses.replace(spec, seeds=r).seed_values, path="vectorized")
        vectorized = time.perf_counter() - start
        release_memory()
        say(f"R={r}: {r} replicas together {vectorized:.2f} s")
        result.rows.append(BenchRow(r, single, vectorized, _peak_rss_mb()))
    for row in result.rows if sequential else []:
        start = time.perf_counter()
        fit_repeats(spec, params, dataclasses.replace(spec, seeds=row.seeds).seed_values, path="sequential")
        row.sequential_s = time.perf_counter() - start
        release_memory()
        row.peak_rss_sequential_mb = _peak_rss_mb()
        say(f"R={row.seeds}: {row.seeds} sequential fits {row.sequential_s:.2f} s")
    # Other processes on the machine skew every figure; the load says how much to trust them.
    result.config["load_average_at_end"] = round(os.getloadavg()[0], 2)
    return result


def format_table(result: BenchResult) -> str:
    """The rows as a fixed-width table."""
    lines = [f"{'seeds':>5}  {'single fit s':>12}  {'sequential s':>12}  {'vectorized s':>12}  "
             f"{'seq/single':>10}  {'vec/single':>10}  {'peak RSS MB':>11}  {'+ sequential':>12}"]
    for row in result.rows:
        seq = "-" if row.sequential_s is None else f"{row.sequential_s:.2f}"
        seq_ratio = "-" if row.ratio_sequential_to_single is None else f"{row.ratio_sequential_to_single:.2f}x"
        seq_rss = "-" if row.peak_rss_sequential_mb is None else f"{row.peak_rss_sequential_mb:.0f}"
        lines.append(f"{row.seeds:>5}  {row.single_fit_s:>12.2f}  {seq:>12}  {row.vectorized_s:>12.2f}  "
                     f"{seq_ratio:>10}  {row.ratio_vectorized_to_single:>9.2f}x  {row.peak_rss_mb:>11.0f}  "
                     f"{seq_rss:>12}")
    load = f"load average {result.config.get('load_average_at_start')} -> {result.config.get('load_average_at_end')}"
    lines.append(f"({result.config.get('cpus')} CPUs, {load})")
    return "\n".join(lines)


def _time_single_fit(spec: StudySpec, params: dict[str, Any]) -> float:
    """One native Keras fit as a user would write it: build, compile, one `fit` call for all
    epochs (cheaper than the per-epoch calls of the lock-step path, so the harder baseline)."""
    import keras

    from hpo.data import load_dataset
    from hpo.models import build_model, compile_model

    data = load_dataset(spec.data, window=params["window"])
    start = time.perf_counter()
    keras.utils.set_random_seed(spec.seed)
    model = build_model(params, data.input_shape, family=spec.model.family, output=spec.output,
                        n_outputs=data.n_outputs)
    compile_model(model, params, output=spec.output, steps_per_epoch=-(-len(data.x_train) // params["batch_size"]))
    model.fit(data.x_train, data.y_train, batch_size=params["batch_size"], epochs=spec.training.max_epochs,
              validation_data=(data.x_val, data.y_val), verbose=0)
    return time.perf_counter() - start


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value
