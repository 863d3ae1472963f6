"""Data of your own for hpo: `load()` returns (x_train, y_train, x_val, y_val) as NumPy
arrays; hpo checks them once and calls it once per process. Used by
studies/conv1d_loader.toml: windows of 24 months of data/series.csv, scaled on the
training months only, predicting the next month."""

from pathlib import Path

import numpy as np

WINDOW = 24


def load():
    sales = np.loadtxt(Path(__file__).parent / "data" / "series.csv", delimiter=",", skiprows=1, usecols=1)
    split = int(len(sales) * 0.8)
    mean, std = sales[:split].mean(), sales[:split].std()
    scaled = ((sales - mean) / std).astype("float32")
    x = np.lib.stride_tricks.sliding_window_view(scaled, WINDOW)[:-1, :, None]
    y = scaled[WINDOW:, None]
    n_train = split - WINDOW
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]
