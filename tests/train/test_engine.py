"""The vectorised engine against plain Keras: every replica is the fit `model.fit` gives
under its seed, whatever the model."""

import keras
import numpy as np
import pytest

from hpo.errors import TrialDiverged
from hpo.specs import parse_spec
from hpo.specs.space import default_params
from hpo.train import engine, initial
from hpo.train.fit import _lock_step, fit_repeats

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="the vectorised engine runs on JAX; "
                                                                          "this suite runs on HPO_BACKEND=tensorflow")

if keras.backend.backend() == "jax":
    import jax

    if jax.default_backend() == "gpu":
        # On a GPU, float32 matmuls default to TF32, whose rounding depends on the batch
        # shapes (R replicas against one model): compare at full precision there.
        jax.config.update("jax_default_matmul_precision", "highest")

STEPS, N_TRAIN, N_VAL = 6, 83, 29  # 83 = 2 batches of 32 and a short one of 19, as model.fit makes


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN + N_VAL, STEPS, 2)).astype("float32")
    y = (x[:, :, 0].sum(axis=1, keepdims=True) * 0.3).astype("float32")
    tokens = rng.integers(0, 30, size=(N_TRAIN + N_VAL, STEPS)).astype("int32")
    return {"x": x[:N_TRAIN], "y": y[:N_TRAIN], "xv": x[N_TRAIN:], "yv": y[N_TRAIN:],
            "tokens": tokens[:N_TRAIN], "tokens_v": tokens[N_TRAIN:]}


def builder(kind: str, dropout: float = 0.0):
    def build():
        if kind == "embedding":
            inputs = keras.Input((STEPS,), dtype="int32")
            h = keras.layers.GRU(5)(keras.layers.Embedding(30, 4)(inputs))
        else:
            inputs = keras.Input((STEPS, 2))
            h = {"dense": lambda: keras.layers.Dense(6, activation="relu")(keras.layers.Flatten()(inputs)),
                 "lstm": lambda: keras.layers.LSTM(5)(inputs),
                 "gru": lambda: keras.layers.GRU(5)(inputs),
                 "simple_rnn": lambda: keras.layers.SimpleRNN(5)(inputs),
                 # The cells' own dropout: masks drawn in validation too, as fit draws them.
                 "lstm_cell_dropout": lambda: keras.layers.LSTM(5, dropout=0.3, recurrent_dropout=0.2)(inputs),
                 "gru_cell_dropout": lambda: keras.layers.GRU(5, dropout=0.3, recurrent_dropout=0.2)(inputs),
                 "conv1d": lambda: keras.layers.GlobalAveragePooling1D()(
                     keras.layers.Conv1D(4, 3, activation="relu")(inputs))}[kind]()
        if dropout:
            h = keras.layers.Dropout(dropout)(h)
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
        model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
        return model
    return build


def inputs_for(kind, arrays):
    if kind == "embedding":
        return arrays["tokens"], arrays["tokens_v"]
    return arrays["x"], arrays["xv"]


def native(build):
    """`build()` as plain Keras fits it, but for cuDNN's fused RNN kernel on a GPU: the
    replicas take Keras' generic RNN (vmap cannot batch cuDNN), which rounds differently."""
    model = build()
    initial.disable_cudnn(model)
    return model


def native_history(build, seed, x, y, xv, yv, epochs, batch_size=32):
    keras.utils.set_random_seed(seed)
    return native(build).fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, validation_data=(xv, yv),
                       verbose=0).history


@pytest.mark.parametrize("kind, dropout", [("dense", 0.0), ("lstm", 0.0), ("gru", 0.0), ("simple_rnn", 0.0),
                                           ("conv1d", 0.0), ("embedding", 0.0), ("dense", 0.4), ("lstm", 0.3),
                                           ("lstm_cell_dropout", 0.0), ("gru_cell_dropout", 0.0)])
