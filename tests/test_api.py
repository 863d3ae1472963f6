"""hpo.tune from Python, in a real subprocess, read back with sqlite3; its study refuses
workers that cannot import its build function."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT, run_hpo


def notebook_env(*paths) -> dict:
    """A notebook's environment: no backend chosen for it (this test process may have set
    one), hpo and `paths` importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "HPO_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, [*paths, ROOT]))
    return env


def run_python(script, cwd, *paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=notebook_env(*paths))


def run_notebook(tmp_path, source: str, db_name: str = "tune.db") -> tuple[Path, subprocess.CompletedProcess]:
    """`source` (a notebook's code, `{db}` standing for its study database) run as a script
    in a fresh Python, which must succeed: the database's path and the run."""
    db = tmp_path / db_name
    script = tmp_path / "notebook.py"
    script.write_text(textwrap.dedent(source).replace("{db}", str(db)))
    out = run_python(script, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return db, out

SCRIPT = """
import numpy as np
import hpo
import keras


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
    db, out = run_notebook(tmp_path, SCRIPT)
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


KERAS_FIRST = """
import keras
import numpy as np
import hpo


def build(params, input_shape, n_outputs):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, keras.layers.Dense(n_outputs)(keras.layers.Dense(params["units"])(inputs)))


x = np.random.default_rng(0).normal(size=(60, 3)).astype("float32")
study = hpo.tune(build, data=(x[:48], x[:48, :1], x[48:], x[48:, :1]), space={"units": (2, 4)}, seeds=2,
                 trials=1, storage="sqlite:///{db}", max_epochs=1)
print("LOADED", keras.backend.backend(), "TRAINED", study.trials[0].user_attrs["backend"])
"""


def test_tune_after_keras_was_imported_trains_on_the_backend_keras_loaded(tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(KERAS_FIRST.replace("{db}", str(tmp_path / "k.db")))
    out = run_python(script, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = out.stdout.split("LOADED ")[1].split()[0]
    assert f"TRAINED {loaded}" in out.stdout


MODULE = """
import keras
import numpy as np


def build(params, input_shape, n_outputs):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv1D(params["filters"], 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(n_outputs)(x))


def load():
    series = np.sin(np.arange(160) / 8)
    x = np.lib.stride_tricks.sliding_window_view(series, 10)[:-1, :, None].astype("float32")
    y = series[10:, None].astype("float32")
    return x[:120], y[:120], x[120:], y[120:]
"""

IMPORTED = """
import hpo
import mymodels

hpo.tune(mymodels.build, data=mymodels.load, space={"filters": (2, 4)}, seeds=2, trials=1,
         storage="sqlite:///{db}", study_name="imported", max_epochs=1)
"""


def test_a_tuned_importable_build_is_joined_by_a_worker_that_imports_it(tmp_path):
    modules = tmp_path / "lib"
    modules.mkdir()
    (modules / "mymodels.py").write_text(MODULE)
    db = tmp_path / "imp.db"
    script = tmp_path / "notebook.py"
    script.write_text(IMPORTED.replace("{db}", str(db)))
    out = run_python(script, tmp_path, modules)
    assert out.returncode == 0, out.stderr[-3000:]
    conn = sqlite3.connect(db)
    spec = json.loads(conn.execute("SELECT value_json FROM study_user_attributes WHERE key = 'hpo_spec'").fetchone()[0])
    conn.close()
    # Stored by module name with its file's hash, so a worker anywhere can import and check it.
    assert spec["model"]["build"] == "mymodels:build" and spec["data"]["loader"] == "mymodels:load"
    digest = hashlib.sha256((modules / "mymodels.py").read_bytes()).hexdigest()
    assert spec["model"]["build_sha256"] == digest == spec["data"]["loader_sha256"]
    result = run_hpo("worker", "--study-name", "imported", "--storage", f"sqlite:///{db}", "--trials", "2",
                     env=notebook_env(modules), cwd=tmp_path)
    assert "1 complete" in result.stdout


def test_tune_given_three_arrays_speaks_of_the_data_argument_and_writes_nothing(tmp_path):
    import numpy as np
    import pytest

    import hpo
    from hpo.errors import SpecError

    x = np.zeros((10, 2), dtype="float32")
    db = tmp_path / "t.db"
    with pytest.raises(SpecError) as e:
        hpo.tune(lambda params, input_shape, n_outputs: None, data=(x, x, x), space={"units": (2, 4)},
                 storage=f"sqlite:///{db}", study_name="three")
    assert "[data] the data= argument: expected (x_train, y_train, x_val, y_val), got tuple of 3" in str(e.value)
    assert "loader" not in str(e.value)
    assert not db.exists()


RUN_AND_READ = """
import hpo
import hpo.export
import hpo.plots
from hpo.results import build_report, trials_frame

storage = "sqlite:///{db}"
study = hpo.run("beale", storage, trials=3)
print("FRAME", len(trials_frame(storage, "beale")), "BEST", build_report(storage, "beale").comparison is not None)
print("NAMES", callable(hpo.results.seed_scores_frame), callable(hpo.plots.seed_scores_figure),
      callable(hpo.export.validation_split))
"""


def test_hpo_run_closes_like_hpo_run_and_the_documented_modules_import(tmp_path):
    """`hpo.run` ends with the lines `hpo run` ends with; `hpo.results`, `hpo.plots` and
    `hpo.export` answer as the README writes them, imported or reached as attributes."""
    _, out = run_notebook(tmp_path, RUN_AND_READ)
    assert "done in" in out.stdout and "best trial #" in out.stdout and "replay it with: hpo replay" in out.stdout
    assert "FRAME 3 BEST True" in out.stdout and "NAMES True True True" in out.stdout
