"""KerasTuner builds, unchanged: hpo's `hp` against KerasTuner's semantics, the three
shipped `build(hp)` studies through the real `hpo run` (vectorised, the space they
declare recorded), `hpo.tune` without a space, and every bad build stopped before any
trial in one line."""

import json
import shutil
import sqlite3

import numpy as np
import optuna
import pytest

from hpo.specs import STUDIES_DIR, load_spec
from hpo.specs.tuner_hp import HyperParameters, UnsupportedHyperParameter, is_hp_build
from tests.conftest import run_hpo
from tests.test_api import run_notebook


def declare_all(hp):
    units = hp.Int("units", 32, 512, step=32)
    hp.Int("layers", 6, 13, step=3)
    hp.Int("width", 2, 32, step=2, sampling="log")
    hp.Float("lr", 1e-4, 1e-2, sampling="log")
    hp.Float("dropout", 0.0, 0.5, step=0.1)
    hp.Choice("activation", ["relu", "tanh"])
    hp.Fixed("classes", 10)
    if hp.Boolean("sgd"):
        hp.Float("momentum", 0.0, 0.9, parent_name="sgd", parent_values=[True])
    with hp.conditional_scope("sgd", [False]):
        hp.Choice("beta", [0.9, 0.99])
    return units


def raw_distributions(trial):
    out = {}
    for name, d in trial.distributions.items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            out[name] = {"choices": list(d.choices)}
        else:
            out[name] = {"low": d.low, "high": d.high, "log": d.log, **({"step": d.step} if d.step else {})}
    return out


def test_defaults_are_kerastuners_first_point():
    hp = HyperParameters()
    assert declare_all(hp) == 32
    # min_value, the first choice, False; a step grid ends on its last step (13 -> 12).
    assert hp.values == {"units": 32, "layers": 6, "width": 2, "lr": 1e-4, "dropout": 0.0, "activation": "relu",
                         "classes": 10, "sgd": False, "beta": 0.9}
    assert hp.declared["layers"].high == 12
    assert hp.declared["width"].choices == (2, 4, 8, 16, 32)  # log with a step: a factor apart


def test_each_call_is_the_trials_suggestion_of_the_same_name_and_range():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_sgd = set()
    for _ in range(12):
        trial = study.ask()
        hp = HyperParameters(trial=trial)
        declare_all(hp)
        assert hp.values == {**trial.params, "classes": 10}
        # The declared space is Optuna's, plus the fixed value; inactive names are neither.
        assert {n: v for n, v in declare_all_raw(hp).items() if n != "classes"} == raw_distributions(trial)
        assert ("momentum" in trial.params) == trial.params["sgd"] != ("beta" in trial.params)
        seen_sgd.add(trial.params["sgd"])
        # The trial's params answer the same calls again: the build each seed runs.
        again = HyperParameters(values=trial.params)
        declare_all(again)
        assert again.values == hp.values
        study.tell(trial, 0.0)
    assert seen_sgd == {True, False}


def declare_all_raw(hp):
    from hpo.specs.tuner_hp import declared_raw

    return declared_raw(hp.declared)


def test_inactive_unknown_and_unsupported_calls_behave_as_in_kerastuner():
    hp = HyperParameters()
    declare_all(hp)
    assert hp.get("beta") == 0.9 and "beta" in hp
    # Under an inactive condition a call returns None and the name has no value.
    assert hp.Float("momentum", 0.0, 0.9, parent_name="sgd", parent_values=[True]) is None
    assert "momentum" not in hp.values and "momentum" not in hp.declared
    with pytest.raises(ValueError, match="momentum is currently inactive"):
        hp.get("momentum")
    with pytest.raises(KeyError, match="nope does not exist"):
        hp.get("nope")
    with pytest.raises(ValueError, match="nope not defined"):
        with hp.conditional_scope("nope", [1]):
            pass
    # A name declared again keeps its value, whatever the new range.
    assert hp.Int("units", 64, 128) == 32
    with hp.name_scope("block"):
        hp.Int("units", 1, 4)
    assert hp.values["block/units"] == 1
    with pytest.raises(UnsupportedHyperParameter, match="hp.merge"):
        hp.merge(None)
    with pytest.raises(UnsupportedHyperParameter, match="reverse_log"):
        hp.Float("x", 0.1, 1.0, sampling="reverse_log")


