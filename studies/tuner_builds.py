"""Three `build(hp)` functions written for KerasTuner, in the style of its getting-started
guide, that hpo runs unchanged (studies/tuner_*.toml): each `hp` call is an Optuna
suggestion of the same name and range, and the model keeps its own compile.

The data is scikit-learn's 8x8 digits (64 pixels, 10 classes, integer labels: hence the
sparse cross-entropy where the guide's one-hot MNIST uses categorical).
"""

import keras
from keras import layers


def build(hp):
    """The guide's first model: units, activation, an optional dropout, a log learning rate."""
    model = keras.Sequential()
    model.add(layers.Flatten())
    model.add(
        layers.Dense(
            units=hp.Int("units", min_value=32, max_value=512, step=32),
            activation=hp.Choice("activation", ["relu", "tanh"]),
        )
    )
    if hp.Boolean("dropout"):
        model.add(layers.Dropout(rate=0.25))
    model.add(layers.Dense(10, activation="softmax"))
    learning_rate = hp.Float("lr", min_value=1e-4, max_value=1e-2, sampling="log")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def build_layers(hp):
    """The guide's conditional depth: a number of layers, each with its own width."""
    model = keras.Sequential()
    model.add(layers.Flatten())
    for i in range(hp.Int("num_layers", 1, 3)):
        model.add(
            layers.Dense(
                units=hp.Int(f"units_{i}", min_value=32, max_value=512, step=32),
                activation=hp.Choice("activation", ["relu", "tanh"]),
            )
        )
    if hp.Boolean("dropout"):
        model.add(layers.Dropout(rate=0.25))
    model.add(layers.Dense(10, activation="softmax"))
    learning_rate = hp.Float("lr", min_value=1e-4, max_value=1e-2, sampling="log")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def build_scoped(hp):
    """Conditional hyperparameters: SGD's momentum only when SGD is chosen (a
    conditional scope), a dropout rate only with dropout on (parent_name/parent_values),
    a multiplicative grid of widths and a fixed head."""
    inputs = keras.Input(shape=(64,))
    x = layers.Dense(hp.Int("units", 16, 256, step=2, sampling="log"), activation="relu")(inputs)
    if hp.Boolean("dropout", default=True):
        x = layers.Dropout(hp.Float("rate", 0.1, 0.5, step=0.1, parent_name="dropout", parent_values=[True]))(x)
    outputs = layers.Dense(hp.Fixed("classes", 10), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    optimizer_name = hp.Choice("optimizer", ["adam", "sgd"])
    learning_rate = hp.Float("learning_rate", 1e-3, 1e-1, sampling="log")
    with hp.conditional_scope("optimizer", ["sgd"]):
        if optimizer_name == "sgd":
            optimizer = keras.optimizers.SGD(learning_rate, momentum=hp.Float("momentum", 0.0, 0.9))
    with hp.conditional_scope("optimizer", ["adam"]):
        if optimizer_name == "adam":
            optimizer = keras.optimizers.Adam(learning_rate)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
