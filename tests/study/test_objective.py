import optuna
import pytest

from hpo.specs import parse_spec
from hpo.store.storage import get_storage
from hpo.study.study import create_study, load_study
from hpo.study.workers import run_trials

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
    assert "trial 0" in text and "value so far" in text
    # The first epoch pays for building and compiling: the line shows that start-up apart.
    assert "start-up" in text and "s/epoch" in text


def test_the_live_line_times_start_up_apart_from_later_epochs():
    from hpo.study.objective import progress_timing

    # Seen: "6.81s/epoch" for a 7 s trial whose first epoch was almost all compiling.
    assert progress_timing(6.8, 0.0, 0) == "start-up, compiling and epoch 1 6.8s"
    assert progress_timing(6.8, 0.4, 4) == "start-up and compiling 6.7s, then 0.1s/epoch"



# Seeds whose noise outweighs what is left to learn after a few epochs: each seed reaches
# its best at its own epoch, so the mean of the seeds' current values stays above the mean
# of their best values, the trial's score.
NOISY = {"name": "noisy", "seeds": 3, "seed": 7, "model": {"family": "analytic", "function": "sphere", "noise": 0.3},
         "training": {"max_epochs": 8, "patience": 8}, "space": {"x": {"low": -1.0, "high": 1.0}}}


def _so_far(curves, epoch, last=False):
    """The old and the new rule's inputs: each seed's value at, or best up to, `epoch`."""
    return [c["val_metric"][epoch - 1] if last else min(c["val_metric"][:epoch]) for c in curves]


@pytest.mark.parametrize("raw", [
    NOISY,
    {**NOISY, "objective": {"mode": "mean+k*std", "k": 1.5}},
    {**NOISY, "training": {"max_epochs": 8, "score": "last"}},
    {**NOISY, "seeds": {"min": 2, "max": 4}, "pruner": {"kind": "none"}},
], ids=["mean", "mean+k*std", "score-last", "adaptive-seeds"])
def test_the_pruner_sees_the_score_the_trial_would_get_if_it_stopped_now(tmp_path, raw):
    import statistics

    study, spec = run(tmp_path, {"pruner": {"n_startup_trials": 1, "n_warmup_steps": 0}, **raw}, trials=6)
    finished = [t for t in study.get_trials() if t.state.is_finished() and t.intermediate_values]
    assert len(finished) == 6
    for t in finished:
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        # Steps are hpo's epochs, counted from 1 like the stored curves.
        assert steps == list(range(1, len(t.user_attrs["curves"][0]["val_metric"]) + 1))
        last = spec.training.score == "last"
        first_batch = t.user_attrs["curves"][:spec.seeds]
        for step, value in zip(steps, values):
            scores = _so_far(first_batch, step, last)
            mean, std = statistics.fmean(scores), statistics.stdev(scores)
            k = spec.objective.k if spec.objective.mode == "mean+k*std" else 0.0
            assert value == pytest.approx(mean + k * std)
        if not last:
            assert values == sorted(values, reverse=True)  # never worse than before (minimised)
        first_scores = t.user_attrs["seed_scores"][:spec.seeds]
        if spec.seeds_max is None and t.state == optuna.trial.TrialState.COMPLETE:
            assert values[-1] == pytest.approx(t.value)
        assert values[-1] == pytest.approx(statistics.fmean(first_scores) + k * statistics.stdev(first_scores))


