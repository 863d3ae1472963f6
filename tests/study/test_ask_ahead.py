"""Ask-ahead in a real `hpo run`: the next trial admitted, sampled and compiled on a second
thread while one trains, each replica still the fit it would be without it."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import run_hpo, wait_until
from tests.study.test_workers import start_hpo, trials_of

AHEAD_LSTM = """
name = "ahead"
seeds = 2
seed = 3
trials = 4
[data]
name = "noisy_sine"
n_samples = 200
window = 10
[model]
family = "lstm"
[training]
max_epochs = 4
[sampler]
kind = "tpe"
n_startup_trials = 3
[pruner]
kind = "none"
[space]
units = { low = 3, high = 12 }
layers = { low = 1, high = 2 }
dropout = { low = 0.0, high = 0.3 }
batch_size = { choices = [32, 64] }
"""


def test_ask_ahead_builds_the_next_trial_while_one_trains_exactly_as_it_would_build_itself(tmp_path):
    """With ask-ahead a worker admits trial n+1 after trial n's first epoch and builds and
    compiles it on a thread: each such trial starts with its program compiled, fits each
    seed exactly as a worker without ask-ahead fits the same params, the budget is exact
    with nothing left running, and a fixed seed proposes the same trials run after run."""
    (tmp_path / "ahead.toml").write_text(AHEAD_LSTM)

    def run(name: str, ask_ahead: str) -> list[optuna.trial.FrozenTrial]:
        url = f"sqlite:///{tmp_path / name}.db"
        run_hpo("run", str(tmp_path / "ahead.toml"), "--storage", url, timeout=300,
                env={"HPO_ASK_AHEAD": ask_ahead, "HPO_CACHE_DIR": str(tmp_path / f"{name}-cache")})
        trials = trials_of(url, "ahead")
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
        return trials

    ahead, again, alone = run("ahead", "1"), run("again", "1"), run("alone", "0")
    assert [t.params for t in again] == [t.params for t in ahead]
    assert [t.user_attrs["seed_scores"] for t in again] == [t.user_attrs["seed_scores"] for t in ahead]
    for t in ahead[1:]:
        # Built and compiled on the thread, so the trial itself compiled next to nothing.
        assert t.user_attrs["prepared_seconds"] > 0, t.user_attrs
        assert t.user_attrs["compile_seconds"] < 0.2 * t.user_attrs["prepared_seconds"], t.user_attrs
    assert not any("prepared_seconds" in t.user_attrs for t in alone)
    # The start-up trials are sampled at random, so both runs drew the same params there.
    for mine, theirs in zip(ahead[:3], alone[:3]):
        assert mine.params == theirs.params
        assert mine.user_attrs["seed_scores"] == pytest.approx(theirs.user_attrs["seed_scores"], rel=1e-6)


def test_a_worker_asking_ahead_recovers_a_dead_workers_trial_while_it_runs(tmp_path):
    """A trial left RUNNING by a dead worker (no heartbeat) is failed and queued again by
    a live worker that asks ahead within about a heartbeat interval of the grace period
    running out, not once the budget looks full: ask-ahead admits every trial but the
    first, so it looks for dead trials too."""
    (tmp_path / "sweep.toml").write_text(AHEAD_LSTM.replace('name = "ahead"', 'name = "sweep"')
                                         .replace("trials = 4", "trials = 8"))
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    run_hpo("create", str(tmp_path / "sweep.toml"), "--storage", url)
    worker = start_hpo("worker", "--storage", url, "--study-name", "sweep", "--heartbeat-interval", "1",
                       "--grace-period", "3", env={"HPO_ASK_AHEAD": "1", "HPO_CACHE_DIR": str(tmp_path / "cache")})
    try:
        wait_until(lambda: any(t.state == TrialState.COMPLETE for t in trials_of(url, "sweep")), "a first trial",
                   timeout=300)
        dead = optuna.load_study(study_name="sweep", storage=url).ask()  # its worker died at once
        out, err = worker.communicate(timeout=300)
    finally:
        worker.kill()
        worker.wait()
    assert worker.returncode == 0, out + err
    trials = trials_of(url, "sweep")
    failed = trials[dead.number]
    assert failed.state == TrialState.FAIL and not [t for t in trials if t.state == TrialState.RUNNING]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 8
    # Trials the live worker started after the dead one's grace period, before failing it.
    late = [t.number for t in trials if t.number != dead.number
            and failed.datetime_start.timestamp() + 4 < t.datetime_start.timestamp() < failed.datetime_complete.timestamp()]
    assert len(late) <= 2, (late, [(t.number, t.datetime_start, t.datetime_complete) for t in trials])


def test_once_the_budget_is_full_ask_ahead_stops_asking_at_every_epoch(tmp_path, monkeypatch):
    """Ask-ahead admits the next trial after a trial's first epoch. Once the study's lock
    says the budget is full it asks again only when dead workers' trials are due to be
    looked for (once per heartbeat interval, so a dead worker's trial is still recovered
    while this one runs) or when the next trial begins: each ask is a transaction under
    the study's lock, which every worker of the study waits on. The code before asked
    after every epoch of the last trial (15 asks here)."""
    import tomllib

    from hpo.specs import parse_spec
    from hpo.store.storage import get_storage
    from hpo.study import workers
    from hpo.study.study import create_study

    asks = []
    admit = workers._admit
    monkeypatch.setattr(workers, "_admit", lambda *args: asks.append(1) or admit(*args))
    raw = tomllib.loads(AHEAD_LSTM.replace("trials = 4", "trials = 2").replace("max_epochs = 4", "max_epochs = 12")
                        .replace("[training]", "[training]\npatience = 12"))
    spec = parse_spec(raw)
    study = create_study(spec, get_storage(f"sqlite:///{tmp_path / 'full.db'}"))  # heartbeats every 10 s
    workers.run_trials(study, spec, budget=2, echo=lambda line: None, ask_ahead=True)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(e == 12 for t in trials for e in t.user_attrs["epochs_run"])
    # The loop's trial 0, ask-ahead's trial 1, one refusal during trial 1, the loop's last
    # refusal; and one more per 10 s that trial 1 runs (a loaded machine).
    seconds = (trials[1].datetime_complete - trials[1].datetime_start).total_seconds()
    assert len(asks) <= 4 + seconds // 10, (len(asks), seconds)
