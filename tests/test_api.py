"""hpo.tune from Python, in a real subprocess, read back with sqlite3; its study refuses
workers that cannot import its build function."""

import json
import sqlite3
import subprocess
import sys
import textwrap

from tests.conftest import ROOT, run_hpo

SCRIPT = """
import numpy as np
import keras
import hpo


def build(params, input_shape, n_outputs):
    inputs = keras.Input(input_shape)
    x = keras.layers.Dense(params["units"], activation="relu")(inputs)
    x = keras.layers.Dropout(params["dropout"])(x)
    return keras.Model(inputs, keras.layers.Dense(n_outputs)(x))


rng = np.random.default_rng(0)
x = rng.normal(size=(160, 4)).astype("float32")
y = (x @ np.array([1.0, -2.0, 0.5, 0.0], dtype="float32"))[:, None]
study = hpo.tune(build, data=(x[:120], y[:120], x[120:], y[120:]),
                 space={"units": (4, 16), "dropout": (0.0, 0.3), "learning_rate": (1e-3, 1e-2, "log"),
                        "batch_size": [16, 32]},
                 seeds=3, trials=3, storage="sqlite:///{db}", study_name="mine", metric="val_loss", max_epochs=3)
print("TRIALS", len(study.trials), type(study).__name__)
"""


def test_tune_runs_in_a_subprocess_and_stores_what_hpo_run_stores(tmp_path):
    db = tmp_path / "tune.db"
    script = tmp_path / "notebook.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("{db}", str(db)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TRIALS 3 Study" in out.stdout
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT t.number, a.key, a.value_json FROM trials t JOIN trial_user_attributes a "
                        "USING (trial_id) ORDER BY t.number").fetchall()
    spec = json.loads(conn.execute("SELECT value_json FROM study_user_attributes WHERE key = 'hpo_spec'").fetchone()[0])
    conn.close()
    attrs = {}
    for number, key, value in rows:
        attrs.setdefault(number, {})[key] = json.loads(value)
    assert sorted(attrs) == [0, 1, 2]
    for a in attrs.values():
        assert {"mean", "std", "seed_scores", "seeds", "best_epochs", "epochs_run", "fit_seconds", "curves",
                "training_path", "backend"} <= set(a)
        assert a["seeds"] == [0, 1, 2] and a["training_path"] == "vectorized"
    # The spec records that the build function and the arrays came from Python.
    assert spec["model"]["build"] == "python:mine.build" and spec["data"]["loader"] == "python:mine.data"
    assert len(spec["data"]["loader_sha256"]) == 64

    # A worker elsewhere cannot import a notebook's function: it says so, in one line.
    result = run_hpo("worker", "--study-name", "mine", "--storage", f"sqlite:///{db}", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "handed over from Python (hpo.tune)" in result.stderr and "not importable" in result.stderr
