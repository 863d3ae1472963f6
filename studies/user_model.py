"""A model of your own for hpo: `build(params, input_shape, n_outputs)` returns an
uncompiled Keras model; hpo compiles it (optimizer, learning rate, loss) and trains its
seeds together. Used by studies/conv1d_csv.toml and studies/conv1d_loader.toml."""

import keras


def build(params, input_shape, n_outputs):
    inputs = keras.Input(input_shape)
    x = inputs
    for _ in range(params["conv_layers"]):
        x = keras.layers.Conv1D(params["filters"], params["kernel_size"], padding="causal", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dropout(params["dropout"])(x)
    return keras.Model(inputs, keras.layers.Dense(n_outputs)(x))
