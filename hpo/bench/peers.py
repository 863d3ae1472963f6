"""The peer benchmark: one study's space, seeds and budget of fits run by hpo, by the
Optuna loop of native `model.fit` calls a user would write (JAX and TensorFlow backends)
and by KerasTuner's `RandomSearch(executions_per_trial=seeds)` (on JAX); each tool's
wall time and its pick refitted on fresh seeds out (`hpo bench-peers`).

Every tool runs as a fresh process, timed from its start to its end (imports, data,
compilation and all), one after the other, so one machine's load shows in all of them.
The peers fit the trial's model as hpo builds it (`training.build_trial_model`) on the
data hpo loads, with Keras' `EarlyStopping` at the study's patience and `min_delta`,
and score a seed by its best epoch, as hpo does. Nothing here is timed in tests.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from hpo.specs import Choice, FloatRange, IntRange, StudySpec, load_spec

TOOLS = ("hpo", "optuna-jax", "optuna-tensorflow", "keras-tuner")
# How each peer loop is run: (Keras backend, the loop). KerasTuner runs on JAX, hpo's
# backend: on TensorFlow 2.21 it needs TensorBoard, which TensorFlow no longer installs.
_PEERS = {"optuna-jax": ("jax", "optuna"), "optuna-tensorflow": ("tensorflow", "optuna"),
          "keras-tuner": ("jax", "keras-tuner")}


@dataclass
class PeerRun:
    """One tool's run: its wall time, the fits it made, its pick and its own score of it,
    and the pick's scores on the fresh seeds."""

    tool: str
    seconds: float
    trials: int
    fits: int
    params: dict[str, Any]
    value: float
    refit: list[float] = field(default_factory=list)
    p_vs_hpo: float | None = None

    @property
    def refit_mean(self) -> float:
        return statistics.fmean(self.refit) if self.refit else math.nan


@dataclass
class PeersResult:
    study: str
    trials: int
    seeds: int
    max_epochs: int
    refit_seeds: list[int]
    runs: list[PeerRun]
    load_average: tuple[str, str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def available_tools() -> list[str]:
    """The tools this machine can run: KerasTuner only where `keras-tuner` is installed."""
    import importlib.util

    return [t for t in TOOLS if t != "keras-tuner" or importlib.util.find_spec("keras_tuner") is not None]


def run_peers(study: str, tools: list[str], *, trials: int | None = None, seeds: int | None = None,
              max_epochs: int | None = None, refit_seeds: int = 10,
              echo: Callable[[str], None] = print) -> PeersResult:
    """Run each tool on the study (hpo first, on a new SQLite file and an empty compilation
    cache), then refit every tool's pick on `refit_seeds` seeds no tool trained on, and
    test each against hpo's pick (Welch)."""
    from hpo.specs import find_spec_file

    study = str(find_spec_file(study).resolve())
    spec = load_spec(study).with_overrides(trials=trials, seeds=seeds, max_epochs=max_epochs)
    _check_peerable(spec)
    load_start = _load_average()
    runs = []
    with tempfile.TemporaryDirectory(prefix="hpo-peers-") as work:
        for tool in ["hpo", *(t for t in tools if t != "hpo")]:
            echo(f"{tool}: {spec.trials} trials x {spec.seeds} seeds, <= {spec.training.max_epochs} epochs ...")
            runs.append(_run_tool(tool, study, spec, Path(work)))
            echo(f"{tool}: {runs[-1].seconds:.1f} s, best {spec.metric} {runs[-1].value:.6g} {runs[-1].params}")
        fresh = [spec.seed * 1000 + spec.seeds + 100 + i for i in range(refit_seeds)]
        echo(f"refitting {len(runs)} picks on {refit_seeds} fresh seeds ...")
        scores = _child(["refit", study, json.dumps(_overrides(spec)), json.dumps([r.params for r in runs]),
                         json.dumps(fresh)], "jax", Path(work), cache=str(Path(work) / "hpo-cache"))
    for run, refit in zip(runs, scores):
        run.refit = refit
    from hpo.reports.stats import welch

    for run in runs[1:]:
        if run.params != runs[0].params and len(fresh) > 1:
            run.p_vs_hpo = welch(run.refit, runs[0].refit)[1]
    return PeersResult(spec.name, spec.trials, spec.seeds, spec.training.max_epochs, fresh, runs,
                       (load_start, _load_average()))


def format_peers(result: PeersResult) -> str:
    hpo = result.runs[0]
    head = ["tool", "wall", "vs hpo", "fits", "own score", f"refit on {len(result.refit_seeds)} fresh seeds",
            "vs hpo's pick"]
    rows = []
    for run in result.runs:
        if run.tool == "hpo":
            versus = ""
        elif run.p_vs_hpo is None:
            versus = "the same pick"
        else:
            versus = f"Welch p = {run.p_vs_hpo:.2g}"
        spread = statistics.stdev(run.refit) if len(run.refit) > 1 else 0.0
        rows.append([run.tool, f"{run.seconds:.1f} s", f"{run.seconds / hpo.seconds:.2f}x", str(run.fits),
                     f"{run.value:.6g}", f"{run.refit_mean:.6g} ± {spread:.2g}", versus])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in rows]
    lines.append(f"({result.study}: {result.trials} trials x {result.seeds} seeds, <= {result.max_epochs} epochs; "
                 f"{os.cpu_count()} CPUs, load average {result.load_average[0]} -> {result.load_average[1]})")
    return "\n".join(lines)