def test_a_build_is_kerastuners_when_it_takes_one_argument():
    assert is_hp_build(lambda hp: None)
    assert not is_hp_build(lambda params, input_shape, n_outputs: None)
    assert not is_hp_build(lambda *args: None)  # either: hpo's own form, as before
    assert not is_hp_build(lambda: None)


EXPECTED = {
    "tuner_mlp": {"units": {"low": 32, "high": 512, "log": False, "step": 32},
                  "activation": {"choices": ["relu", "tanh"]}, "dropout": {"choices": [False, True]},
                  "lr": {"low": 1e-4, "high": 1e-2, "log": True}},
    "tuner_layers": {"num_layers": {"low": 1, "high": 3, "log": False, "step": 1},
                     "activation": {"choices": ["relu", "tanh"]}, "dropout": {"choices": [False, True]},
                     "lr": {"low": 1e-4, "high": 1e-2, "log": True},
                     **{f"units_{i}": {"low": 32, "high": 512, "log": False, "step": 32} for i in range(3)}},
    "tuner_scoped": {"units": {"choices": [16, 32, 64, 128, 256]}, "dropout": {"choices": [False, True]},
                     "rate": {"low": 0.1, "high": 0.5, "log": False, "step": 0.1}, "classes": {"value": 10},
                     "optimizer": {"choices": ["adam", "sgd"]},
                     "learning_rate": {"low": 1e-3, "high": 1e-1, "log": True},
                     "momentum": {"low": 0.0, "high": 0.9, "log": False}},
}


def trial_rows(db):
    conn = sqlite3.connect(db)
    attrs = conn.execute("SELECT t.number, a.key, a.value_json FROM trials t JOIN trial_user_attributes a "
                         "USING (trial_id)").fetchall()
    params = conn.execute("SELECT t.number, p.param_name, p.distribution_json FROM trials t JOIN trial_params p "
                          "USING (trial_id)").fetchall()
    conn.close()
    out = {}
    for number, key, value in attrs:
        out.setdefault(number, {"params": {}})[key] = json.loads(value)
    for number, name, distribution in params:
        out[number]["params"][name] = json.loads(distribution)["attributes"]
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_shipped_kerastuner_build_runs_unchanged_vectorised_with_the_space_it_declares(name, tmp_path):
    db = tmp_path / f"{name}.db"
    run_hpo("run", name, "--trials", "3", "--seeds", "2", "--max-epochs", "2", "--storage", f"sqlite:///{db}")
    trials = trial_rows(db)
    assert len(trials) == 3
    union = {}
    for t in trials.values():
        assert t["training_path"] == "vectorized" and len(t["seed_scores"]) == 2
        assert all(0.0 <= s <= 1.0 for s in t["seed_scores"])  # the build's own accuracy metric
        # What the calls declared, as stored with the trial and as Optuna's distributions.
        assert set(t["params"]) == {n for n, p in t["hp_space"].items() if "value" not in p}
        for n, p in t["hp_space"].items():
            assert p == EXPECTED[name][n]
            if "choices" in p:
                assert t["params"][n]["choices"] == p["choices"]
            elif "low" in p:
                assert (t["params"][n]["low"], t["params"][n]["high"], t["params"][n]["log"]) == \
                       (p["low"], p["high"], p["log"])
        union.update(t["hp_space"])
    assert {"units", "lr", "num_layers", "optimizer"} & set(union)


def test_the_model_keeps_its_own_compile_and_a_traced_learning_rate():
    from hpo.train.engine import _config_key
    from hpo.specs.space import suggest_params
    from hpo.train.fit import _compiled_builder, _load_data

    spec = load_spec("tuner_mlp")
    params = suggest_params(spec, optuna.trial.FixedTrial({"units": 64, "activation": "tanh", "dropout": False,
                                                           "lr": 0.0025}))
    data = _load_data(spec, params, spec.seed)
    model = _compiled_builder(spec, params, data, len(data.x_train))()
    assert type(model.optimizer).__name__ == "Adam"
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(0.0025)
    assert model.get_compile_config()["loss"] == "sparse_categorical_crossentropy"
    other = _compiled_builder(spec, {**params, "lr": 0.008}, data, len(data.x_train))()
    # The learning rate is an optimizer variable: both share one compiled program.
    assert _config_key(model) == _config_key(other)