def test_each_replica_is_the_native_fit_under_its_seed(kind, dropout, arrays):
    # The same batches in the same order, the short last batch included, and (with
    # dropout) the same masks: curves agree with plain model.fit to float precision.
    build, seeds, epochs = builder(kind, dropout), [7, 8, 9], 3
    x, xv = inputs_for(kind, arrays)
    replicas = engine.Replicas(build, seeds, x, arrays["y"], xv, arrays["yv"], batch_size=32)
    logs = [replicas.run_epoch(np.ones(3, bool)) for _ in range(epochs)]
    for r, seed in enumerate(seeds):
        history = native_history(build, seed, x, arrays["y"], xv, arrays["yv"], epochs)
        for key in ("loss", "mae", "val_loss", "val_mae"):
            np.testing.assert_allclose([e[key][r] for e in logs], history[key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{kind} seed {seed} {key}")


def test_initial_weights_are_the_native_models(arrays):
    build, seeds = builder("lstm", 0.2), [3, 41, 1000007]
    engine.clear_cache()
    replicas = engine.Replicas(build, seeds, arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=32)
    # Re-drawn from the initializers, not built natively seed by seed (the cost at many seeds).
    assert [p.draws is not None for p in engine._programs.values()] == [True]
    for r, seed in enumerate(seeds):
        keras.utils.set_random_seed(seed)
        native = build().get_weights()
        assert all(np.array_equal(a, b) for a, b in zip(native, replicas.weights(r)))
    assert not np.array_equal(replicas.weights(0)[0], replicas.weights(1)[0])


def test_many_seeds_draw_the_native_weights_in_one_batched_call(arrays, monkeypatch):
    monkeypatch.setattr(initial, "_BATCHED_DRAWS_FROM", 2)
    build, seeds = builder("gru", 0.2), [8, 77, 123456]
    engine.clear_cache()
    replicas = engine.Replicas(build, seeds, arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=32)
    assert [p.draws._batched_ok for p in engine._programs.values()] == [True]
    for r, seed in enumerate(seeds):
        keras.utils.set_random_seed(seed)
        assert all(np.array_equal(a, b) for a, b in zip(build().get_weights(), replicas.weights(r)))


class _ScaledInit(keras.layers.Layer):
    """A custom layer drawing its weights with NumPy: not traceable to Keras' seeds."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 3),
                                 initializer=lambda shape, dtype=None: np.random.normal(size=shape).astype("float32"))

    def call(self, x):
        return x @ self.w


def _numpy_initialised():
    inputs = keras.Input((STEPS, 2))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(_ScaledInit()(inputs))))
    model.compile("adam", "mse", metrics=["mae"])
    return model


def _overwritten_after_creation():
    inputs = keras.Input((STEPS, 2))
    dense = keras.layers.Dense(1)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.kernel.assign(np.random.normal(size=dense.kernel.shape))
    model.compile("adam", "mse")
    return model


@pytest.mark.parametrize("build", [_numpy_initialised, _overwritten_after_creation])
def test_weights_keras_did_not_draw_fall_back_to_native_builds(build, arrays):
    seeds = [5, 6]
    engine.clear_cache()
    replicas = engine.Replicas(build, seeds, arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=16)
    assert [p.draws for p in engine._programs.values()] == [None]
    for r, seed in enumerate(seeds):
        keras.utils.set_random_seed(seed)
        assert all(np.array_equal(a, b) for a, b in zip(build().get_weights(), replicas.weights(r)))


def test_a_replicas_fit_does_not_depend_on_its_neighbours(arrays):
    build = builder("gru", 0.3)
    alone = engine.Replicas(build, [21], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=32)
    among = engine.Replicas(build, [5, 21, 9], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=32)
    # Replica 3 diverges (its weights made huge): replica 2 must not notice.
    trainable = [np.array(v) for v in among.state[0]]
    trainable[0][2] *= 1e20
    among.state = (trainable, *among.state[1:])
    for _ in range(3):
        a, b = alone.run_epoch(np.ones(1, bool)), among.run_epoch(np.ones(3, bool))
        assert a["val_loss"][0] == pytest.approx(b["val_loss"][1], rel=1e-6)
    assert not b["val_loss"][2] == pytest.approx(b["val_loss"][1], rel=0.5)


def test_a_stopped_replica_stays_frozen(arrays):
    replicas = engine.Replicas(builder("lstm"), [1, 2], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"],
                               batch_size=32)
    replicas.run_epoch(np.ones(2, bool))
    frozen = [w.copy() for w in replicas.weights(1)]
    optimizer_state = [np.asarray(v[1]).copy() for v in replicas.state[2]]
    replicas.run_epoch(np.array([True, False]))
    assert all(np.array_equal(a, b) for a, b in zip(frozen, replicas.weights(1)))
    assert all(np.array_equal(a, np.asarray(v[1])) for a, v in zip(optimizer_state, replicas.state[2]))


def small_spec(**training):
    return parse_spec({"name": "e", "seeds": 2, "data": {"name": "noisy_sine", "n_samples": 140, "window": 6},
                       "model": {"family": "gru"}, "training": {"max_epochs": 6, "patience": 1, **training},
                       "space": {"units": 4, "batch_size": 16}})


def test_replicas_stop_early_on_their_own_and_keep_their_best_epoch():
    spec = small_spec()
    seeds = [1, 2, 3]
    reports = []
    fit = fit_repeats(spec, default_params(spec) | {"units": 4, "batch_size": 16, "learning_rate": 0.05}, seeds,
                      lambda epoch, scores: reports.append(scores) and False)
    assert fit.path == "vectorized" and fit.backend == "jax"
    for f in fit.fits:
        assert f.score == min(f.curves["val_loss"]) == f.curves["val_loss"][f.best_epoch - 1]
        assert f.epochs_run == len(f.curves["val_loss"])
    assert len({f.epochs_run for f in fit.fits}) > 1 or all(f.epochs_run == 6 for f in fit.fits)
    # Every pruning report holds each replica's best score so far; the last, its score.
    assert reports[-1] == pytest.approx(fit.scores)


def test_a_nan_in_one_replica_fails_the_trial_naming_that_seed(arrays):
    spec = small_spec()
    replicas = engine.Replicas(builder("dense"), [11, 12], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"],
                               batch_size=32)
    trainable = [np.array(v) for v in replicas.state[0]]
    trainable[0][1] = np.nan
    replicas.state = (trainable, *replicas.state[1:])
    with pytest.raises(TrialDiverged, match=r"^seed 12: loss became nan at epoch 1"):
        _lock_step(spec, [11, 12], replicas, None, "vectorized", "jax")


def test_scores_agree_with_plain_keras_fit_and_early_stopping():
    # What a user would run by hand: model.fit(..., shuffle=True, validation_data=...,
    # callbacks=[EarlyStopping(patience, restore_best_weights=True)]) under each seed,
    # scored by evaluating the restored weights. 20 seeds, with dropout.
    spec = parse_spec({"name": "plain", "seeds": 20, "data": {"name": "noisy_sine", "n_samples": 120, "window": 4},
                       "model": {"family": "mlp"}, "training": {"max_epochs": 8, "patience": 2},
                       "space": {"units": 8, "batch_size": 16, "dropout": 0.2}})
    params = default_params(spec) | {"units": 8, "batch_size": 16, "dropout": 0.2}
    fit = fit_repeats(spec, params, spec.seed_values)
    from hpo.train.data import load_dataset
    from hpo.train.fit import _compiled_builder

    data = load_dataset(spec.data, window=4, sequence=False, split_seed=spec.seed)
    build = _compiled_builder(spec, params, data, len(data.x_train))
    plain = []
    for seed in spec.seed_values:
        keras.utils.set_random_seed(seed)
        model = build()
        model.fit(data.x_train, data.y_train, epochs=8, batch_size=16, shuffle=True, verbose=0,
                  validation_data=(data.x_val, data.y_val),
                  callbacks=[keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)])
        plain.append(model.evaluate(data.x_val, data.y_val, batch_size=16, verbose=0)[0])
    np.testing.assert_allclose(fit.scores, plain, rtol=1e-4)


class _Scale(keras.layers.Layer):
    """A custom layer whose factor is not in its config, as quick custom layers often are."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor


def test_a_repeated_shape_reuses_its_compiled_program_but_a_custom_layer_never_shares_one(arrays):
    def build(factor=None, units=4):
        def make():
            inputs = keras.Input((STEPS, 2))
            h = keras.layers.Flatten()(inputs if factor is None else _Scale(factor)(inputs))
            model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(units)(h)))
            model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
            return model
        return make

    def program(make):
        engine.Replicas(make, [1], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=32)
        return engine._programs[engine._config_key(_built(make))]

    engine.clear_cache()
    assert program(build()) is program(build())  # same shape: one program
    assert program(build(units=5)) is not program(build(units=4))
    a = engine.Replicas(build(1.0), [1], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=32)
    b = engine.Replicas(build(3.0), [1], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=32)
    assert a.run_epoch(np.ones(1, bool))["loss"][0] != b.run_epoch(np.ones(1, bool))["loss"][0]
    assert len(engine._programs) <= engine._CACHE_SIZE


