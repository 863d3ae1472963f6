"""Your own model and data: build and loader hooks through the real `hpo` command, workers
that join from elsewhere, and every bad hook stopped before any trial."""

import json
import shutil
import sqlite3
import textwrap

import pytest

from tests.conftest import run_hpo

BUILD = """
import keras


def build(params, input_shape, n_outputs):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv1D(params["filters"], params["kernel_size"], activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dropout(params["dropout"])(x)
    return keras.Model(inputs, keras.layers.Dense(n_outputs)(x))
"""

LOADER = """
import numpy as np


def load():
    rng = np.random.default_rng(0)
    series = np.sin(np.arange(300) / 8) + 0.1 * rng.standard_normal(300)
    x = np.lib.stride_tricks.sliding_window_view(series, 10)[:-1, :, None].astype("float32")
    y = series[10:, None].astype("float32")
    return x[:220], y[:220], x[220:], y[220:]
"""

STUDY = """
name = "conv"
seeds = 2
trials = 2
[data]
loader = "data.py:load"
[model]
build = "models.py:build"
[training]
max_epochs = 2
patience = 2
[space]
filters = { low = 2, high = 6 }
kernel_size = { choices = [3, 12] }
dropout = { low = 0.0, high = 0.3 }
batch_size = 32
"""


def study_folder(path, study=STUDY, build=BUILD, loader=LOADER):
    path.mkdir(parents=True, exist_ok=True)
    (path / "models.py").write_text(textwrap.dedent(build))
    (path / "data.py").write_text(textwrap.dedent(loader))
    (path / "conv.toml").write_text(textwrap.dedent(study))
    return path / "conv.toml"


def attrs_by_trial(db):
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT t.number, t.state, a.key, a.value_json FROM trials t "
                        "JOIN trial_user_attributes a USING (trial_id)").fetchall()
    conn.close()
    out = {}
    for number, state, key, value in rows:
        out.setdefault(number, {"state": state})[key] = json.loads(value)
    return out


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    study = study_folder(root / "project")
    db = root / "conv.db"
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    # From a working directory that is not the study's: the hooks resolve beside the file.
    run_hpo("run", str(study), "--storage", f"sqlite:///{db}", cwd=elsewhere)
    return root, study, db


def test_a_user_build_and_loader_run_vectorised_and_store_every_attribute(conv_run):
    _, _, db = conv_run
    trials = attrs_by_trial(db)
    assert len(trials) == 2
    for t in trials.values():
        # kernel_size 12 does not fit windows of 10: that trial fails alone, with its reason.
        if t["state"] == "FAIL":
            assert "fail_reason" in t
            continue
        assert t["training_path"] == "vectorized" and t["backend"] == "jax"
        assert {"mean", "std", "seed_scores", "seeds", "best_epochs", "epochs_run", "fit_seconds", "curves"} <= set(t)
        assert len(t["seed_scores"]) == 2


def test_a_second_worker_joins_from_its_own_copy_of_the_study_folder(conv_run):
    root, study, db = conv_run
    copy = root / "other_machine"
    shutil.copytree(study.parent, copy)
    result = run_hpo("worker", "--study-name", "conv", "--storage", f"sqlite:///{db}", "--trials", "3",
                     "--study-dir", str(copy), "--worker-index", "1", cwd=root)
    assert "1 complete" in result.stdout or "1 failed" in result.stdout
    assert len(attrs_by_trial(db)) == 3