TUNE = """
import numpy as np
import hpo
import keras
from sklearn.datasets import load_digits


def build(hp):
    model = keras.Sequential([keras.layers.Dense(hp.Int("units", 8, 32, step=8), activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(hp.Float("lr", 1e-3, 1e-2, sampling="log")),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


x, y = load_digits(return_X_y=True)
x = (x / 16).astype("float32")
study = hpo.tune(build, data=(x[:300], y[:300], x[300:400], y[300:400]), seeds=2, trials=2,
                 storage="sqlite:///{db}", metric="val_accuracy", max_epochs=2)
print("TRIALS", len(study.trials))
"""


def test_tune_takes_a_kerastuner_build_without_a_space(tmp_path):
    db, out = run_notebook(tmp_path, TUNE)
    assert "TRIALS 2" in out.stdout
    for t in trial_rows(db).values():
        assert t["training_path"] == "vectorized"
        assert t["hp_space"] == {"units": {"low": 8, "high": 32, "log": False, "step": 8},
                                 "lr": {"low": 1e-3, "high": 1e-2, "log": True}}
        assert set(t["params"]) == {"units", "lr"}


BUILDS = (STUDIES_DIR / "tuner_builds.py").read_text()
COMPILE = """    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def build_layers"""
OWN_FORM = """

def own(params, input_shape, n_outputs):
    model = keras.Sequential([keras.Input(input_shape), layers.Dense(n_outputs, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    return model
"""
DROPOUT = '    if hp.Boolean("dropout"):\n        model.add(layers.Dropout(rate=0.25))\n'
RAISES = '    if not hp.Boolean("dropout"):\n        raise RuntimeError("no dropout")\n'
SEQUENTIAL = "    model = keras.Sequential()\n"
MLP_METRICS = 'metrics=["accuracy"],\n    )\n    return model\n\n\ndef build_layers'
BAD_BUILDS = {
    "raises at the first point": (
        {"builds": BUILDS.replace(DROPOUT, RAISES, 1)},
        "tuner_builds.py:build raised RuntimeError: no dropout when built with the first point"),
    "uncompiled": ({"builds": BUILDS.replace(COMPILE, "    return model\n\n\ndef build_layers")},
                   "tuner_builds.py:build returned an uncompiled model; a build(hp) compiles its own"),
    "compiled in hpo's form": ({"builds": BUILDS + OWN_FORM, "ref": "tuner_builds.py:own"},
                               "tuner_builds.py:own returned a compiled model, but hpo compiles the model of a "
                               "build(params, input_shape, n_outputs) itself"),
    "unsupported method": (
        {"builds": BUILDS.replace(SEQUENTIAL, "    hp.copy()\n" + SEQUENTIAL, 1)},
        "tuner_builds.py:build calls hp.copy, which hpo's hp does not implement"),
    "no such metric": ({"builds": BUILDS.replace(MLP_METRICS, MLP_METRICS.replace("accuracy", "mae"))},
                       'compiles no "accuracy" metric'),
    "model space in [space]": ({"space": "[space]\nlearning_rate = { low = 1e-4, high = 1e-2, log = true }\n"},
                               "[space.learning_rate] a build(hp) declares its space with its hp calls"),
}


@pytest.mark.parametrize("case", list(BAD_BUILDS))
def test_a_bad_kerastuner_build_stops_before_any_trial_in_one_line_naming_the_file(case, tmp_path):
    changes, expected = BAD_BUILDS[case]
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "tuner_builds.py").write_text(changes.get("builds", BUILDS))
    toml = (STUDIES_DIR / "tuner_mlp.toml").read_text() + changes.get("space", "")
    ref = changes.get("ref", "tuner_builds.py:build")
    (folder / "tuner_mlp.toml").write_text(toml.replace("tuner_builds.py:build", ref))
    db = tmp_path / "bad.db"
    result = run_hpo("run", str(folder / "tuner_mlp.toml"), "--storage", f"sqlite:///{db}", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: spec "), result.stderr
    assert expected in result.stderr, result.stderr
    assert not db.exists()
    shutil.rmtree(folder)
