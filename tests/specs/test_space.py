import optuna
import pytest

from hpo.specs import load_spec
from hpo.specs.space import default_params, grid_search_space, suggest_params


def test_suggested_params_stay_in_the_declared_ranges():
    spec = load_spec("sine_lstm")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        params = suggest_params(spec, study.ask())
        assert 4 <= params["units"] <= 32 and isinstance(params["units"], int)
        assert params["layers"] in (1, 2)
        assert 0.0 <= params["dropout"] <= 0.3
        assert 1e-3 <= params["learning_rate"] <= 3e-2
        assert params["batch_size"] in (32, 64)
        assert params["optimizer"] == "adam" and params["window"] == 20


def test_conditional_parameters_are_asked_only_when_they_matter():
    spec = load_spec("digits_mlp")
    params = suggest_params(spec, optuna.trial.FixedTrial({
        "units": 32, "layers": 1, "dropout": 0.1, "learning_rate": 0.01, "batch_size": 32, "optimizer": "adam",
        "lr_schedule": "constant", "initializer": "he_normal", "activation": "relu", "l2": 1e-4}))
    assert params["momentum"] == 0.0 and params["lr_decay"] == 0.0
    sgd = suggest_params(spec, optuna.trial.FixedTrial({
        "units": 32, "layers": 1, "dropout": 0.1, "learning_rate": 0.01, "batch_size": 32, "optimizer": "sgd",
        "momentum": 0.9, "nesterov": True, "lr_schedule": "exponential", "lr_decay": 0.05,
        "initializer": "he_normal", "activation": "relu", "l2": 1e-4}))
    assert (sgd["momentum"], sgd["nesterov"], sgd["lr_decay"]) == (0.9, True, 0.05)


def test_fixed_trial_replays_the_same_params():
    spec = load_spec("sine_lstm")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    params = suggest_params(spec, trial)
    assert suggest_params(spec, optuna.trial.FixedTrial(trial.params)) == params


def test_defaults_depend_on_the_family():
    assert default_params(load_spec("digits_mlp"))["activation"] == "relu"
    assert default_params(load_spec("sine_lstm"))["activation"] == "tanh"


def test_grid_space_enumerates_ranges_and_choices():
    spec = load_spec("sequence_toy")
    grid = grid_search_space(spec)
    assert grid["units"] == [1, 5, 10] and grid["window"] == [1, 2, 3]
    assert "learning_rate" not in grid  # a continuous range has no grid; the spec check refuses grid for it
    with pytest.raises(Exception):
        suggest_params(spec, optuna.trial.FixedTrial({}))