def test_a_full_program_cache_lets_the_least_recently_used_go(arrays, monkeypatch):
    # One program goes, not all: a study cycling through more shapes than the cache holds
    # keeps the ones it came back to.
    def make(units):
        def build():
            inputs = keras.Input((STEPS, 2))
            model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(units)(keras.layers.Flatten()(inputs))))
            model.compile(keras.optimizers.Adam(0.01), "mse")
            return model
        return build

    def program(units):
        engine.Replicas(make(units), [1], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=32)
        return engine._programs[engine._config_key(_built(make(units)))]

    engine.clear_cache()
    monkeypatch.setattr(engine, "_CACHE_SIZE", 2)
    first, second = program(3), program(5)
    assert program(3) is first  # used again: now the most recent
    program(6)
    assert program(3) is first
    assert program(5) is not second  # the least recently used went, and is compiled anew
    assert len(engine._programs) == 2
    # The models the programs keep count too: one too big for the budget stays alone.
    monkeypatch.setattr(engine, "_CACHE_BYTES", engine._variable_bytes(_built(make(6))))
    program(6)
    assert len(engine._programs) == 1


def _built(make):
    keras.utils.set_random_seed(1)
    return make()


_ONE_EPOCH = """
import numpy as np
from hpo.backend import use_backend
use_backend()
from hpo.backend import configure_determinism
configure_determinism("jax")
from hpo.train import engine
from tests.train.test_engine import builder
rng = np.random.default_rng(0)
x = rng.normal(size=(83, 6, 2)).astype("float32")
y = x[:, :, :1].sum(axis=1)
clock = engine.CompileClock.now()
engine.Replicas(builder("gru", 0.2), [1, 2], x, y, x[:29], y[:29], batch_size=32).run_epoch(np.ones(2, bool))
print(clock.since().compiles)
"""


