"""Models: a resolved params dict and an input shape in, a compiled `keras.Model` out.

Nothing here knows about Optuna, so a model can be rebuilt, replayed or replicated from
the params a trial stored.
"""

from __future__ import annotations

import math
from typing import Any

import keras

RECURRENT_LAYERS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "simple_rnn": keras.layers.SimpleRNN}


def build_model(params: dict[str, Any], input_shape: tuple[int, ...], *, family: str, output: str,
                n_outputs: int, stateful: bool = False) -> keras.Model:
    """Build (uncompiled) the network a trial's params describe.

    Args:
        params: Resolved params (`space.resolve_params`), every vocabulary name present.
        input_shape: One sample's shape, `(steps, features)` for recurrent families.
        family: `lstm`, `gru`, `simple_rnn` (stacked when `layers > 1`) or `mlp`.
        output: `regression` (linear head of `n_outputs`) or `classification` (softmax).
        n_outputs: Width of the head.
        stateful: A stateful LSTM keeps its state across batches; the batch size is fixed.
    """
    if stateful:
        inputs = keras.Input(batch_shape=(params["batch_size"], *input_shape))
    else:
        inputs = keras.Input(shape=input_shape)
    regularizer = _regularizer(params)
    x = inputs
    for i in range(params["layers"]):
        if family == "mlp":
            if i == 0 and len(input_shape) > 1:
                x = keras.layers.Flatten()(x)
            x = keras.layers.Dense(params["units"], activation=params["activation"],
                                   kernel_initializer=params["initializer"], kernel_regularizer=regularizer)(x)
            if params["dropout"] > 0:
                x = keras.layers.Dropout(params["dropout"])(x)
        else:
            layer = RECURRENT_LAYERS[family]
            kwargs = dict(activation=params["activation"], kernel_initializer=params["initializer"],
                          kernel_regularizer=regularizer, dropout=params["dropout"],
                          recurrent_dropout=params["recurrent_dropout"],
                          return_sequences=i < params["layers"] - 1)
            if stateful:
                kwargs["stateful"] = True
            x = layer(params["units"], **kwargs)(x)
    if output == "classification":
        outputs = keras.layers.Dense(n_outputs, activation="softmax")(x)
    else:
        outputs = keras.layers.Dense(n_outputs)(x)
    return keras.Model(inputs, outputs)


def compile_model(model: keras.Model, params: dict[str, Any], *, output: str, steps_per_epoch: int) -> None:
    """Compile with the params' optimizer, schedule and clipping, and the task's loss and metrics."""
    if output == "classification":
        model.compile(optimizer=make_optimizer(params, steps_per_epoch),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    else:
        model.compile(optimizer=make_optimizer(params, steps_per_epoch), loss="mse", metrics=["mae", "mse"])


def make_optimizer(params: dict[str, Any], steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer the params name, with its learning-rate schedule and clipping."""
    lr: Any = params["learning_rate"]
    decay = params["lr_decay"]
    if params["lr_schedule"] == "time" and decay > 0:
        lr = keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=steps_per_epoch, decay_rate=decay)
    elif params["lr_schedule"] == "exponential" and decay > 0:
        lr = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=steps_per_epoch, decay_rate=math.exp(-decay))
    clip = {"clipnorm": params["clipnorm"]} if params["clipnorm"] > 0 else {}
    if params["optimizer"] == "sgd":
        return keras.optimizers.SGD(lr, momentum=params["momentum"], nesterov=params["nesterov"], **clip)
    if params["optimizer"] == "rmsprop":
        return keras.optimizers.RMSprop(lr, **clip)
    return keras.optimizers.Adam(lr, **clip)


def _regularizer(params: dict[str, Any]) -> keras.regularizers.Regularizer | None:
    if params["l1"] > 0 or params["l2"] > 0:
        return keras.regularizers.L1L2(l1=params["l1"], l2=params["l2"])
    return None
