"""Replicated layers and `fit_replicated` against native Keras layers and the sequential path."""

from __future__ import annotations

import math
import statistics

import keras
import numpy as np
import pytest
import tensorflow as tf

from hpo import replicas
from hpo.data import Dataset
from hpo.errors import TrialDiverged
from hpo.space import default_params
from hpo.spec import parse_spec
from hpo.training import _build_run, fit_repeats

R = 3


@pytest.fixture(autouse=True)
def seeded():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def small_spec(family: str = "lstm", *, epochs: int = 3, patience: int = 100, metric: str = "val_loss",
               data: dict | None = None, **model: object):
    return parse_spec({
        "name": "t", "metric": metric, "seed": 7,
        "data": data or {"name": "noisy_sine", "window": 6, "n_samples": 120},
        "model": {"family": family, **model},
        "training": {"max_epochs": epochs, "patience": patience},
        "pruner": {"kind": "none"},
    })


def small_params(spec, **overrides):
    return default_params(spec) | {"units": 5, "batch_size": 16} | overrides


NATIVE = {
    "dense": lambda: keras.layers.Dense(4, activation="tanh"),
    "lstm": lambda: keras.layers.LSTM(4, return_sequences=True),
    "gru": lambda: keras.layers.GRU(4, return_sequences=True),
    "simple_rnn": lambda: keras.layers.SimpleRNN(4, return_sequences=True),
}


def replicated(kind: str) -> keras.layers.Layer:
    if kind == "dense":
        return replicas.ReplicatedDense(R, 4, activation="tanh")
    cls = {"lstm": replicas.ReplicatedLSTM, "gru": replicas.ReplicatedGRU,
           "simple_rnn": replicas.ReplicatedSimpleRNN}[kind]
    return cls(R, 4, return_sequences=True)


@pytest.mark.parametrize("kind", list(NATIVE))
def test_outputs_and_gradients_match_native_layers(kind):
    shape = (5, 3) if kind == "dense" else (5, 6, 3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(R, *shape)).astype(np.float32)
    natives = []
    for r in range(R):
        layer = NATIVE[kind]()
        layer.build(shape)
        # Non-zero biases, so a wrong bias layout would show.
        layer.weights[-1].assign(rng.normal(size=layer.weights[-1].shape).astype(np.float32))
        natives.append(layer)
    rep = replicated(kind)
    rep.build(x.shape)
    rep.set_replica_weights([[np.asarray(w) for w in n.weights] for n in natives])
    cotangent = rng.normal(size=(R, *shape[:-1], 4)).astype(np.float32)

    with tf.GradientTape() as tape:
        out = rep(tf.constant(x))
        loss = tf.reduce_sum(out * cotangent)
    grads = [g.numpy() for g in tape.gradient(loss, rep.trainable_variables)]
    for r, native in enumerate(natives):
        with tf.GradientTape() as tape:
            native_out = native(tf.constant(x[r]))
            native_loss = tf.reduce_sum(native_out * cotangent[r])
        native_grads = tape.gradient(native_loss, native.trainable_variables)
        np.testing.assert_allclose(out[r].numpy(), native_out.numpy(), atol=1e-5)
        for g, ng in zip(grads, native_grads):
            np.testing.assert_allclose(g[r], ng.numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_long_sequences_run_as_a_symbolic_loop_with_the_same_results(kind, monkeypatch):
    x = tf.constant(np.random.default_rng(2).normal(size=(R, 4, 7, 3)).astype(np.float32))
    rep = replicated(kind)
    rep.build(x.shape)
    rep.set_replica_weights([[np.random.default_rng(r).normal(size=w.shape[1:]).astype(np.float32) * 0.3
                              for w in rep.weights] for r in range(R)])
    results = []
    for limit in (64, 0):
        monkeypatch.setattr(replicas, "_UNROLL_LIMIT", limit)
        with tf.GradientTape() as tape:
            out = rep(x)
            loss = tf.reduce_sum(out * out)
        results.append([out.numpy()] + [g.numpy() for g in tape.gradient(loss, rep.trainable_variables)])
    for unrolled, looped in zip(*results):
        np.testing.assert_allclose(unrolled, looped, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "lstm"])