def test_a_worker_refuses_a_changed_build_file_naming_both_hashes(conv_run):
    root, study, db = conv_run
    changed = root / "changed"
    shutil.copytree(study.parent, changed)
    (changed / "models.py").write_text((changed / "models.py").read_text() + "\n# tuned by hand\n")
    result = run_hpo("worker", "--study-name", "conv", "--storage", f"sqlite:///{db}", "--trials", "4",
                     "--study-dir", str(changed), check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "[model.build]" in result.stderr and "recorded sha256" in result.stderr and "found" in result.stderr
    assert len(attrs_by_trial(db)) == 3


BAD_HOOKS = {
    "missing file": ({"study": STUDY.replace("models.py:build", "nowhere.py:build")}, "nowhere.py does not exist"),
    "missing function": ({"study": STUDY.replace("models.py:build", "models.py:make")}, "defines no make"),
    "wrong signature": ({"build": BUILD.replace("def build(params, input_shape, n_outputs)",
                                                "def build(params, input_shape)")},
                        "is defined as build(params, input_shape) but hpo calls build(params, input_shape, "
                        "n_outputs) or build(hp)"),
    "keyword-only n_outputs": ({"build": BUILD.replace("def build(params, input_shape, n_outputs)",
                                                       "def build(params, input_shape, *, n_outputs)")},
                               "defined as build(params, input_shape, *, n_outputs) but hpo calls build(params, "
                               "input_shape, n_outputs) or build(hp) (KerasTuner's form), passing each argument "
                               "by position"),
    "build exits": ({"build": BUILD.replace("    inputs =", "    import sys\n    sys.exit(0)\n    inputs =")},
                    "models.py:build called sys.exit(0), which would end hpo itself; return a value or raise"),
    "build file exits on import": ({"build": BUILD + "\nimport sys\nsys.exit()\n"},
                                   "models.py calls, when imported, sys.exit(), which would end hpo itself"),
    "loader exits": ({"loader": LOADER.replace("    rng =", "    raise SystemExit('no data')\n    rng =")},
                     "data.py:load called sys.exit('no data')"),
    "build raises": ({"build": BUILD.replace("    inputs =", "    raise RuntimeError('no GPU here')\n    inputs =")},
                     # The point named is the space's own, not every default a build is handed.
                     "raised RuntimeError: no GPU here when built with the first point of the space "
                     "(batch_size=32, dropout=0, filters=2, kernel_size=3); fix it"),
    "not a model": ({"build": BUILD.replace("return keras.Model(inputs, keras.layers.Dense(n_outputs)(x))",
                                            "return x")}, "not a keras.Model"),
    "wrong width": ({"build": BUILD.replace("Dense(n_outputs)", "Dense(3)")},
                    "returns 3 outputs per sample but the data has 1"),
    "loader NaN": ({"loader": LOADER.replace("return x[:220]", "x[0, 0, 0] = np.nan\n    return x[:220]")},
                   "x_train holds 1 NaN or infinite values"),
    "loader shapes": ({"loader": LOADER.replace("y[:220], x[220:]", "y[:219], x[220:]")},
                      "x_train has 220 samples but y_train 219"),
    "loader tuple": ({"loader": LOADER.replace("return x[:220], y[:220], x[220:], y[220:]", "return x, y")},
                     "expected (x_train, y_train, x_val, y_val)"),
    "1-D x for an lstm": ({"study": STUDY.replace('build = "models.py:build"', 'family = "lstm"')
                           .replace("filters = { low = 2, high = 6 }\nkernel_size = { choices = [3, 12] }\n", "")
                           .replace("dropout = { low = 0.0, high = 0.3 }", "units = { low = 2, high = 4 }"),
                           "loader": LOADER.replace("[:-1, :, None]", "[:-1, 0]")},
                          "data.py:load: x_train has shape (220,), but the lstm family reads (samples, steps, "
                          "features); reshape x_train and x_val (x.reshape(len(x), -1, 1)"),
    "unknown loss": ({"study": STUDY.replace("patience = 2", 'patience = 2\nloss = "msee"')}, "[training.loss]"),
}


@pytest.mark.parametrize("case", list(BAD_HOOKS))
def test_a_bad_hook_stops_before_any_trial_in_one_line_and_writes_nothing(case, tmp_path):
    changes, expected = BAD_HOOKS[case]
    study = study_folder(tmp_path / "p", **changes)
    db = tmp_path / "bad.db"
    result = run_hpo("run", str(study), "--storage", f"sqlite:///{db}", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: spec "), result.stderr
    assert expected in result.stderr
    assert not db.exists()


def test_text_rnn_runs_two_trials_of_two_seeds(tmp_path):
    db = tmp_path / "text.db"
    result = run_hpo("run", "text_rnn", "--trials", "2", "--seeds", "2", "--max-epochs", "2",
                     "--storage", f"sqlite:///{db}", env={"TF_CPP_MIN_LOG_LEVEL": "2"})
    # Keras' text layers import TensorFlow on any backend; hpo imports it without its native lines.
    assert not any(s in result.stderr for s in ("absl", "oneDNN", "cudart_stub")), result.stderr[-2000:]
    trials = attrs_by_trial(db)
    assert len(trials) == 2
    for t in trials.values():
        assert t["training_path"] == "vectorized" and len(t["seed_scores"]) == 2
        assert all(0.0 <= s <= 1.0 for s in t["seed_scores"])  # val_accuracy


def test_a_build_that_fails_for_some_params_fails_that_trial_alone_with_its_reason(tmp_path):
    # The grid visits both kernels: 3 fits the windows of 10, 12 does not.
    study = study_folder(tmp_path / "p", study=STUDY.replace("filters = { low = 2, high = 6 }", "filters = 2")
                         .replace("dropout = { low = 0.0, high = 0.3 }", "dropout = 0.0")
                         .replace("[space]", '[sampler]\nkind = "grid"\n[space]'))
    db = tmp_path / "grid.db"
    result = run_hpo("run", str(study), "--storage", f"sqlite:///{db}", "--seeds", "1", "--max-epochs", "1")
    assert "1 complete, 0 pruned, 1 failed" in result.stdout
    trials = attrs_by_trial(db)
    failed = [t for t in trials.values() if t["state"] == "FAIL"]
    complete = [t for t in trials.values() if t["state"] == "COMPLETE"]
    assert len(failed) == 1 and len(complete) == 1
    assert failed[0]["fail_reason"] and "seed_scores" not in failed[0]
    assert len(complete[0]["seed_scores"]) == 1