def test_a_second_process_compiles_nothing_for_a_shape_the_first_compiled(tmp_path):
    # Workers, hpo confirm, hpo replay and re-runs are other processes: JAX's persistent
    # cache in HPO_CACHE_DIR hands them the programs the first one compiled.
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "HPO_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([sys.executable, "-c", _ONE_EPOCH], capture_output=True, text=True, env=env, cwd=ROOT,
                           check=True) for _ in range(2)]
    first, second = (int(r.stdout.split()[-1]) for r in runs)
    assert first > 0 and second == 0
    assert any((tmp_path / "cache").iterdir())
    off = subprocess.run([sys.executable, "-c", _ONE_EPOCH], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=env | {"HPO_CACHE_DIR": "off"})
    assert int(off.stdout.split()[-1]) > 0


def test_the_short_last_batch_costs_no_program_of_its_own(arrays):
    # 83 rows make batches of 32, 32 and 19; 64 rows two of 32: the same programs.
    def programs(n):
        engine.clear_cache()
        clock = engine.CompileClock.now()
        replicas = engine.Replicas(builder("lstm", 0.3), [1, 2], arrays["x"][:n], arrays["y"][:n], arrays["xv"],
                                   arrays["yv"], batch_size=32)
        replicas.run_epoch(np.ones(2, bool))
        return clock.since().programs

    assert programs(N_TRAIN) == programs(64)


