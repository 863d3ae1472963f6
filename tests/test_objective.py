import optuna
import pytest

from hpo.spec import parse_spec
from hpo.storage import get_storage
from hpo.study import create_study, load_study
from hpo.workers import run_trials

BEALE = {"name": "b", "seeds": 3, "model": {"family": "analytic", "function": "beale", "noise": 0.2},
         "training": {"max_epochs": 6, "patience": 1},
         "space": {"x": {"low": -4.5, "high": 4.5}, "y": {"low": -4.5, "high": 4.5}}}


def run(tmp_path, raw, trials=6):
    spec = parse_spec(raw)
    study = create_study(spec, get_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    run_trials(study, spec, budget=trials, echo=lambda line: None)
    return study, spec


def test_mean_plus_k_std_is_risk_averse(tmp_path):
    study, _ = run(tmp_path, {**BEALE, "objective": {"mode": "mean+k*std", "k": 2.0}, "pruner": {"kind": "none"}})
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        assert t.value == pytest.approx(t.user_attrs["mean"] + 2.0 * t.user_attrs["std"])
    assert study.metric_names == ["value mean + 2*std"]


def test_pareto_minimises_mean_and_std_without_pruning(tmp_path):
    study, spec = run(tmp_path, {**BEALE, "objective": {"mode": "pareto"}})
    assert spec.pruner.kind == "none" and [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == 6
    for t in complete:
        assert t.values == pytest.approx([t.user_attrs["mean"], t.user_attrs["std"]])
    assert study.metric_names == ["value mean", "value std"]


def test_a_worker_rebuilds_the_study_from_the_database_alone(tmp_path):
    study, spec = run(tmp_path, BEALE, trials=2)
    loaded, rebuilt = load_study(get_storage(f"sqlite:///{tmp_path / 'o.db'}"), "b")
    assert rebuilt.space == spec.space and rebuilt.seed_values == spec.seed_values
    assert isinstance(loaded.pruner, optuna.pruners.MedianPruner)
    run_trials(loaded, rebuilt, budget=4, echo=lambda line: None)
    assert len(loaded.get_trials()) == 4


@pytest.mark.parametrize("sampler, pruner", [("tpe", "median"), ("random", "percentile"),
                                             ("cmaes", "successive_halving"), ("tpe", "hyperband"),
                                             ("random", "none")])
def test_every_sampler_and_pruner_runs_a_study(tmp_path, sampler, pruner):
    study, _ = run(tmp_path, {**BEALE, "sampler": {"kind": sampler, "n_startup_trials": 2},
                              "pruner": {"kind": pruner, "n_startup_trials": 1, "n_warmup_steps": 0}}, trials=5)
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 5


def test_grid_sampler_walks_the_grid(tmp_path):
    raw = {**BEALE, "sampler": {"kind": "grid"}, "pruner": {"kind": "none"},
           "space": {"x": {"choices": [1.0, 3.0]}, "y": {"low": 0.0, "high": 1.0, "step": 0.5}}}
    study, _ = run(tmp_path, raw, trials=100)
    assert sorted((t.params["x"], t.params["y"]) for t in study.get_trials()) == [
        (1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (3.0, 0.0), (3.0, 0.5), (3.0, 1.0)]


def test_a_live_progress_line_shows_on_a_terminal_and_not_in_a_pipe(tmp_path):
    import os
    import pty
    import subprocess
    import sys

    from tests.conftest import ROOT, run_hpo

    spec = tmp_path / "live.toml"
    spec.write_text('name = "live"\nseeds = 2\ntrials = 2\n[model]\nfamily = "analytic"\nfunction = "sphere"\n'
                    'epoch_seconds = 0.2\n[training]\nmax_epochs = 4\npatience = 4\n[pruner]\nkind = "none"\n'
                    '[space]\nx = { low = -1.0, high = 1.0 }\n')
    piped = run_hpo("run", str(spec), "--storage", f"sqlite:///{tmp_path / 'p.db'}").stdout
    assert "epoch/s" not in piped and "seeds' mean" not in piped
    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    # A fresh pty is 0 columns wide, in which tqdm draws nothing: give it a real width.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "run", str(spec), "--storage", f"sqlite:///{tmp_path / 't.db'}"],
                            cwd=ROOT, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "trial 0" in text and "seeds' mean" in text