def test_shared_input_is_the_same_as_a_copy_per_replica(kind):
    shape = (5, 3) if kind == "dense" else (5, 6, 3)
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    rep = replicated(kind)
    rep.build((R, *shape))
    rep.set_replica_weights([[np.random.default_rng(r).normal(size=w.shape[1:]).astype(np.float32)
                              for w in rep.weights] for r in range(R)])
    np.testing.assert_allclose(rep(tf.constant(x)).numpy(), rep(tf.constant(np.stack([x] * R))).numpy(), atol=1e-6)


@pytest.mark.parametrize("family", ["mlp", "lstm", "gru", "simple_rnn"])
def test_replica_initialisation_equals_native_model_under_its_seed(family):
    spec = small_spec(family)
    params = small_params(spec, layers=2, dropout=0.1, initializer="he_normal")
    seeds = [11, 12, 13]
    model = replicas.build_replicated_model(params, (6, 1), family=family, output="regression", n_outputs=1,
                                            seeds=seeds)
    for r, seed in enumerate(seeds):
        native = _build_run(spec, params, seed).model
        native_weights = [np.asarray(w) for layer in native.layers for w in layer.weights]
        replica_weights = [w for layer in model.weighted_layers for w in layer.get_replica_weights(r)]
        assert len(native_weights) == len(replica_weights)
        for a, b in zip(native_weights, replica_weights):
            np.testing.assert_array_equal(a, b)


def tiny_trainer(x: np.ndarray, y: np.ndarray, **overrides):
    spec = small_spec("lstm")
    params = small_params(spec, batch_size=4, dropout=0.3, recurrent_dropout=0.3) | overrides
    model = replicas.build_replicated_model(params, x.shape[1:], family="lstm", output="regression", n_outputs=1,
                                            seeds=[1, 2])
    data = Dataset(x, y, x[:4], y[:4], "regression", 1)
    return model, replicas._Trainer(model, data, params, output="regression", metric="val_loss",
                                    jit_compile=False)


def replica_weights(model, r):
    return [w for layer in model.weighted_layers for w in layer.get_replica_weights(r)]


def test_changing_replica_2s_data_leaves_replica_1s_update_unchanged():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 6, 1)).astype(np.float32)
    y = rng.normal(size=(8, 1)).astype(np.float32)
    # Replica 1 reads only rows 0-3, replica 2 only rows 4-7, in one step of batch 8.
    order = np.array([[0, 1, 2, 3] * 2, [4, 5, 6, 7] * 2])
    both = np.array([True, True])
    x2, y2 = x.copy(), y.copy()
    x2[4:] += 1.0
    y2[4:] -= 2.0
    results = []
    for xs, ys in ((x, y), (x2, y2)):
        keras.utils.set_random_seed(5)
        model, trainer = tiny_trainer(xs, ys, batch_size=8)
        before = replica_weights(model, 0)
        trainer.run_epoch(order, both)
        results.append((before, replica_weights(model, 0), replica_weights(model, 1)))
    (before, first_1, first_2), (_, second_1, second_2) = results
    assert any(not np.array_equal(a, b) for a, b in zip(before, first_1))
    for a, b in zip(first_1, second_1):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(first_2, second_2))


def test_a_stopped_replica_freezes_while_the_other_trains():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 6, 1)).astype(np.float32)
    y = rng.normal(size=(8, 1)).astype(np.float32)
    model, trainer = tiny_trainer(x, y, optimizer="adam")
    order = np.array([np.arange(8), np.arange(8)])
    trainer.run_epoch(order, np.array([True, True]))
    frozen = replica_weights(model, 1)
    moving = replica_weights(model, 0)
    # Adam's momentum would move a replica whose gradient is merely zero; it must not move.
    trainer.run_epoch(order, np.array([True, False]))
    for a, b in zip(frozen, replica_weights(model, 1)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(moving, replica_weights(model, 0)))


@pytest.mark.parametrize("family", ["mlp", "lstm"])
def test_with_dropout_a_seeds_fit_does_not_depend_on_its_neighbours(family):
    spec = small_spec(family, epochs=2)
    params = small_params(spec, dropout=0.3, recurrent_dropout=0.2 if family == "lstm" else 0.0)
    alone = replicas.fit_replicated(spec, params, [21])
    among = replicas.fit_replicated(spec, params, [5, 21, 9])
    for key, values in alone.fits[0].curves.items():
        np.testing.assert_allclose(among.fits[1].curves[key], values, rtol=1e-5)
    assert among.fits[0].curves["loss"] != among.fits[1].curves["loss"]