def test_a_short_batch_padded_is_the_short_batch(arrays):
    # Loss, gradients (so the weights after the step) and every metric, weighted or not.
    build = builder("dense", 0.4)
    model = build()
    x, y = arrays["x"][:19], arrays["y"][:19]
    model._symbolic_build(data_batch=(x, y))
    assert engine._pads_short_batch(model)
    state = initial.variable_values(model)
    native_logs, native_state = model.train_step(state, (x, y))
    idx, weights = engine._batch(np.arange(19), 32, padded=True)
    logs, padded_state = engine._weighted_train_step(model, state, arrays["x"][idx], arrays["y"][idx], *weights)
    for key in native_logs:
        assert float(logs[key]) == pytest.approx(float(native_logs[key]), rel=1e-6)
    for a, b in zip(native_state[0], padded_state[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def knobbed_builder(dropout, noise, recurrent_dropout, l2, clipnorm, momentum, decay, gaussian_dropout=0.0):
    """A model with every kind of number the engine takes as an input of its program:
    dropout and noise rates, an RNN's dropouts, an L1L2 factor, clipping, momentum and a
    learning-rate schedule's rates."""
    def build():
        inputs = keras.Input((STEPS, 2))
        h = keras.layers.GaussianNoise(noise)(inputs)
        h = keras.layers.SpatialDropout1D(dropout)(h)
        h = keras.layers.LSTM(5, dropout=dropout, recurrent_dropout=recurrent_dropout,
                              kernel_regularizer=keras.regularizers.L1L2(l1=l2 / 2, l2=l2))(h)
        h = keras.layers.AlphaDropout(dropout / 2)(keras.layers.Dropout(dropout)(h))
        if gaussian_dropout:
            h = keras.layers.GaussianDropout(gaussian_dropout)(h)
        schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=3, decay_rate=decay)
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
        model.compile(keras.optimizers.SGD(schedule, momentum=momentum, clipnorm=clipnorm), "mse", metrics=["mae"])
        return model
    return build


def fit_and_compare(build, arrays, seeds=(7, 8), epochs=2):
    """Replicas of `build` for the seeds, checked against plain model.fit; the
    compilations the replicas cost."""
    clock = engine.CompileClock.now()
    replicas = engine.Replicas(build, list(seeds), arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], 32)
    logs = [replicas.run_epoch(np.ones(len(seeds), bool)) for _ in range(epochs)]
    cost = clock.since()
    for r, seed in enumerate(seeds):
        history = native_history(build, seed, arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], epochs)
        for key in ("loss", "val_loss", "val_mae"):
            np.testing.assert_allclose([e[key][r] for e in logs], history[key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"seed {seed} {key}")
    return cost


def test_trials_that_differ_only_in_dropout_regularisation_and_clipping_share_one_program(arrays):
    # The numbers are inputs of the compiled step, not constants: the second trial
    # compiles nothing (nor reads a program from the persistent cache), and each of its
    # replicas is still its own model.fit.
    engine.clear_cache()
    first = fit_and_compare(knobbed_builder(0.2, 0.1, 0.1, 1e-3, 0.7, 0.9, 0.9), arrays)
    second = fit_and_compare(knobbed_builder(0.35, 0.05, 0.25, 3e-3, 0.4, 0.5, 0.6), arrays)
    assert first.programs > 0
    assert second.programs == 0 and second.compiles == 0
    assert len(engine._programs) == 1
    # A rate of 0 takes another path in Keras (no mask is drawn): another program.
    third = fit_and_compare(knobbed_builder(0.0, 0.1, 0.1, 1e-3, 0.7, 0.9, 0.9), arrays, seeds=(7,))
    assert third.programs > 0


def test_a_number_keras_reads_as_a_plain_float_is_compiled_in(arrays, monkeypatch):
    # GaussianDropout takes math.sqrt of its rate in Python, so its rate cannot be an
    # input: offered as one anyway, it escapes, and the model compiles its numbers in,
    # one program per value, each still the native fit.
    from hpo.train import knobs

    monkeypatch.setitem(knobs._LAYER_KNOBS, "GaussianDropout", ("rate",))
    engine.clear_cache()
    fit_and_compare(knobbed_builder(0.2, 0.1, 0.1, 1e-3, 0.7, 0.9, 0.9, gaussian_dropout=0.3), arrays, seeds=(7,))
    other = fit_and_compare(knobbed_builder(0.2, 0.1, 0.1, 1e-3, 0.7, 0.9, 0.9, gaussian_dropout=0.1), arrays,
                            seeds=(7,))
    assert other.programs > 0
    assert len(engine._programs) == 2 and engine._numbers_compiled_in
    engine._numbers_compiled_in.clear()


def test_a_new_width_draws_its_initial_weights_without_compiling_a_draw_of_its_own(arrays):
    # JAX compiles a random draw per shape; the engine draws flat arrays of a few sizes,
    # so a second width compiles no draw (and the weights are still the native ones:
    # test_initial_weights_are_the_native_models).
    from jax._src import dispatch

    compiled = []

    def on_duration(event, seconds, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        for units in (9, 11):
            compiled.clear()

            def build(units=units):
                inputs = keras.Input((STEPS, 2))
                model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.LSTM(units)(inputs)))
                model.compile(keras.optimizers.Adam(0.01), "mse")
                return model

            engine.Replicas(build, [1, 2], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], batch_size=32)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    assert not [name for name in compiled if "uniform" in name or "normal" in name], compiled


