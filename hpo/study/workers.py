"""Workers: a study and a budget in, trials run in this process until the study holds
exactly that many spent trials out, with a line of progress per trial (N local processes
of this: `hpo.study.local`).

Budget: a worker starts a trial only while holding the study's admission lock and only
if spent (complete, pruned, failed on its own) plus running trials leave room, so however
many workers race, no more than the budget are ever started. A trial whose worker died
(no heartbeat for the grace period) or was stopped is failed, does not count, and is
queued again with the same params; workers wait while others run rather than exit, in
case one of those trials has to be retried.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.backend import available_cores, thread_cap
from hpo.errors import HpoError, TrialFailed
from hpo.record import ATTR_FAIL_REASON, ATTR_INTERRUPTED, ATTR_PRUNED_AT, ATTR_UNDECIDED_AGAINST, ATTR_WORKER
from hpo.specs import StudySpec
from hpo.store.faults import classify_storage_error, retry_storage_call
from hpo.store.storage import (STOP_ATTR, TrialCounts, call_once, count_trials, fail_heartless_trials, rdb_storage,
                               study_lock)
from hpo.study.objective import Objective
from hpo.study.race import add_incumbent_seeds
from hpo.study.signals import Interrupted, check_stop, record_signals, signals_held, stop_requested
from hpo.study.study import quiet_optuna
from hpo.words import mean_std, plural

# 0 turns ask-ahead off, 1 on even with one core (`asks_ahead`).
ASK_AHEAD_ENV = "HPO_ASK_AHEAD"

# How often an idle worker looks again whether a running trial of another worker died.
POLL_SECONDS = 1.0
# TensorFlow 2.21 / Keras 3.15 keep about 10 MB per model built and fitted, whatever
# clear_session and gc do (tensorflow/tensorflow#61791): a worker whose resident memory
# has grown this much since its first trial ends its loop and starts afresh (`hpo worker`
# re-executes itself, same PID), so hundreds of trials keep memory flat.
MAX_MEMORY_GROWTH_MB = 150.0


def memory_growth_limit(spec: StudySpec, requested: float | None) -> float | None:
    """The resident-memory growth after which a process restarts itself between trials:
    `requested` (0: never), else `MAX_MEMORY_GROWTH_MB` where TensorFlow trains (it keeps
    what it holds per model), else None (JAX's caches are bounded; nothing to restart for)."""
    from hpo.backend import resolve_backend

    if requested is not None:
        return requested or None
    if spec.model.family == "analytic" or resolve_backend(spec.training.backend) != "tensorflow":
        return None
    return MAX_MEMORY_GROWTH_MB


@dataclass
class RunSummary:
    """What a run did, for the closing lines of `hpo run`."""

    study_name: str
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    lost: int = 0
    seconds: float = 0.0
    stopped_reason: str = ""
    best: FrozenTrial | None = None
    exit_code: int = 0
    restart: bool = False
    # With ask-ahead: seconds the worker waited between trials for the next one's build.
    ahead_wait_seconds: float = 0.0


def clear_stop(study: optuna.Study) -> None:
    """Forget a previous "too many failures" stop, so a new run of the study may go on."""
    if study.user_attrs.get(STOP_ATTR):
        study.set_user_attr(STOP_ATTR, None)


def run_trials(study: optuna.Study, spec: StudySpec, *, budget: int, timeout: float | None = None,
               max_consecutive_failures: int = 5, echo: Callable[[str], None] = print,
               max_memory_growth_mb: float | None = None, ask_ahead: bool | None = None) -> RunSummary:
    """Run trials until the study holds `budget` spent trials (complete, pruned, or failed
    on their own), together with any other workers on the same study.

    A complete trial whose adaptive-seed race ended undecided against the incumbent
    (`undecided_against`) is followed by a batch of new seeds for that incumbent
    (`hpo.study.race.add_incumbent_seeds`), unless another worker is adding some already.

    Args:
        study: The study, with the spec's sampler and pruner, on an `hpo.store.storage` storage.
        spec: Its spec.
        budget: Spent trials the whole study should end with.
        timeout: Stop starting trials after this many seconds.
        max_consecutive_failures: After this many failed trials in a row, stop the study
            (every worker on it stops).
        echo: Where progress lines go.
        max_memory_growth_mb: Return with `restart` set, between trials, once resident
            memory has grown this much since the first trial (None: never).
        ask_ahead: Admit and build the next trial while one trains (`_Ahead`); None:
            where it pays (`asks_ahead`) and no memory restart is asked for.
    """
    quiet_optuna()
    summary = RunSummary(spec.name)
    baseline_mb: float | None = None
    start = time.perf_counter()
    failures_in_a_row = 0
    storage = rdb_storage(study._storage)
    sweeps = _SweepClock(getattr(storage, "heartbeat_interval", None) or 0)
    orphans: list[optuna.Trial] = []
    if ask_ahead is None:
        # A memory restart between trials would give back the trial admitted ahead.
        ask_ahead = asks_ahead(spec) and max_memory_growth_mb is None
    ahead = _Ahead(study, spec, budget, orphans, sweeps) if ask_ahead else None

    def after_epoch() -> None:
        check_stop()
        if ahead is not None and (timeout is None or time.perf_counter() - start <= timeout):
            ahead.start()

    objective = Objective(spec, check_stop=after_epoch)
    restore = record_signals()
    if hasattr(storage, "check_stop"):
        storage.check_stop = check_stop
    try:
        while True:
            check_stop()
            if (timeout is not None and time.perf_counter() - start > timeout
                    and not (ahead and ahead.trial)):  # a trial admitted before it still runs
                summary.stopped_reason = f"stopped starting trials after --timeout {timeout:g} s"
                break
            trial = ahead.take() if ahead is not None else None
            if trial is None:
                sweep = sweeps.due()
                trial, counts = retry_storage_call(storage, lambda: _admit(study, budget, sweep, orphans))
            if trial is None:
                if counts.stop_reason:
                    if not summary.stopped_reason:
                        summary.stopped_reason = f"study stopped: {counts.stop_reason}"
                    break
                if counts.spent >= budget:
                    break
                time.sleep(POLL_SECONDS)
                continue
            frozen = _run_one(study, spec, trial, objective, summary)
            if frozen is None:
                continue
            failures_in_a_row = failures_in_a_row + 1 if frozen.state == TrialState.FAIL else 0
            echo(describe_trial(spec, frozen, study, budget=budget))
            if frozen.state == TrialState.COMPLETE and ATTR_UNDECIDED_AGAINST in frozen.user_attrs:
                # After the challenger is told, so nothing that happens here can cost it its result.
                add_incumbent_seeds(study, spec, frozen.user_attrs[ATTR_UNDECIDED_AGAINST], check_stop, echo)
            if max_memory_growth_mb is not None:
                from hpo.train.fit import settled_rss_mb

                if baseline_mb is None:
                    baseline_mb = settled_rss_mb()
                elif ((grown := settled_rss_mb() - baseline_mb) > max_memory_growth_mb
                      and count_trials(storage, study._study_id).spent < budget):  # no restart just to stop
                    summary.restart = True
                    summary.stopped_reason = (f"memory grew {grown:.0f} MB since the first trial "
                                              f"(over {max_memory_growth_mb:g} MB); restarting to release it")
                    break
            if failures_in_a_row >= max_consecutive_failures:
                summary.stopped_reason = (f"stopped the study after {failures_in_a_row} failed trials in a row; "
                                          f"last reason: {frozen.user_attrs.get(ATTR_FAIL_REASON, 'unknown')}; "
                                          "fix the cause and run again")
                study.set_user_attr(STOP_ATTR, summary.stopped_reason)
                summary.exit_code = 1
                break
    except Interrupted as e:
        summary.stopped_reason = f"interrupted by {e.signal_name}"
        summary.exit_code = 130
    finally:
        # Stopped (a signal, the failure limit, a memory restart) with a trial admitted
        # ahead: it is given back, its params queued again.
        if ahead is not None:
            summary.lost += ahead.close("its worker stopped before running it")
            summary.ahead_wait_seconds = ahead.waited
        restore()
        if hasattr(storage, "check_stop"):
            storage.check_stop = lambda: None
    summary.seconds = time.perf_counter() - start
    summary.best = best_trial(study, spec)
    return summary


class _SweepClock:
    """When a worker's next admission also looks for dead workers' trials: once per
    heartbeat interval (a trial only goes stale after the grace period anyway), whichever
    path admits (the loop, or ask-ahead, which admits every trial but the first)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.interval
        return True


class _Ahead:
    """Ask-ahead in one worker: once a trial has trained its first epoch, the next trial is
    admitted (under the study's lock, so the budget stays exact), its params are sampled
    here, on the main thread (so a fixed seed samples the same trials in the same order,
    each seeing the one before it running), and a thread builds and compiles its program
    (`training.prepare`) while the first trains on: the second core compiles while the
    first trains. One trial ahead, not two: with two, the builds slowed the training
    thread more than they saved (default study 69-71 s against 59-61 s with one, 64-68 s
    with none)."""

    def __init__(self, study: optuna.Study, spec: StudySpec, budget: int, orphans: list[optuna.Trial],
                 sweeps: _SweepClock) -> None:
        self.study, self.spec, self.budget, self.orphans, self.sweeps = study, spec, budget, orphans, sweeps
        self.trial: optuna.Trial | None = None
        self.heartbeat: _Heartbeat | None = None
        self.builder: threading.Thread | None = None
        self.waited = 0.0  # seconds `take` waited for builds to finish
        # The budget was full at the last ask, since the running trial began: only a sweep
        # (a dead worker's trial failed, its room freed) can change that before the next one.
        self.refused = False

    def start(self) -> None:
        """Admit, sample and start building the next trial, unless one waits already or
        the budget is full. Refused once during a trial, it asks again only when dead
        workers' trials are due to be looked for (`_SweepClock`). A storage fault here
        only skips the look ahead (a trial it created is given back on the next
        admission, as `_admit` does)."""
        from hpo.specs.space import suggest_params
        from hpo.train.fit import keras_settings, prepare

        if self.trial is not None:
            return
        sweep = self.sweeps.due()
        if self.refused and not sweep:
            # Not at every epoch: each ask is a transaction under the study's lock, which
            # every worker of the study waits on.
            return
        try:
            trial, _ = _admit(self.study, self.budget, sweep, self.orphans)
        except Exception:  # noqa: BLE001 - the worker loop's own admission meets it again
            return
        if trial is None:
            self.refused = True
            return
        self.trial = trial
        self.heartbeat = _Heartbeat(rdb_storage(self.study._storage), trial._trial_id).__enter__()
        try:
            params = suggest_params(self.spec, trial)
        except Exception:  # noqa: BLE001 - the trial meets it when it runs, and fails alone
            return
        self.builder = threading.Thread(target=prepare, name=f"prepare-{trial.number}", daemon=True,
                                        args=(self.spec, params, self.spec.seed_values, keras_settings()))
        self.builder.start()

    def take(self, wait: bool = True) -> optuna.Trial | None:
        """The admitted next trial (its build finished, unless not `wait`), or None."""
        trial, self.trial = self.trial, None
        self.refused = False
        if self.builder is not None and wait:
            asked = time.perf_counter()
            self.builder.join()
            self.waited += time.perf_counter() - asked
            self.builder = None
        if self.heartbeat is not None:
            self.heartbeat.__exit__(None, None, None)
            self.heartbeat = None
        return trial

    def close(self, reason: str) -> int:
        """Give back the admitted trial, if any (failed without counting, its params queued
        again, for `reason`): 1 if there was one, else 0. Its build is waited for (nothing
        may build beside it once the worker has returned), unless a signal is stopping
        the process."""
        from hpo.train.fit import discard_prepared

        trial = self.take(wait=not stop_requested())
        discard_prepared()
        if trial is None:
            return 0
        try:
            _give_back(self.study, trial, reason)
        except Exception:  # noqa: BLE001 - the database is gone: the stale-trial sweep recovers it
            pass
        return 1


def asks_ahead(spec: StudySpec) -> bool:
    """Whether a worker builds its next trial while one trains: a Keras study on the JAX
    engine, and two cores or more for this process (`HPO_ASK_AHEAD`: 0 never, 1 always)."""
    from hpo.train.fit import can_prepare

    setting = os.environ.get(ASK_AHEAD_ENV, "").strip()
    if setting == "0" or not can_prepare(spec):
        return False
    return setting == "1" or min(available_cores(), thread_cap() or available_cores()) >= 2


def _admit(study: optuna.Study, budget: int, sweep: bool,
           orphans: list[optuna.Trial]) -> tuple[optuna.Trial | None, TrialCounts]:
    """Under the study's lock: a new trial (with its first heartbeat and this worker's
    name) if the budget has room, and the counts it was judged by.

    `orphans` carries, from one attempt to the next, trials this worker created and lost
    to a dropped connection before their admission finished; each is given back (failed,
    its params queued again) as soon as the database answers, not left RUNNING for the
    grace period while every other worker waits on the budget it holds.
    """
    storage = rdb_storage(study._storage)
    # No signal may land between creating a trial and its first heartbeat: that trial
    # would stay RUNNING with nothing to show it is dead.
    trial = None
    try:
        with signals_held(), study_lock(storage, study._study_id):
            while orphans:
                _give_back(study, orphans[0], "its worker lost the database connection while admitting it")
                orphans.pop(0)
            if sweep:
                # Dead workers are looked for once per heartbeat interval, not before every
                # trial: a trial only goes stale after the grace period anyway.
                optuna.storages.fail_stale_trials(study)
                fail_heartless_trials(study)
            counts = count_trials(storage, study._study_id)
            if counts.stop_reason or counts.spent + counts.running >= budget:
                return None, counts
            # Pops a trial queued for retry first, else creates one.
            trial = study.ask()
            if getattr(storage, "heartbeat_interval", None):
                storage.record_heartbeat(trial._trial_id)
            trial.set_user_attr(ATTR_WORKER, f"{socket.gethostname()}:{os.getpid()}")
    except BaseException as e:
        # Created, but its admission did not finish (down to releasing the lock, whose
        # connection may have died with the others): not this worker's to run.
        if trial is not None:
            fault = classify_storage_error(e)
            if fault is not None and fault[0] == "transient":
                orphans.append(trial)  # given back on the next attempt, once the database answers
            else:
                _give_back(study, trial, f"worker stopped by a storage fault: {e}", retry=False)
        raise
    return trial, counts


def _run_one(study: optuna.Study, spec: StudySpec, trial: optuna.Trial, objective: Objective,
             summary: RunSummary) -> FrozenTrial | None:
    """Run one admitted trial and tell the study; None if another worker failed it as stale."""
    values = None
    state = TrialState.COMPLETE
    try:
        with _Heartbeat(rdb_storage(study._storage), trial._trial_id):
            try:
                values = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except TrialFailed:
                state = TrialState.FAIL
        if values is not None and not all(math.isfinite(v) for v in _as_list(values)):
            trial.set_user_attr(ATTR_FAIL_REASON, f"objective value {values} is not finite")
            state, values = TrialState.FAIL, None
        frozen = retry_storage_call(rdb_storage(study._storage), lambda: _tell(
            study, trial, values if state == TrialState.COMPLETE else None, state))
    except Interrupted as e:
        _give_back(study, trial, f"worker stopped by {e.signal_name}")
        summary.lost += 1
        raise
    except optuna.exceptions.UpdateFinishedTrialError:
        frozen = study._storage.get_trial(trial._trial_id)
    except BaseException as e:
        # A storage fault (a full disk), or anything else that ends this worker mid-trial
        # (a KeyboardInterrupt raised by user code): the trial is given back, not left
        # RUNNING. Once only: a database that failed is not waited for here.
        _give_back(study, trial, f"worker stopped by {type(e).__name__}: {e}"[:2000], retry=False)
        raise
    if frozen.state == TrialState.FAIL and ATTR_FAIL_REASON not in frozen.user_attrs:
        # No heartbeat reached the database for the grace period (a long outage?), so
        # another worker failed this trial and queued it again; that copy will count.
        summary.lost += 1
        return None
    if frozen.state == TrialState.COMPLETE:
        summary.complete += 1
    elif frozen.state == TrialState.PRUNED:
        summary.pruned += 1
    else:
        summary.failed += 1
    return frozen


def _tell(study: optuna.Study, trial: optuna.Trial, values, state: TrialState) -> FrozenTrial:
    try:
        return study.tell(trial, values, state=state, skip_if_finished=True)
    except RuntimeError:
        # GridSampler.after_trial calls study.stop() once the grid is exhausted, which
        # Optuna allows only inside optimize(); tell has stored the trial by then. Stop
        # the study for every worker instead.
        if not isinstance(study.sampler, optuna.samplers.GridSampler):
            raise
        study.set_user_attr(STOP_ATTR, "every point of the grid has been tried")
        return study._storage.get_trial(trial._trial_id)


def _give_back(study: optuna.Study, trial: optuna.Trial, reason: str, retry: bool = True) -> None:
    """Fail an interrupted trial without counting it, and queue its params again.

    Each write is tried on its own: a database that refuses the reason (a full disk) may
    still take the state. Without `retry`, each is tried once (after a storage fault).
    If even the state cannot be written, the trial stays RUNNING until the grace period
    has passed, and the next worker's sweep fails and retries it.
    """
    storage = rdb_storage(study._storage)
    call = (lambda name, *args: getattr(storage, name)(*args)) if retry else (
        lambda name, *args: call_once(storage, name, *args))
    with signals_held():
        try:
            call("set_trial_user_attr", trial._trial_id, ATTR_INTERRUPTED, reason)
        except Exception:  # noqa: BLE001 - the reason is a courtesy; the state below matters
            pass
        try:
            if call("set_trial_state_values", trial._trial_id, TrialState.FAIL):
                callback = getattr(storage, "heartbeat_stale_trial_callback", None)
                if callback is not None:
                    callback(study, call("get_trial", trial._trial_id))
        except (optuna.exceptions.UpdateFinishedTrialError, HpoError):
            pass  # finished already (its result was stored), or the database is gone
        except Exception:  # noqa: BLE001 - one try only, after a fault: the sweep recovers it
            if retry:
                raise


def _as_list(values: float | tuple | list) -> list[float]:
    return list(values) if isinstance(values, (tuple, list)) else [values]


class _Heartbeat:
    """Records the trial's heartbeat every interval on a thread. A failed write (database
    restarting) is skipped, not fatal: the next one will do, within the grace period."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> "_Heartbeat":
        if self.interval:
            self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.trial_id}", daemon=True)
            self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - the next beat retries
                pass

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def best_trial(study: optuna.Study, spec: StudySpec) -> FrozenTrial | None:
    """The best complete trial (for Pareto studies: the lowest-mean trial of the front)."""
    if spec.is_multi_objective:
        front = study.best_trials
        if not front:
            return None
        pick = min if spec.direction == "minimize" else max
        return pick(front, key=lambda t: t.values[0])
    try:
        return study.best_trial
    except ValueError:
        return None


