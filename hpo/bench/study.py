"""Where a study's time goes: a study spec in, run once by one worker in this process on a
fresh SQLite file; its wall time split into compiling, epochs, the database and the rest,
per trial and in total, out (`hpo bench-study`).
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from hpo.specs import StudySpec
from hpo.words import plural


@dataclass
class TrialTime:
    """One trial: its wall time (from its start, or from the trial before it ending where
    that was later, to its end), its fit's seconds and the part of them JAX spent tracing
    and compiling."""

    number: int
    state: str
    seconds: float
    fit_s: float
    compile_s: float
    pruned_at: int | None = None
    # Seconds another thread spent building and compiling it while the trial before it
    # trained (ask-ahead): not part of its wall time or fit.
    prepared_s: float | None = None


@dataclass
class StudyTime:
    """A study run's wall time and its parts; `rest_s` is what the others leave: the
    sampler and pruner, loading data, checks, Python between trials."""

    study: str
    wall_s: float
    database_s: float
    trials: list[TrialTime]
    load: tuple[float, float]
    cache: str
    # With ask-ahead: the worker waiting between trials for the next one's build.
    ahead_wait_s: float = 0.0
    compile_s: float = field(init=False)
    epochs_s: float = field(init=False)
    rest_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.compile_s = sum(t.compile_s for t in self.trials)
        # A fit less its compiling: its epochs, and building its models and weights.
        self.epochs_s = sum(t.fit_s - t.compile_s for t in self.trials)
        self.rest_s = self.wall_s - self.compile_s - self.epochs_s - self.database_s - self.ahead_wait_s

    def median_s(self, state: str, part: str = "seconds") -> float | None:
        """The median wall time (or `part`: `fit_s`) of the trials in the state."""
        times = [getattr(t, part) for t in self.trials if t.state == state]
        return statistics.median(times) if times else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["load"] = list(self.load)
        out["median_complete_s"], out["median_pruned_s"] = self.median_s("COMPLETE"), self.median_s("PRUNED")
        out["median_complete_fit_s"] = self.median_s("COMPLETE", "fit_s")
        out["median_pruned_fit_s"] = self.median_s("PRUNED", "fit_s")
        return out


class _DatabaseClock:
    """Seconds this process's main thread spent in the study's storage: Optuna's storage
    calls (their SQL, ORM and commits), and hpo's own SQL outside them."""

    def __init__(self, storage: Any) -> None:
        import sqlalchemy

        self.seconds = 0.0
        self._depth = 0
        self._main = threading.main_thread()
        backend = getattr(storage, "_backend", storage)
        for name in dir(type(backend)):
            method = getattr(backend, name)
            if not name.startswith("__") and callable(method) and name not in ("engine", "url"):
                setattr(backend, name, self._timed(method))
        self._started: list[float] = []
        sqlalchemy.event.listen(backend.engine, "before_cursor_execute", self._before)
        sqlalchemy.event.listen(backend.engine, "after_cursor_execute", self._after)

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not self._main:
                return method(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
        return timed

    def _outside(self) -> bool:
        return self._depth == 0 and threading.current_thread() is self._main

    def _before(self, *args: Any) -> None:
        if self._outside():
            self._started.append(time.perf_counter())

    def _after(self, *args: Any) -> None:
        if self._outside() and self._started:
            self.seconds += time.perf_counter() - self._started.pop()


def time_study(spec: StudySpec, *, cache: str, echo: Callable[[str], None] = print) -> StudyTime:
    """Run the study's budget with one worker in this process on a new SQLite file and
    split the run's wall time. The compilation cache is whatever `HPO_CACHE_DIR` says
    when JAX is first configured (the command gives it an empty one unless told);
    `cache` says which, in words."""
    from hpo.store.storage import get_storage
    from hpo.study.study import create_study
    from hpo.study.workers import run_trials

    with tempfile.TemporaryDirectory(prefix="hpo-bench-study-") as folder:
        storage = get_storage(f"sqlite:///{os.path.join(folder, 'bench.db')}")
        study = create_study(spec, storage)
        clock = _DatabaseClock(study._storage)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        summary = run_trials(study, spec, budget=spec.trials, echo=echo)
        wall = time.perf_counter() - start
        finished = study.get_trials(deepcopy=False)
        trials = [_trial_time(t, finished[i - 1] if i else None) for i, t in enumerate(finished)]
        storage.engine.dispose()
    return StudyTime(spec.name, wall, clock.seconds, trials, (load_before, os.getloadavg()[0]), cache,
                     summary.ahead_wait_seconds)


def _trial_time(trial: Any, before: Any | None) -> TrialTime:
    """A trial's time as the worker spent it: from its start, or from the end of the trial
    before it if that was later (with ask-ahead a trial starts while the one before it
    trains, and what it costs the study is from there to its end)."""
    from hpo.record import ATTR_COMPILE_SECONDS, ATTR_FIT_SECONDS, ATTR_PRUNED_AT, ATTR_PREPARED_SECONDS

    attrs = trial.user_attrs
    start = trial.datetime_start
    if before is not None and before.datetime_complete is not None:
        start = max(start, before.datetime_complete)
    seconds = (trial.datetime_complete - start).total_seconds() if trial.datetime_complete else 0.0
    return TrialTime(trial.number, trial.state.name, seconds, float(attrs.get(ATTR_FIT_SECONDS, 0.0)),
                     float(attrs.get(ATTR_COMPILE_SECONDS, 0.0)), attrs.get(ATTR_PRUNED_AT),
                     attrs.get(ATTR_PREPARED_SECONDS))


def format_study_time(result: StudyTime) -> str:
    """Per trial, then the split in seconds and shares of the wall time, in words."""
    lines = ["trial  state     wall s   fit s  compile s  ahead s  pruned at"]
    for t in result.trials:
        pruned = "" if t.pruned_at is None else f"epoch {t.pruned_at}"
        ahead = "" if t.prepared_s is None else f"{t.prepared_s:.2f}"
        lines.append(f"{t.number:5d}  {t.state.lower():<8} {t.seconds:7.2f} {t.fit_s:7.2f} {t.compile_s:10.2f} "
                     f"{ahead:>8}  {pruned}")
    states = [t.state for t in result.trials]
    lines.append(f"{result.study}: {plural(len(states), 'trial')} ({states.count('COMPLETE')} complete, "
                 f"{states.count('PRUNED')} pruned, {states.count('FAIL')} failed) in {result.wall_s:.1f} s, one "
                 f"worker, compilation cache {result.cache} (load average {result.load[0]:.2f} -> "
                 f"{result.load[1]:.2f})")
    parts = [("compiling and tracing", result.compile_s, "JAX's compile_seconds of each fit"),
             ("epochs and set-up", result.epochs_s, "each fit less its compiling: epochs, models, initial weights"),
             ("the database", result.database_s, "storage calls and SQL of this process's main thread"),
             ("the rest", result.rest_s, "sampler, pruner, data, checks, Python between trials")]
    if result.ahead_wait_s:
        parts.insert(3, ("waiting for builds", result.ahead_wait_s,
                         "between trials, for the next trial's build on the second thread to finish"))
    for name, seconds, what in parts:
        share = 100 * seconds / result.wall_s if result.wall_s else 0.0
        lines.append(f"  {name:<22} {seconds:7.1f} s {share:4.0f}%  ({what})")
    ahead = [t.prepared_s for t in result.trials if t.prepared_s is not None]
    if ahead:
        lines.append(f"  and, beside these, {sum(ahead):.1f} s building and compiling {plural(len(ahead), 'trial')} "
                     "ahead on a second thread (ask-ahead; HPO_ASK_AHEAD=0 turns it off)")
    complete, pruned = result.median_s("COMPLETE"), result.median_s("PRUNED")
    if complete and pruned is not None:
        lines.append(f"a pruned trial took {pruned:.2f} s (median) against {complete:.2f} s for a complete one "
                     f"({pruned / complete:.0%})")
        fit_complete, fit_pruned = result.median_s("COMPLETE", "fit_s"), result.median_s("PRUNED", "fit_s")
        if fit_complete:
            waits = " (with ask-ahead, a trial's wall time also holds waiting for its own build to finish)" \
                if ahead else ""
            lines.append(f"  its own fit {fit_pruned:.2f} s against {fit_complete:.2f} s "
                         f"({fit_pruned / fit_complete:.0%}){waits}")
    return "\n".join(lines)
