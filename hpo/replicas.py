"""Replicated training: a spec, resolved params and R seeds in, one model holding R
independent weight sets trained together out (a `training.RepeatFit`, path "vectorized").

Every weight has a leading replica axis `(R, ...)` and is applied with batched matmuls, so
R small fits cost little more than one; each replica keeps its own initialisation, data
order, dropout masks, gradient and early stopping, as if it had been fitted alone.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from hpo.models import build_model, make_optimizer
from hpo.spec import RECURRENT_FAMILIES, StudySpec
from hpo.training import (CURVE_KEYS, EpochCallback, RepeatFit, check_finite, configure_determinism,
                          _finish, _lock_step, _stopper)

FAMILIES = ("mlp", *RECURRENT_FAMILIES)

# Recurrent loops up to this many steps are unrolled into the graph, longer ones run as a
# symbolic loop (tf.scan): unrolled, a reference epoch at R=30 took 0.55 s instead of 1.0 s.
_UNROLL_LIMIT = 64


def unsupported_reason(spec: StudySpec) -> str | None:
    """Why the spec cannot train its seeds as replicas, or None when it can.

    Every option of the vocabulary is replicated; `clipnorm` too, since Keras clips each
    weight's gradient by its own norm, which is taken per replica here.
    """
    if spec.model.family not in FAMILIES:
        return f"family {spec.model.family!r} has no replicated layers"
    if spec.model.stateful:
        return "a stateful LSTM carries its state across batches of one fixed data order"
    if spec.data.resample_split:
        return "each seed resamples its own train/validation split"
    return None


class _ReplicatedLayer(keras.layers.Layer):
    """Shared plumbing: replicated weights, per-replica penalties and dropout masks."""

    def __init__(self, replicas: int, *, l1: float = 0.0, l2: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.replicas = replicas
        self.l1, self.l2 = l1, l2

    def _init_dropout(self, dropout_seeds: list[int] | None) -> None:
        # One generator per replica, seeded from its seed: a seed's masks, like its fit,
        # then do not depend on which other seeds train beside it.
        self._generators = [keras.random.SeedGenerator(s) for s in (dropout_seeds or [None] * self.replicas)]

    def replica_penalty(self) -> tf.Tensor:
        """The kernel regulariser of each replica, shape `(R,)` (Keras' `L1L2` per replica)."""
        kernel = tf.reshape(tf.convert_to_tensor(self.kernel), (self.replicas, -1))
        penalty = tf.zeros((self.replicas,), kernel.dtype)
        if self.l1:
            penalty += self.l1 * tf.reduce_sum(tf.abs(kernel), axis=1)
        if self.l2:
            penalty += self.l2 * tf.reduce_sum(tf.square(kernel), axis=1)
        return penalty

    def _mask(self, shape: Any, rate: float, axis: int = 0) -> tf.Tensor:
        # Inverted dropout as keras.random.dropout draws it; replica r's mask comes from
        # its own generator and is stacked at `axis`.
        keep = tf.stack([keras.random.uniform(shape, seed=g) for g in self._generators], axis=axis) >= rate
        return tf.cast(keep, self.compute_dtype) / (1.0 - rate)

    def set_replica_weights(self, per_replica: list[list[np.ndarray]]) -> None:
        """Load R native layers' weights (one list per replica, in Keras' order)."""
        for i, variable in enumerate(self.weights):
            variable.assign(np.stack([w[i] for w in per_replica]))

    def get_replica_weights(self, r: int) -> list[np.ndarray]:
        """Replica r's weights, shaped as the native layer's."""
        return [np.asarray(v)[r] for v in self.weights]


class ReplicatedDense(_ReplicatedLayer):
    """R independent `keras.layers.Dense` layers.

    Input `(B, in)` (one batch seen by every replica) or `(R, B, in)`; output `(R, B, units)`.
    """

    def __init__(self, replicas: int, units: int, activation: Any = None, **kwargs: Any) -> None:
        super().__init__(replicas, **kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)

    def build(self, input_shape: tuple) -> None:
        self.kernel = self.add_weight(shape=(self.replicas, input_shape[-1], self.units), name="kernel",
                                      initializer="zeros")
        self.bias = self.add_weight(shape=(self.replicas, self.units), name="bias", initializer="zeros")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        if x.shape.rank == 2:
            y = tf.einsum("bi,riu->rbu", x, self.kernel)
        else:
            y = tf.matmul(x, self.kernel)
        return self.activation(y + self.bias[:, None, :])


class ReplicatedDropout(_ReplicatedLayer):
    """`keras.layers.Dropout` with an independent mask per replica; input `(R, B, ...)`."""

    def __init__(self, replicas: int, rate: float, dropout_seeds: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(replicas, **kwargs)
        self.rate = rate
        self._init_dropout(dropout_seeds)

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training or self.rate <= 0:
            return x
        return x * self._mask(tf.shape(x)[1:], self.rate)


class _ReplicatedRNN(_ReplicatedLayer):
    """One recurrent loop over time for all replicas. Subclasses give the gate count and
    the cell; masks follow Keras: one per sequence, reused at every step, and one per gate
    once recurrent dropout is on (Keras then switches to its `implementation=1` cell)."""

    gates = 1

    def __init__(self, replicas: int, units: int, activation: Any = "tanh", dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, return_sequences: bool = False,
                 dropout_seeds: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(replicas, **kwargs)
        if dropout > 0 or recurrent_dropout > 0:
            self._init_dropout(dropout_seeds)
        self.units = units
        self.activation = keras.activations.get(activation)
        self.dropout = dropout
        self.recurrent_dropout = recurrent_dropout
        self.return_sequences = return_sequences

    @property
    def _mask_count(self) -> int:
        return self.gates if self.recurrent_dropout > 0 else 1

    def build(self, input_shape: tuple) -> None:
        r, g = self.replicas, self.gates * self.units
        self.kernel = self.add_weight(shape=(r, input_shape[-1], g), name="kernel", initializer="zeros")
        self.recurrent_kernel = self.add_weight(shape=(r, self.units, g), name="recurrent_kernel",
                                                initializer="zeros")
        self.bias = self.add_weight(shape=(r, *self._bias_shape()), name="bias", initializer="zeros")

    def _bias_shape(self) -> tuple[int, ...]:
        return (self.gates * self.units,)

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        shared = x.shape.rank == 3
        batch = tf.shape(x)[0 if shared else 1]
        use_dropout = training and 0.0 < self.dropout < 1.0
        use_rec_dropout = training and 0.0 < self.recurrent_dropout < 1.0
        kernel = self.kernel
        if use_dropout:
            if shared:
                x = tf.broadcast_to(x[None], tf.concat([[self.replicas], tf.shape(x)], 0))
            masks = self._mask([self._mask_count, batch, x.shape[-1]], self.dropout, axis=1)
            kernels = tf.split(kernel, self._mask_count, axis=-1)
            # The input projection of every step at once: masks are fixed over time.
            projected = tf.concat([tf.einsum("rbtf,rfg->rbtg", x * m[:, :, None, :], k)
                                   for m, k in zip(tf.unstack(masks), kernels)], axis=-1)
        elif shared:
            projected = tf.einsum("btf,rfg->rbtg", x, kernel)
        else:
            projected = tf.einsum("rbtf,rfg->rbtg", x, kernel)
        projected += self._input_bias()[:, None, None, :]
        rec_masks = None
        if use_rec_dropout:
            rec_masks = tf.unstack(self._mask([self.gates, batch, self.units], self.recurrent_dropout, axis=1))
        recurrence = self._recurrence(rec_masks)
        state = self._initial_state(batch)
        steps = x.shape[-2]
        if steps is not None and steps <= _UNROLL_LIMIT:
            outputs = []
            for z in tf.unstack(projected, axis=2):
                h, state = self._step(z, state, recurrence)
                outputs.append(h)
            if not self.return_sequences:
                return outputs[-1]
            return tf.stack(outputs, axis=2)
        sequence = tf.transpose(projected, (2, 0, 1, 3))

        def scan_step(carry: tuple, z: tf.Tensor) -> tuple:
            h, new_state = self._step(z, carry[1], recurrence)
            return h, new_state

        hs, _ = tf.scan(scan_step, sequence, initializer=(tf.zeros_like(state[0]), state))
        if not self.return_sequences:
            return hs[-1]
        return tf.transpose(hs, (1, 2, 0, 3))

    def _input_bias(self) -> tf.Tensor:
        return self.bias

    def _initial_state(self, batch: tf.Tensor) -> tuple:
        zeros = tf.zeros(tf.stack([self.replicas, batch, self.units]), self.compute_dtype)
        return (zeros,)

    def _recurrence(self, rec_masks: list | None) -> Callable[[tf.Tensor], tf.Tensor]:
        # h -> its projection by the recurrent kernel. Weights are read and split once per
        # call, not once per step: the graph of a step is mostly op overhead at small R.
        if rec_masks is None:
            kernel = tf.convert_to_tensor(self.recurrent_kernel)
            return lambda h: tf.matmul(h, kernel)
        kernels = tf.split(tf.convert_to_tensor(self.recurrent_kernel), self.gates, axis=-1)
        return lambda h: tf.concat([tf.matmul(h * m, k) for m, k in zip(rec_masks, kernels)], axis=-1)


class ReplicatedSimpleRNN(_ReplicatedRNN):
    """R independent `keras.layers.SimpleRNN` layers; input `(B, T, F)` or `(R, B, T, F)`."""

    gates = 1

    def _step(self, z: tf.Tensor, state: tuple, recurrence: Callable) -> tuple:
        h = self.activation(z + recurrence(state[0]))
        return h, (h,)


class ReplicatedLSTM(_ReplicatedRNN):
    """R independent `keras.layers.LSTM` layers (gates i, f, c, o as Keras orders them)."""

    gates = 4

    def _initial_state(self, batch: tf.Tensor) -> tuple:
        zeros = tf.zeros(tf.stack([self.replicas, batch, self.units]), self.compute_dtype)
        return (zeros, zeros)

    def _step(self, z: tf.Tensor, state: tuple, recurrence: Callable) -> tuple:
        h, c = state
        i, f, g, o = tf.split(z + recurrence(h), 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * self.activation(g)
        h = tf.sigmoid(o) * self.activation(c)
        return h, (h, c)


class ReplicatedGRU(_ReplicatedRNN):
    """R independent `keras.layers.GRU` layers (`reset_after=True`, Keras' default)."""

    gates = 3

    def _bias_shape(self) -> tuple[int, ...]:
        return (2, self.gates * self.units)

    def _input_bias(self) -> tf.Tensor:
        return self.bias[:, 0]

    def _recurrence(self, rec_masks: list | None) -> Callable[[tf.Tensor], tf.Tensor]:
        project = super()._recurrence(rec_masks)
        bias = self.bias[:, 1][:, None, :]
        return lambda h: project(h) + bias

    def _step(self, z: tf.Tensor, state: tuple, recurrence: Callable) -> tuple:
        h = state[0]
        rec = recurrence(h)
        x_z, x_r, x_h = tf.split(z, 3, axis=-1)
        r_z, r_r, r_h = tf.split(rec, 3, axis=-1)
        update = tf.sigmoid(x_z + r_z)
        reset = tf.sigmoid(x_r + r_r)
        candidate = self.activation(x_h + reset * r_h)
        h = update * h + (1.0 - update) * candidate
        return h, (h,)


_RNN_LAYERS = {"lstm": ReplicatedLSTM, "gru": ReplicatedGRU, "simple_rnn": ReplicatedSimpleRNN}


class ReplicatedModel(keras.Model):
    """The network `models.build_model` describes, R times over; call it on `(B, ...)` (one
    batch for all replicas) or `(R, B, ...)` and get `(R, B, n_outputs)`."""

    def __init__(self, params: dict[str, Any], input_shape: tuple[int, ...], *, family: str, output: str,
                 n_outputs: int, seeds: list[int]) -> None:
        super().__init__()
        self.replicas = replicas = len(seeds)
        self.input_dims = tuple(input_shape)
        self.flat_size = math.prod(input_shape) if family == "mlp" and len(input_shape) > 1 else None
        penalty = {"l1": params["l1"], "l2": params["l2"]}
        self.stack: list[keras.layers.Layer] = []
        for i in range(params["layers"]):
            # Layer i of replica r draws its masks from a stream of (seed r, i), so a replay,
            # or the same seed among other neighbours, draws the same masks.
            streams = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for seed in seeds]
            if family == "mlp":
                self.stack.append(ReplicatedDense(replicas, params["units"], activation=params["activation"],
                                                  **penalty))
                if params["dropout"] > 0:
                    self.stack.append(ReplicatedDropout(replicas, params["dropout"],
                                                        dropout_seeds=streams))
            else:
                self.stack.append(_RNN_LAYERS[family](
                    replicas, params["units"], activation=params["activation"], dropout=params["dropout"],
                    recurrent_dropout=params["recurrent_dropout"], return_sequences=i < params["layers"] - 1,
                    dropout_seeds=streams, **penalty))
        self.head = ReplicatedDense(replicas, n_outputs,
                                    activation="softmax" if output == "classification" else None)
        self(tf.zeros((1, *input_shape)))

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if self.flat_size is not None:
            lead = x.shape.rank - len(self.input_dims)
            x = tf.reshape(x, tf.concat([tf.shape(x)[:lead], [self.flat_size]], 0))
        for layer in self.stack:
            x = layer(x) if isinstance(layer, ReplicatedDense) else layer(x, training=training)
        return self.head(x)

    @property
    def weighted_layers(self) -> list[_ReplicatedLayer]:
        return [layer for layer in (*self.stack, self.head) if layer.weights]

    def replica_penalty(self) -> tf.Tensor:
        """Each replica's regularisation loss, `(R,)`, as Keras adds it to the loss."""
        total = tf.zeros((self.replicas,))
        for layer in self.stack:
            if layer.weights and (layer.l1 or layer.l2):
                total += layer.replica_penalty()
        return total

    def load_native(self, natives: list[keras.Model]) -> None:
        """Copy the weights of R native models (same architecture), one per replica."""
        native_layers = [[layer for layer in m.layers if layer.weights] for m in natives]
        for i, layer in enumerate(self.weighted_layers):
            layer.set_replica_weights([[np.asarray(w) for w in layers[i].weights] for layers in native_layers])


def build_replicated_model(params: dict[str, Any], input_shape: tuple[int, ...], *, family: str, output: str,
                           n_outputs: int, seeds: list[int]) -> ReplicatedModel:
    """The replicated network, replica r initialised exactly as `models.build_model` under
    `keras.utils.set_random_seed(seeds[r])` (it is built and its weights copied)."""
    natives = []
    for seed in seeds:
        keras.utils.set_random_seed(seed)
        natives.append(build_model(params, input_shape, family=family, output=output, n_outputs=n_outputs))
    model = ReplicatedModel(params, input_shape, family=family, output=output, n_outputs=n_outputs,
                            seeds=seeds)
    model.load_native(natives)
    return model


def fit_replicated(spec: StudySpec, params: dict[str, Any], seeds: list[int],
                   on_epoch: EpochCallback | None = None, *, jit_compile: bool = False) -> RepeatFit:
    """Fit the params once per seed, all seeds as replicas of one model.

    Same contract and record as the sequential path (`training.fit_repeats`): replica r sees
    the data in the order seed r's own generator shuffles it, stops early on its own and
    keeps its best epoch's score; once stopped, its weights and optimizer state freeze.

    Args:
        spec: The study; `unsupported_reason(spec)` must be None.
        params: Resolved params (`space.suggest_params`).
        seeds: One replica per seed.
        on_epoch: See `training.EpochCallback`.
        jit_compile: Compile each epoch with XLA. Off by default: on a 2-core CPU the
            compilation (6-28 s) cost more than the whole fit, and the compiled epoch at
            R=30 was slower than the graph (1.1 s vs 0.55 s).

    Raises:
        TrialDiverged: A replica's loss became NaN or infinite.
    """
    from hpo.data import load_dataset

    start = time.perf_counter()
    configure_determinism()
    data = load_dataset(spec.data, window=params.get("window"), sequence=spec.model.family in RECURRENT_FAMILIES,
                        split_seed=spec.seed)
    model = build_replicated_model(params, data.input_shape, family=spec.model.family, output=spec.output,
                                   n_outputs=data.n_outputs, seeds=seeds)
    trainer = _Trainer(model, data, params, output=spec.output, metric=spec.metric, jit_compile=jit_compile)
    rngs = [np.random.default_rng(seed) for seed in seeds]
    stoppers = [_stopper(spec) for _ in seeds]
    curves: list[dict[str, list[float]]] = [{k: [] for k in CURVE_KEYS} for _ in seeds]
    n = len(data.x_train)
    for epoch in range(spec.training.max_epochs):
        active = np.array([not s.stopped for s in stoppers])
        # Each replica shuffles with its seed's generator, as the sequential path does.
        order = np.stack([rng.permutation(n) if a else np.arange(n) for rng, a in zip(rngs, active)])
        stats = trainer.run_epoch(order, active)
        for r in np.flatnonzero(active):
            logs = dict(zip(CURVE_KEYS, map(float, stats[:, r])))
            check_finite(seeds[r], epoch, logs)
            for key in CURVE_KEYS:
                curves[r][key].append(logs[key])
            stoppers[r].update(logs["val_metric"])
        if _lock_step(stoppers, epoch, on_epoch):
            return RepeatFit(_finish(seeds, stoppers, curves), time.perf_counter() - start, "vectorized", epoch + 1)
        if all(s.stopped for s in stoppers):
            break
    return RepeatFit(_finish(seeds, stoppers, curves), time.perf_counter() - start, "vectorized")


def _sample_metric(metric: str) -> Any:
    name = metric.removeprefix("val_")
    if name == "mae":
        return keras.losses.mean_absolute_error
    if name == "mse":
        return keras.losses.mean_squared_error
    if name == "accuracy":
        return lambda y, p: tf.cast(tf.equal(tf.argmax(p, axis=-1, output_type=y.dtype), y), p.dtype)
    return None


class _Trainer:
    """One compiled function per epoch: every batch's train step for all replicas, then
    validation, returning `(4, R)` in `CURVE_KEYS` order, each figure as Keras logs it."""

    def __init__(self, model: ReplicatedModel, data: Any, params: dict[str, Any], *, output: str, metric: str,
                 jit_compile: bool) -> None:
        self.model = model
        r = model.replicas
        self.x, self.y = tf.constant(data.x_train), tf.constant(data.y_train)
        self.x_val = tf.constant(data.x_val)
        self.y_val = tf.constant(np.broadcast_to(data.y_val[None], (r, *data.y_val.shape)))
        self.n, self.batch = len(data.x_train), params["batch_size"]
        self.steps = steps = max(1, math.ceil(self.n / self.batch))
        self.row_weight = tf.constant(np.arange(steps * self.batch) < self.n, tf.float32)
        # Keras' clipnorm clips each weight's gradient by its own norm; here that norm is
        # taken per replica, before the (unclipped) optimizer sees the gradients.
        self.clipnorm = params["clipnorm"]
        self.optimizer = make_optimizer(dict(params, clipnorm=0.0), steps)
        self.variables = model.trainable_variables
        self.optimizer.build(self.variables)
        if output == "classification":
            self.loss_fn = keras.losses.sparse_categorical_crossentropy
        else:
            self.loss_fn = keras.losses.mean_squared_error
        self.metric_fn = _sample_metric(metric)
        # The loops are written as graph ops already; skipping AutoGraph's conversion of
        # every Keras call saves about a fifth of the tracing time.
        self._run = tf.function(self._epoch, jit_compile=jit_compile, reduce_retracing=True, autograph=False)

    def run_epoch(self, order: np.ndarray, active: np.ndarray) -> np.ndarray:
        # The last, short batch is padded to a full one whose extra rows weigh nothing,
        # so a single step shape is traced and compiled.
        padded = np.zeros((order.shape[0], self.steps * self.batch), np.int32)
        padded[:, : self.n] = order
        return self._run(tf.constant(padded), tf.constant(active)).numpy()

    def _epoch(self, order: tf.Tensor, active: tf.Tensor) -> tf.Tensor:
        r, b, n = self.model.replicas, self.batch, self.n

        def body(s: tf.Tensor, loss_sum: tf.Tensor, metric_sum: tf.Tensor) -> tuple:
            idx = tf.slice(order, [0, s * b], [r, b])
            weight = tf.slice(self.row_weight, [s * b], [b])
            loss, metric = self._step(idx, weight, active)
            return s + 1, loss_sum + loss, metric_sum + metric

        _, loss_sum, metric_sum = tf.while_loop(lambda s, *_: s < self.steps, body,
                                                (tf.constant(0), tf.zeros((r,)), tf.zeros((r,))))
        pred = self.model(self.x_val, training=False)
        per_sample = self.loss_fn(self.y_val, pred)
        val_loss = tf.reduce_mean(per_sample, axis=1) + self.model.replica_penalty()
        val_metric = val_loss if self.metric_fn is None else tf.reduce_mean(self.metric_fn(self.y_val, pred), axis=1)
        train_loss = loss_sum / n
        train_metric = train_loss if self.metric_fn is None else metric_sum / n
        return tf.stack([train_loss, val_loss, train_metric, val_metric])

    def _step(self, idx: tf.Tensor, weight: tf.Tensor, active: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.gather(self.x, idx), tf.gather(self.y, idx)
        size = tf.reduce_sum(weight)
        with tf.GradientTape() as tape:
            pred = self.model(x, training=True)
            per_sample = self.loss_fn(y, pred)
            # Keras' batch mean, over the real rows only.
            loss = tf.reduce_sum(per_sample * weight, axis=1) / size + self.model.replica_penalty()
            # Summing keeps each replica's gradient that of its own loss.
            total = tf.reduce_sum(tf.where(active, loss, 0.0))
        grads = tape.gradient(total, self.variables)
        if self.clipnorm > 0:
            grads = [self._clip(g) for g in grads]
        before = [tf.identity(v) for v in self.variables]
        self.optimizer.apply(grads, self.variables)
        for v, old in zip(self.variables, before):
            keep = tf.reshape(active, [-1] + [1] * (len(v.shape) - 1))
            v.assign(tf.where(keep, v, old))
        if self.metric_fn is None:
            return loss * size, loss * size
        return loss * size, tf.reduce_sum(self.metric_fn(y, pred) * weight, axis=1)

    def _clip(self, g: tf.Tensor) -> tf.Tensor:
        axes = list(range(1, len(g.shape)))
        l2sum = tf.reduce_sum(tf.square(g), axes, keepdims=True)
        positive = l2sum > 0
        norm = tf.where(positive, tf.sqrt(tf.where(positive, l2sum, tf.ones_like(l2sum))), l2sum)
        return g * self.clipnorm / tf.maximum(norm, self.clipnorm)