def _check_peerable(spec: StudySpec) -> None:
    """The peers build the same models on the same arrays: a built-in family or the
    user's `build(params, ...)`, data the params do not reshape, one objective."""
    from hpo.errors import SpecError
    from hpo.specs import DATA_PARAMS
    from hpo.specs.tuner_hp import hp_build

    problem = None
    if spec.model.family == "analytic":
        problem = "an analytic study trains no Keras model; pick a Keras study (e.g. csv_lstm)"
    elif hp_build(spec) is not None:
        problem = "a KerasTuner-style build(hp) declares its space while it runs; give [space] and a build(params, ...)"
    elif any(name in spec.space for name in DATA_PARAMS):
        problem = f"the space searches {', '.join(n for n in DATA_PARAMS if n in spec.space)}, which reshape the data; fix it"
    elif len(spec.directions) != 1:
        problem = "a multi-objective study has no single pick to compare; pick a single-objective study"
    if problem:
        raise SpecError(spec.source, "", f"bench-peers: {problem}")


def _overrides(spec: StudySpec) -> dict[str, int]:
    return {"trials": spec.trials, "seeds": spec.seeds, "max_epochs": spec.training.max_epochs}


def _run_tool(tool: str, study: str, spec: StudySpec, work: Path) -> PeerRun:
    start = time.perf_counter()
    if tool == "hpo":
        storage = f"sqlite:///{work / 'hpo.db'}"
        cmd = [sys.executable, "-m", "hpo", "run", study, "--storage", storage, "--trials", str(spec.trials),
               "--seeds", str(spec.seeds), "--max-epochs", str(spec.training.max_epochs)]
        _call(cmd, "jax", work, cache=str(work / "hpo-cache"))
        seconds = time.perf_counter() - start
        return _hpo_pick(storage, spec, seconds)
    backend, loop = _PEERS[tool]
    # No persistent compilation cache: a user's loop has none (it would hand each seed's
    # new model the programs of the one before).
    out = _child([loop, study, json.dumps(_overrides(spec))], backend, work, cache="off")
    return PeerRun(tool, time.perf_counter() - start, out["trials"], out["fits"], out["params"], out["value"])


def _hpo_pick(storage: str, spec: StudySpec, seconds: float) -> PeerRun:
    """hpo's pick, read from its database (Optuna alone: this process loads no Keras)."""
    import optuna

    from hpo.record import ATTR_SEED_SCORES

    study = optuna.load_study(study_name=spec.name, storage=storage)
    best = study.best_trial
    fits = sum(len(t.user_attrs.get(ATTR_SEED_SCORES) or []) for t in study.trials)
    return PeerRun("hpo", seconds, len(study.trials), fits, _searched(spec, best.params), float(best.value))


def _searched(spec: StudySpec, params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k in spec.space}


def _child(args: list[str], backend: str, work: Path, cache: str) -> Any:
    """Run `python -m hpo.bench.peers ARGS` on `backend`; its last stdout line, as JSON."""
    out = _call([sys.executable, "-m", "hpo.bench.peers", *args], backend, work, cache)
    return json.loads(out.strip().splitlines()[-1])


def _call(cmd: list[str], backend: str, work: Path, cache: str) -> str:
    """Run a tool's process in `work` on `backend` with `cache` as `HPO_CACHE_DIR`."""
    from hpo.backend import CACHE_DIR_ENV

    env = dict(os.environ, KERAS_BACKEND=backend, HPO_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
               **{CACHE_DIR_ENV: cache})
    done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        from hpo.errors import HpoError

        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise HpoError(f"bench-peers: {' '.join(cmd[2:5])} failed: {tail}")
    return done.stdout


def _load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}"


# The peers, each in its own process (`python -m hpo.bench.peers LOOP STUDY OVERRIDES`).

def _native_fit(spec: StudySpec, params: dict[str, Any], data: Any, seed: int, callbacks: list[Any]) -> float:
    """One seed's fit as a user writes it: seed, build, compile, `model.fit`; its best epoch."""
    import keras

    from hpo.train.fit import build_trial_model

    keras.utils.set_random_seed(seed)
    model = build_trial_model(spec, params, data)
    history = model.fit(data.x_train, data.y_train, batch_size=params["batch_size"],
                        epochs=spec.training.max_epochs, validation_data=(data.x_val, data.y_val),
                        callbacks=callbacks, verbose=0).history
    pick = min if spec.direction == "minimize" else max
    return float(pick(history[spec.metric]))