def describe_trial(spec: StudySpec, trial: FrozenTrial, study: optuna.Study | None = None,
                   budget: int | None = None) -> str:
    """One progress line for a finished trial, with the study-wide tally when given the study."""
    state = trial.state.name.lower()
    attrs = trial.user_attrs
    head = f"trial {trial.number:>4} {state:<8}"
    if "mean" in attrs:
        n = len(attrs.get("seed_scores", []))
        head += (f" {spec.metric} {mean_std(attrs['mean'], attrs['std'], n)} "
                 f"({plural(n, 'seed')}, {attrs.get('training_path', '?')}, {attrs.get('fit_seconds', 0):.1f} s)")
        if trial.state == TrialState.PRUNED and ATTR_PRUNED_AT in attrs:
            head += f" pruned at epoch {attrs[ATTR_PRUNED_AT]}"
    elif trial.state == TrialState.FAIL:
        head += f" {attrs.get(ATTR_FAIL_REASON, 'no reason stored')}"
    retried = trial.system_attrs.get("failed_trial")
    if retried is not None:
        head += f" (retry of #{retried})"
    if study is not None:
        best = best_trial(study, spec)
        if best is not None and "mean" in best.user_attrs:
            b = best.user_attrs
            head += f" | best #{best.number} {mean_std(b['mean'], b['std'], len(b.get('seed_scores', [])))}"
        c = count_trials(rdb_storage(study._storage), study._study_id)
        of = f"/{budget}" if budget else ""
        head += f" | {c.spent}{of} spent: {c.complete} complete, {c.pruned} pruned, {c.failed} failed"
        if c.lost:
            head += f", {c.lost} lost and retried"
    return head