def test_a_new_shapes_train_and_test_steps_compile_side_by_side(arrays):
    # Where there is a second core, the two programs of a new shape compile on two
    # threads at once, and the clock counts their wall time once.
    import threading
    import time

    from jax._src import dispatch

    from hpo.backend import available_cores

    threads = {}

    def on_duration(event, seconds, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT and kwargs.get("fun_name") in ("jit(train_batch)",
                                                                                    "jit(test_batch)"):
            threads[kwargs["fun_name"]] = threading.get_ident()

    engine.clear_cache()
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        replicas = engine.Replicas(builder("gru", 0.2), [1, 2], arrays["x"], arrays["y"], arrays["xv"], arrays["yv"],
                                   batch_size=32)
        clock = engine.CompileClock.now()
        start = time.perf_counter()
        replicas.run_epoch(np.ones(2, bool))
        wall = time.perf_counter() - start
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    assert set(threads) == {"jit(train_batch)", "jit(test_batch)"}
    side_by_side = threads["jit(train_batch)"] != threads["jit(test_batch)"]
    assert side_by_side == (available_cores() >= 2)
    assert clock.since().seconds <= wall


def _family_builder(family, units, **params):
    from hpo.train.models import build_model, compile_model
    from hpo.specs import DEFAULT_PARAMS

    params = dict(DEFAULT_PARAMS, layers=2, units=units, **params)

    def build():
        model = build_model(params, (STEPS, 2), family=family, output="regression", n_outputs=1)
        compile_model(model, params, output="regression", steps_per_epoch=3)
        return model
    return build


@pytest.mark.parametrize("family, params", [("lstm", dict(dropout=0.3, recurrent_dropout=0.2)),
                                            ("gru", dict(dropout=0.3, recurrent_dropout=0.2, l2=1e-3)),
                                            ("mlp", dict(dropout=0.3, activation="relu"))])
def test_widths_in_one_bucket_share_its_program_and_each_replica_is_its_native_fit(family, params, arrays):
    # 8, 5 and 7 units all run in the program of 8 (the narrower widths' extra units zero,
    # their dropout masks gathered from the native positions): the first trial, as wide as
    # its bucket, compiles it for the narrower widths, which compile no step; each
    # replica's curves and final weights are its own width's model.fit.
    from jax._src import dispatch

    from hpo.train import buckets

    steps = []

    def on_duration(event, seconds, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT and kwargs.get("fun_name") in ("jit(train_batch)",
                                                                                    "jit(test_batch)"):
            steps.append(kwargs["fun_name"])

    engine.clear_cache()
    seeds, epochs = [7, 8], 3
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        for units in (8, 5, 7):
            steps.clear()
            build = _family_builder(family, units, **params)
            bucket = buckets.Bucket(units, 8, lambda width: _family_builder(family, width, **params)(),
                                    widths=tuple(range(4, 33)))
            replicas = engine.Replicas(build, seeds, arrays["x"], arrays["y"], arrays["xv"], arrays["yv"], 32,
                                       bucket=bucket)
            assert replicas._padding is not None, "the trial ran in its own program, not its bucket's"
            logs = [replicas.run_epoch(np.ones(len(seeds), bool)) for _ in range(epochs)]
            assert bool(steps) == (units == 8), steps
            for r, seed in enumerate(seeds):
                keras.utils.set_random_seed(seed)
                model = native(build)
                history = model.fit(arrays["x"], arrays["y"], epochs=epochs, batch_size=32, shuffle=True,
                                    validation_data=(arrays["xv"], arrays["yv"]), verbose=0).history
                for key in ("loss", "val_loss", "val_mae"):
                    np.testing.assert_allclose([e[key][r] for e in logs], history[key], rtol=1e-5, atol=1e-7,
                                               err_msg=f"{family} {units} units, seed {seed} {key}")
                for mine, theirs in zip(replicas.weights(r), model.get_weights()):
                    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)


def test_a_width_bucket_is_only_taken_where_a_zero_unit_stays_zero():
    from hpo.train import buckets

    assert [buckets.bucket(u, 32) for u in (1, 3, 4, 5, 9, 17, 32)] == [1, 4, 4, 8, 16, 32, 32]
    assert buckets.bucket(20, 24) == 24  # never wider than the space's top
    # A trial as wide as its bucket compiles it for the widest width below it there.
    assert buckets.Bucket(8, 8, None, tuple(range(4, 33))).narrower == 7
    assert buckets.Bucket(24, 24, None, tuple(range(4, 25))).narrower == 23  # the space's top, not a power of two
    assert buckets.Bucket(4, 4, None, tuple(range(4, 33))).narrower is None  # the space has nothing narrower
    assert buckets.Bucket(16, 16, None, tuple(range(16, 33))).narrower is None
    assert buckets.Bucket(16, 16, None, tuple(range(4, 33, 4))).narrower == 12  # a step: only widths it has
    assert buckets.Bucket(32, 32, None, (16, 32, 64)).narrower is None  # choices: 16 has a bucket of its own
    assert buckets.keeps_zero("tanh") and buckets.keeps_zero("relu")
    assert not buckets.keeps_zero("sigmoid")  # sigmoid(0) = 0.5: a padded unit would feed its neighbours


def test_a_new_width_makes_its_zero_and_constant_variables_without_compiling(arrays):
    # Biases, Adam's slots and constant initialisers are made in NumPy (the same values):
    # on JAX each new shape of `zeros` would cost a compilation of its own.
    from jax._src import dispatch

    compiled = []

    def on_duration(event, seconds, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiled.append(kwargs.get("fun_name"))

    def build(units):
        inputs = keras.Input((STEPS, 2))
        h = keras.layers.Dense(units, bias_initializer=keras.initializers.Constant(0.1))(keras.layers.Flatten()(inputs))
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
        model.compile(keras.optimizers.Adam(0.01), "mse")
        return model

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        for units in (13, 19):
            compiled.clear()
            replicas = engine.Replicas(lambda units=units: build(units), [1, 2], arrays["x"], arrays["y"],
                                       arrays["xv"], arrays["yv"], batch_size=32)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    assert not [name for name in compiled if "broadcast_in_dim" in name], compiled
    keras.utils.set_random_seed(1)
    for mine, theirs in zip(replicas.weights(0), build(19).get_weights()):
        np.testing.assert_array_equal(mine, theirs)
