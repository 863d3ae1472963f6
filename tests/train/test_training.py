import math

import pytest

from hpo.errors import TrialDiverged
from hpo.specs import parse_spec
from hpo.specs.space import default_params
from hpo.train.fit import EarlyStopper, fit_repeats


def tiny_spec(**training):
    return parse_spec({
        "name": "tiny", "seeds": 2, "seed": 3,
        "data": {"name": "noisy_sine", "n_samples": 120, "window": 5},
        "model": {"family": "lstm"},
        "training": {"max_epochs": 4, "patience": 1, **training},
        "space": {"units": 4, "batch_size": 16},
    })


def test_early_stopper_keeps_the_best_epoch_score():
    # Keras' rule: stop once `patience` epochs in a row brought no improvement.
    s = EarlyStopper("minimize", patience=2, min_delta=0.0)
    for v in (3.0, 2.0, 2.5, 2.4):
        assert not s.stopped
        s.update(v)
    assert s.stopped and (s.best, s.best_epoch, s.epochs_run) == (2.0, 2, 4)
    m = EarlyStopper("maximize", patience=0, min_delta=0.1)
    m.update(0.5)
    m.update(0.55)  # not better by min_delta
    assert m.stopped and m.best == 0.5


@pytest.mark.parametrize("path", ["sequential", "vectorized"])
def test_seeds_train_in_lock_step_and_report_their_scores_so_far_each_epoch(path):
    spec = tiny_spec()
    seen = []
    fit = fit_repeats(spec, default_params(spec) | {"units": 4, "batch_size": 16}, spec.seed_values,
                      lambda epoch, scores: seen.append((epoch, scores)) and False, path=path)
    # Epochs count from 1, as the stored curves and best epochs do.
    assert [e for e, _ in seen] == list(range(1, len(seen) + 1)) and 1 <= len(seen) <= 4
    assert fit.path == path and len(fit.fits) == 2
    for f in fit.fits:
        assert f.score == min(f.curves["val_loss"]) and f.curves["val_loss"][f.best_epoch - 1] == f.score
        assert len(f.curves["loss"]) == f.epochs_run
    for epoch, scores in seen:
        assert scores == pytest.approx([min(f.curves["val_loss"][:epoch]) for f in fit.fits])
    assert seen[-1][1] == pytest.approx(fit.scores)
    assert fit.mean == pytest.approx(sum(fit.scores) / 2)


def test_same_seed_same_scores_other_seed_other_scores():
    spec = tiny_spec()
    params = default_params(spec) | {"units": 4, "batch_size": 16}
    a = fit_repeats(spec, params, [11, 12])
    b = fit_repeats(spec, params, [11])
    assert a.fits[0].score == b.fits[0].score  # a seed's fit does not depend on its neighbours
    assert a.fits[0].score != a.fits[1].score


def test_returning_true_prunes_after_that_epoch():
    spec = tiny_spec(patience=10)
    fit = fit_repeats(spec, default_params(spec) | {"units": 4, "batch_size": 16}, [1, 2],
                      lambda epoch, scores: epoch == 2)
    assert fit.pruned_at_epoch == 2 and all(f.epochs_run == 2 for f in fit.fits)


def test_a_diverging_fit_raises_with_the_seed_and_epoch():
    spec = tiny_spec()
    params = default_params(spec) | {"units": 4, "batch_size": 16, "optimizer": "sgd", "learning_rate": 1e4,
                                     "activation": "relu"}
    with pytest.raises(TrialDiverged, match=r"seed \d+: (val_)?loss became (nan|inf)"):
        fit_repeats(spec, params, [1])


def test_analytic_family_runs_the_machinery_without_training():
    spec = parse_spec({"name": "b", "model": {"family": "analytic", "function": "beale", "noise": 0.1},
                       "training": {"max_epochs": 8, "patience": 1}, "space": {"x": {"low": -4.5, "high": 4.5},
                                                                               "y": {"low": -4.5, "high": 4.5}}})
    fit = fit_repeats(spec, {"x": 3.0, "y": 0.5}, [0, 1, 2])
    assert fit.path == "analytic" and len(set(fit.scores)) == 3
    assert abs(fit.mean) < 1.0 and all(math.isfinite(s) for s in fit.scores)


def test_stateful_lstm_trains_with_fixed_batches():
    spec = parse_spec({
        "name": "s", "seeds": 1, "data": {"name": "noisy_sine", "n_samples": 120, "window": 5},
        "model": {"family": "lstm", "stateful": True}, "training": {"max_epochs": 2},
        "space": {"units": 4, "batch_size": 8}})
    fit = fit_repeats(spec, default_params(spec) | {"units": 4, "batch_size": 8}, [5])
    assert fit.fits[0].epochs_run == 2 and math.isfinite(fit.fits[0].score)