def _early_stopping(spec: StudySpec) -> Any:
    import keras

    mode = "min" if spec.direction == "minimize" else "max"
    return keras.callbacks.EarlyStopping(monitor=spec.metric, patience=spec.training.patience,
                                         min_delta=spec.training.min_delta, mode=mode)


def _optuna_loop(spec: StudySpec) -> dict[str, Any]:
    """The hand-written loop: Optuna's study in memory with the study's sampler, one
    native fit per seed, the mean as the objective."""
    import optuna

    from hpo.train.data import load_trial_data
    from hpo.specs.space import suggest_params
    from hpo.study.study import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(spec, trial)
        data = load_trial_data(spec, params, spec.seed)
        return statistics.fmean(_native_fit(spec, params, data, seed, [_early_stopping(spec)])
                                for seed in spec.seed_values)

    study = optuna.create_study(sampler=make_sampler(spec), direction=spec.direction)
    study.optimize(objective, n_trials=spec.trials)
    params = suggest_params(spec, optuna.trial.FixedTrial(study.best_params))
    return {"trials": len(study.trials), "fits": len(study.trials) * spec.seeds,
            "params": _searched(spec, params), "value": study.best_value}


def _keras_tuner_loop(spec: StudySpec) -> dict[str, Any]:
    """KerasTuner's `RandomSearch` over the same space, `executions_per_trial` = seeds."""
    import keras_tuner

    from hpo.train.data import load_trial_data
    from hpo.specs.space import default_params

    base = default_params(spec)

    def values(hp: Any) -> dict[str, Any]:
        params = dict(base)
        for name, p in spec.space.items():
            if isinstance(p, IntRange):
                params[name] = hp.Int(name, p.low, p.high, step=p.step if not p.log else None,
                                      sampling="log" if p.log else "linear")
            elif isinstance(p, FloatRange):
                params[name] = hp.Float(name, p.low, p.high, step=p.step, sampling="log" if p.log else "linear")
            elif isinstance(p, Choice):
                params[name] = hp.Choice(name, list(p.choices))
            else:
                params[name] = p.value
        return params

    data = load_trial_data(spec, base, spec.seed)

    class Model(keras_tuner.HyperModel):
        def build(self, hp: Any) -> Any:
            from hpo.train.fit import build_trial_model

            return build_trial_model(spec, values(hp), data)

        def fit(self, hp: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
            return model.fit(*args, batch_size=values(hp)["batch_size"], **kwargs)

    with tempfile.TemporaryDirectory(prefix="hpo-peers-kt-") as folder:
        tuner = keras_tuner.RandomSearch(
            Model(), objective=keras_tuner.Objective(spec.metric, "min" if spec.direction == "minimize" else "max"),
            max_trials=spec.trials, executions_per_trial=spec.seeds, seed=spec.seed, directory=folder,
            project_name="peers", overwrite=True)
        tuner.search(data.x_train, data.y_train, epochs=spec.training.max_epochs,
                     validation_data=(data.x_val, data.y_val), callbacks=[_early_stopping(spec)], verbose=0)
        best = next(iter(tuner.oracle.get_best_trials(1)), None)
        if best is None or best.score is None:
            raise SystemExit("keras-tuner: no trial finished (its errors are above)")
        trials = len(tuner.oracle.trials)
        return {"trials": trials, "fits": trials * spec.seeds,
                "params": {k: best.hyperparameters.values[k] for k in spec.space}, "value": float(best.score)}


def _refit(spec: StudySpec, picks: list[dict[str, Any]], seeds: list[int]) -> list[list[float]]:
    """Each pick's per-seed scores on `seeds` (hpo's engine: each replica is its seed's
    `model.fit`); a pick met before is not fitted again."""
    import optuna

    from hpo.specs.space import suggest_params
    from hpo.train.fit import fit_repeats

    done: dict[str, list[float]] = {}
    for pick in picks:
        key = json.dumps(pick, sort_keys=True)
        if key not in done:
            params = suggest_params(spec, optuna.trial.FixedTrial(pick))
            done[key] = fit_repeats(spec, params, seeds).scores
    return [done[json.dumps(pick, sort_keys=True)] for pick in picks]


def _main(argv: list[str]) -> None:
    loop, study, overrides = argv[0], argv[1], json.loads(argv[2])
    spec = load_spec(study).with_overrides(**overrides)
    if loop == "optuna":
        out = _optuna_loop(spec)
    elif loop == "keras-tuner":
        out = _keras_tuner_loop(spec)
    else:
        out = _refit(spec, json.loads(argv[3]), json.loads(argv[4]))
    print(json.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1:])