def test_a_trial_the_old_rule_would_prune_is_kept(tmp_path):
    from hpo.train import analytic

    spec = parse_spec({**NOISY, "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0}})
    study = create_study(spec, get_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    x = 0.3
    curves = [{"val_metric": analytic.curve("sphere", {"x": x}, seed=s, epochs=8, noise=0.3)}
              for s in spec.seed_values]
    new = [sum(_so_far(curves, e)) / 3 for e in range(1, 9)]
    old = [sum(_so_far(curves, e, last=True)) / 3 for e in range(1, 9)]
    # The median pruner compares a trial's best report so far with the others' at that step.
    old_best = [min(old[:e]) for e in range(1, 9)]
    assert any(n < o for n, o in zip(new, old_best))  # the seeds peak at different epochs
    # A complete trial between the two rules at every epoch.
    between = {e: (n + o) / 2 for e, (n, o) in enumerate(zip(new, old_best), start=1)}
    study.add_trial(optuna.trial.create_trial(
        params={"x": 0.9}, distributions={"x": optuna.distributions.FloatDistribution(-1.0, 1.0)},
        value=between[8], intermediate_values=between,
        user_attrs={"mean": between[8], "std": 0.0, "seeds": [0], "seed_scores": [between[8]]}))
    # Under the old rule this trial would be pruned ...
    probe = study.ask({"x": optuna.distributions.FloatDistribution(-1.0, 1.0)})
    pruned_at = next((e for e, v in enumerate(old, start=1) if probe.report(v, e) or probe.should_prune()), None)
    assert pruned_at is not None
    study.tell(probe, state=optuna.trial.TrialState.PRUNED)
    # ... the objective, reporting the score so far, keeps it, and its value is the last report.
    study.enqueue_trial({"x": x})
    run_trials(study, spec, budget=3, echo=lambda line: None)
    kept = study.get_trials()[-1]
    assert kept.params == {"x": x} and kept.state == optuna.trial.TrialState.COMPLETE
    assert kept.value == pytest.approx(new[-1]) == pytest.approx(kept.intermediate_values[8])


def test_a_pruned_trial_replays_up_to_the_epoch_it_was_pruned_at(tmp_path):
    from hpo.study.replay import replay_trial

    # Little noise: each seed's best epoch is its last, so replaying one epoch short differs.
    # Two warm-up epochs: no trial is pruned before epoch 3.
    raw = {**NOISY, "model": {**NOISY["model"], "noise": 0.001},
           "pruner": {"n_startup_trials": 1, "n_warmup_steps": 2}}
    study, _ = run(tmp_path, raw, trials=8)
    pruned = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and min(t.user_attrs["pruned_at_epoch"] for t in pruned) == 3
    for t in pruned:
        assert max(t.intermediate_values) == t.user_attrs["pruned_at_epoch"]
        result = replay_trial(f"sqlite:///{tmp_path / 'o.db'}", "noisy", t.number)
        assert result.replayed == pytest.approx(t.user_attrs["seed_scores"], abs=0, rel=1e-12)


def test_a_median_pruner_judges_each_epoch_on_the_complete_trials_read_once_a_trial(tmp_path):
    # Optuna's should_prune reads every unfinished trial from the database at each epoch
    # to find the complete ones; the objective's view reads them once, again only after
    # its interval, and the pruner decides as it does on the study itself.
    from hpo.study.objective import _CompleteTrials

    storage = get_storage(f"sqlite:///{tmp_path / 'p.db'}")
    study = optuna.create_study(storage=storage, pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for curve in ([5.0, 4.0, 3.0], [6.0, 5.0, 4.0], [4.0, 3.5, 3.0]):
        study.add_trial(optuna.create_trial(value=curve[-1], intermediate_values=dict(enumerate(curve))))
    reads = []
    backend = storage._get_trials
    storage._get_trials = lambda *a, **k: (reads.append(True), backend(*a, **k))[1]
    now = [0.0]
    trial = study.ask()
    view = _CompleteTrials(study, clock=lambda: now[0])
    decisions = []
    for step, value in enumerate([4.5, 5.5, 2.0]):
        trial.report(value, step)
        frozen = study._storage.get_trial(trial._trial_id)
        decisions.append(study.pruner.prune(view, frozen))
        assert decisions[-1] == study.pruner.prune(study, frozen)
    assert decisions == [False, True, False]
    reads.clear()
    view.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert reads == []  # served from its read
    study.add_trial(optuna.create_trial(value=1.0, intermediate_values={0: 1.0}))
    now[0] += _CompleteTrials.COMPLETE_READ_SECONDS + 1
    assert len(view.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) == 4
    assert reads  # read again after its interval, with the trial completed meanwhile
    assert view.direction == study.direction


def test_a_median_pruner_reads_its_trial_from_the_database_once_not_every_epoch(tmp_path):
    # The pruner judges the trial's own reports, which its process made: reading the trial
    # back at every epoch cost 7 ms an epoch on SQLite (and a round trip on a server).
    def reads(name, epochs):
        raw = {**NOISY, "name": name, "training": {"max_epochs": epochs, "patience": epochs},
               "pruner": {"n_startup_trials": 1, "n_warmup_steps": 100}}
        spec = parse_spec(raw)
        study = create_study(spec, get_storage(f"sqlite:///{tmp_path / (name + '.db')}"))
        calls = []
        backend = study._storage.get_trial
        study._storage.get_trial = lambda *a, **k: (calls.append(a), backend(*a, **k))[1]
        run_trials(study, spec, budget=3, echo=lambda line: None)
        assert [len(t.intermediate_values) for t in study.get_trials()] == [epochs] * 3
        return len(calls)

    assert reads("short", 3) == reads("long", 12)


def test_reports_are_written_beside_the_training_in_order_and_all_before_the_trial_ends(tmp_path):
    import threading

    spec = parse_spec({**NOISY, "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0}})
    study = create_study(spec, get_storage(f"sqlite:///{tmp_path / 'r.db'}"))
    writes = []
    backend = study._storage.set_trial_intermediate_value

    def recorded(trial_id, step, value):
        writes.append((threading.current_thread().name, trial_id, step))
        backend(trial_id, step, value)

    study._storage.set_trial_intermediate_value = recorded
    run_trials(study, spec, budget=5, echo=lambda line: None)
    trials = study.get_trials()
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    for t in trials:
        epochs = len(t.user_attrs["curves"][0]["val_metric"])
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1))
        assert [s for _, i, s in writes if i == t._trial_id] == list(range(1, epochs + 1))
        # Told after its last report was written: a pruned trial's value is its last report.
        assert t.value == pytest.approx(t.intermediate_values[epochs])
    assert all(name.startswith("hpo-report-") for name, _, _ in writes)


def test_a_report_the_database_refuses_stops_the_worker_and_leaves_nothing_running(tmp_path):
    from hpo.errors import StorageError

    spec = parse_spec(NOISY)
    study = create_study(spec, get_storage(f"sqlite:///{tmp_path / 'f.db'}"))
    backend = study._storage.set_trial_intermediate_value

    def refused(trial_id, step, value):
        if step == 3:
            raise StorageError("the database went away")
        backend(trial_id, step, value)

    study._storage.set_trial_intermediate_value = refused
    with pytest.raises(StorageError, match="went away"):
        run_trials(study, spec, budget=3, echo=lambda line: None)
    trial, *others = study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL  # given back, not left RUNNING
    assert "went away" in trial.user_attrs["interrupted"]
    assert sorted(trial.intermediate_values) == [1, 2]  # nothing written after the refused report
    assert all(t.state == optuna.trial.TrialState.WAITING for t in others)  # its params queued again