def test_a_process_cannot_switch_the_backend_keras_loaded_with():
    import keras

    from hpo.backend import use_backend
    from hpo.errors import BackendError

    other = "tensorflow" if keras.backend.backend() == "jax" else "jax"
    with pytest.raises(BackendError, match=f"already loaded Keras with the {keras.backend.backend()} backend"):
        use_backend(other)


@pytest.mark.parametrize("how", ["spec", "environment"])
def test_the_tensorflow_backend_trains_one_model_per_seed(how, tmp_path):
    # A study (or HPO_BACKEND) picks the backend before Keras loads in the worker process;
    # TensorFlow trains each seed as its own Keras model.
    import json
    import sqlite3

    from tests.conftest import run_hpo

    study = tmp_path / "tf.toml"
    backend_line = 'backend = "tensorflow"' if how == "spec" else ""
    study.write_text(f"""
name = "tf"
seeds = 2
[data]
name = "noisy_sine"
n_samples = 120
window = 5
[model]
family = "gru"
[training]
max_epochs = 2
{backend_line}
[space]
units = 4
batch_size = 16
""")
    db = tmp_path / "tf.db"
    env = {"HPO_BACKEND": "tensorflow"} if how == "environment" else {"HPO_BACKEND": "jax"}
    run_hpo("run", str(study), "--trials", "1", "--storage", f"sqlite:///{db}", env=env)
    conn = sqlite3.connect(db)
    attrs = dict(conn.execute("SELECT key, value_json FROM trial_user_attributes").fetchall())
    conn.close()
    assert json.loads(attrs["backend"]) == "tensorflow" and json.loads(attrs["training_path"]) == "sequential"
    assert len(json.loads(attrs["seed_scores"])) == 2


def test_fit_seconds_leave_out_the_pruners_time():
    # The per-epoch callback talks to the database (report, should_prune); an outage there
    # is not fit time.
    import time

    spec = parse_spec({"name": "b", "model": {"family": "analytic", "function": "sphere"},
                       "training": {"max_epochs": 3, "patience": 5},
                       "space": {"x": {"low": -1.0, "high": 1.0}}})
    waited = []

    def slow_pruner(epoch, value):
        start = time.perf_counter()
        time.sleep(0.4)
        waited.append(time.perf_counter() - start)
        return False

    fit = fit_repeats(spec, {"x": 0.5}, [0, 1], slow_pruner)
    # Counted, the pruner's time alone would make fit_seconds at least its sum.
    assert len(fit.epoch_seconds) == 3 and fit.fit_seconds < sum(waited)


def test_the_sequential_path_goes_on_when_an_earlier_seed_has_stopped():
    # Seed 5 stops after 2 epochs, seed 6 trains all 6 (patience 0, metric val_mae): the
    # stopped seed's missing logs must not shift the metric column of the one training on.
    spec = parse_spec({"name": "c", "seeds": 2, "metric": "val_mae",
                       "data": {"name": "noisy_sine", "n_samples": 120, "window": 5},
                       "model": {"family": "mlp"}, "training": {"max_epochs": 6, "patience": 0},
                       "space": {"units": 4, "batch_size": 16}})
    params = default_params(spec) | {"units": 4, "batch_size": 16, "learning_rate": 0.05}
    vectorized = fit_repeats(spec, params, [5, 6], path="vectorized")
    sequential = fit_repeats(spec, params, [5, 6], path="sequential")
    assert [f.epochs_run for f in vectorized.fits] == [f.epochs_run for f in sequential.fits] == [2, 6]
    for a, b in zip(vectorized.fits, sequential.fits):
        assert a.curves["val_metric"] == pytest.approx(b.curves["val_metric"], rel=1e-4)