def test_replicas_stop_early_on_their_own_and_keep_their_best_epoch():
    spec = small_spec("lstm", epochs=12, patience=0)
    params = small_params(spec, learning_rate=0.05, dropout=0.3)
    seeds = list(range(6))
    means = []
    fit = replicas.fit_replicated(spec, params, seeds, lambda epoch, mean: means.append(mean) and False)
    assert fit.path == "vectorized"
    runs = [f.epochs_run for f in fit.fits]
    assert min(runs) < max(runs), f"every replica ran {runs} epochs; the test needs one that stopped early"
    for f in fit.fits:
        val = f.curves["val_metric"]
        assert len(val) == f.epochs_run and all(len(c) == f.epochs_run for c in f.curves.values())
        assert f.score == min(val) == val[f.best_epoch - 1]
    # The pruner saw every epoch the mean of the replicas' current values: the latest while
    # a replica trains on, its best from the epoch it stopped (with patience 0, a replica
    # whose last epoch did not improve stopped there, so its current value is its best).
    assert len(means) == max(runs)
    for epoch, mean in enumerate(means):
        current = [f.curves["val_metric"][epoch] if f.epochs_run > epoch + 1 else f.score for f in fit.fits]
        assert mean == pytest.approx(statistics.fmean(current))


def test_pruning_stops_all_replicas_after_the_epoch_it_says_so():
    spec = small_spec("gru", epochs=5)
    fit = fit_repeats(spec, small_params(spec), [1, 2], lambda epoch, mean: epoch == 1)
    assert fit.path == "vectorized"
    assert fit.pruned_at_epoch == 2
    assert [f.epochs_run for f in fit.fits] == [2, 2]


def test_a_diverging_replica_fails_the_trial():
    spec = small_spec("simple_rnn", epochs=5)
    params = small_params(spec, optimizer="sgd", learning_rate=10.0, activation="relu", initializer="he_uniform")
    with pytest.raises(TrialDiverged, match="seed"):
        replicas.fit_replicated(spec, params, [1, 2])


@pytest.mark.parametrize("model,data", [
    ({"stateful": True}, None),
    ({}, {"name": "noisy_sine", "window": 6, "n_samples": 120, "split": "random", "resample_split": True}),
])
def test_fit_repeats_falls_back_to_the_sequential_path(model, data):
    spec = small_spec("lstm", epochs=1, data=data, **model)
    assert replicas.unsupported_reason(spec) is not None
    assert fit_repeats(spec, small_params(spec), [1]).path == "sequential"
    with pytest.raises(ValueError, match="replicas"):
        fit_repeats(spec, small_params(spec), [1], path="vectorized")


@pytest.mark.parametrize("family,extra,metric,data", [
    ("lstm", {}, "val_loss", None),
    ("simple_rnn", {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "clipnorm": 0.1, "l1": 1e-3,
                    "lr_schedule": "exponential", "lr_decay": 0.5}, "val_mae", None),
    ("mlp", {"layers": 2, "l2": 1e-3, "optimizer": "rmsprop"}, "val_accuracy",
     {"name": "digits", "val_fraction": 0.3}),
])
def test_without_dropout_replicas_reproduce_the_sequential_fits(family, extra, metric, data):
    spec = small_spec(family, epochs=2, metric=metric, data=data)
    params = small_params(spec, **extra)
    vectorized = fit_repeats(spec, params, [3, 4], path="vectorized")
    sequential = fit_repeats(spec, params, [3, 4], path="sequential")
    for v, s in zip(vectorized.fits, sequential.fits):
        assert v.curves.keys() == s.curves.keys()
        for key in v.curves:
            np.testing.assert_allclose(v.curves[key], s.curves[key], rtol=1e-4, atol=1e-5)


def test_replicated_and_sequential_scores_agree_in_distribution():
    spec = small_spec("simple_rnn", epochs=3)
    params = small_params(spec, dropout=0.3, recurrent_dropout=0.2, learning_rate=0.01)
    seeds = list(range(6))
    vectorized = fit_repeats(spec, params, seeds, path="vectorized").scores
    sequential = fit_repeats(spec, params, seeds, path="sequential").scores
    # Dropout masks differ between the paths, so only the distributions can agree.
    assert vectorized != sequential
    se = math.sqrt(statistics.variance(vectorized) / len(seeds) + statistics.variance(sequential) / len(seeds))
    assert abs(statistics.fmean(vectorized) - statistics.fmean(sequential)) <= 3 * se