def test_jax_caches_are_cleared_between_trials_once_memory_has_grown_and_trials_are_unchanged(monkeypatch):
    # JAX's staging caches fill with every shape a study meets; between trials, once the
    # process has grown JAX_CACHE_GROWTH_MB past its floor, they are cleared. A trial after
    # a clear scores exactly what it scored before.
    from hpo.train import fit as fit_module

    spec = tiny_spec()
    params = default_params(spec) | {"units": 4, "batch_size": 16}
    before = fit_repeats(spec, params, [11, 12]).scores
    readings, cleared = [], []
    monkeypatch.setattr(fit_module, "rss_mb", lambda: readings.pop(0))
    monkeypatch.setattr(fit_module, "_clear_jax_staging",
                        lambda real=fit_module._clear_jax_staging: (cleared.append(True), real()))
    monkeypatch.setattr(fit_module, "_floor_mb", None)
    grow = fit_module.JAX_CACHE_GROWTH_MB
    # The floor, a little growth, past the limit (cleared), still past it after the clear
    # (the new floor, not a clear every trial), then past the new floor.
    for rss, clears in [(500, 0), (500 + grow / 2, 0), (501 + grow, 1), (502 + grow, 1), (503 + 2 * grow, 2)]:
        readings.append(rss)
        staged = _jax_staged()
        fit_module.release_memory()
        assert len(cleared) == clears, (rss, cleared)
        if clears and rss == 501 + grow:
            assert _jax_staged() < staged / 2, "the installed JAX kept its staging caches"
        assert fit_repeats(spec, params, [11, 12]).scores == before


def _jax_staged() -> int:
    """Entries in JAX's Python-side caches (what the clear between trials empties)."""
    from jax._src import util

    return sum(c.cache_info().currsize for c in util._caches if hasattr(c, "cache_info"))


def test_a_trial_built_ahead_keeps_its_compiled_program_through_the_clear(monkeypatch):
    # A program compiled but not yet run lives only in the staging a clear drops: with
    # ask-ahead the clear comes before the next trial is built, and not between the
    # trial that runs meanwhile and the one built ahead, which then compiles nothing.
    from hpo.train import fit as fit_module
    from hpo.train.engine import CompileClock

    spec = tiny_spec()
    params = default_params(spec) | {"units": 5, "batch_size": 16}
    cleared = []
    monkeypatch.setattr(fit_module, "rss_mb", lambda: 500 + 2 * fit_module.JAX_CACHE_GROWTH_MB)
    monkeypatch.setattr(fit_module, "_floor_mb", 500)
    monkeypatch.setattr(fit_module, "_just_cleared", False)
    monkeypatch.setattr(fit_module, "_clear_jax_staging",
                        lambda real=fit_module._clear_jax_staging: (cleared.append(True), real()))
    fit_module.prepare(spec, params, [21, 22], fit_module.keras_settings())
    assert cleared == [True]  # grown: cleared before the build
    monkeypatch.setattr(fit_module, "_floor_mb", 500)
    fit_module.release_memory()  # the trial that ran meanwhile ends
    assert cleared == [True]  # not again while a trial built ahead waits
    clock = CompileClock.now()
    fit = fit_repeats(spec, params, [21, 22])
    assert fit.prepared_seconds is not None and clock.since().programs == 0


def test_a_trial_that_ends_while_the_next_one_builds_ahead_does_not_wait_for_that_build(monkeypatch):
    # The build ahead holds Keras' lock; the trial that ends meanwhile leaves its release
    # (clear_session, a collection) to the next fit, which takes the lock anyway, so the
    # wait for a build is the trial's that was built.
    import threading
    import time

    import keras

    from hpo.train import fit as fit_module

    spec = tiny_spec()
    params = default_params(spec) | {"units": 4, "batch_size": 16}
    fit_repeats(spec, params, [1, 2])
    cleared = []
    monkeypatch.setattr(keras.backend, "clear_session",
                        lambda real=keras.backend.clear_session, **kw: (cleared.append(True), real(**kw)))
    building, built = threading.Event(), threading.Event()

    def build() -> None:  # what `prepare` holds while it builds and compiles
        with fit_module._keras_lock:
            building.set()
            built.wait(60)

    builder = threading.Thread(target=build)
    builder.start()
    assert building.wait(60)
    start = time.perf_counter()
    fit_module.release_memory()
    assert time.perf_counter() - start < 1.0 and cleared == []
    built.set()
    builder.join()
    fit_repeats(spec, params, [1, 2])
    assert cleared == [True]  # done by the next fit, before it built anything


def test_settling_waits_for_the_trim_asked_after_a_trial():
    import threading
    import time

    from hpo.train.fit import _Trimmer

    started, release, trimmed = threading.Event(), threading.Event(), []

    def slow_trim(pad):
        started.set()
        release.wait(10)
        trimmed.append(pad)

    trimmer = _Trimmer(slow_trim)
    trimmer.ask()
    assert started.wait(10)
    t0 = time.monotonic()
    trimmer.settle(timeout=0.2)  # the trim is still running: settle gives up at its timeout
    assert not trimmed and time.monotonic() - t0 >= 0.2
    threading.Timer(0.1, release.set).start()
    trimmer.settle(timeout=10)  # ... and returns once the trim has run
    assert trimmed == [0]
