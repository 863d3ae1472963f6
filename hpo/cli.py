"""Command line: parse, call one library function, print.

Heavy modules (TensorFlow, Keras) are imported inside the commands that train, so
`hpo --help`, `hpo studies` and the SQL commands answer at once. Long because hpo has
many commands (about twenty, with their options and help); each stays parse, call, print.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import traceback
from pathlib import Path

import click

from hpo.errors import HpoError, OptionError
from hpo.specs import MAX_EPOCHS, MAX_SEEDS, MAX_TRIALS
from hpo.store.urls import DEFAULT_STORAGE, STORAGE_ENV
from hpo.words import format_params, plural

storage_option = click.option(
    "--storage", envvar=STORAGE_ENV, default=DEFAULT_STORAGE, show_default=True,
    help=f"Study database URL (falls back to ${STORAGE_ENV}).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """hpo: honest hyperparameter optimisation for Keras models.

    Every trial fits its configuration once per seed and is judged by the mean;
    every per-seed score and learning curve is stored in the study database.
    """
    ctx.obj = {"debug": debug}
    from hpo.study.study import quiet_optuna

    quiet_optuna()


def _workers_type(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"expected a number or auto, got {value!r}") from None
    if n < 1:
        raise click.BadParameter(f"expected at least 1 worker, got {n}")
    return n


def _spec_options(f):
    for option in reversed([
        click.option("--study-name", help="Name of the study in the database (default: the spec's name)."),
        click.option("--trials", type=click.IntRange(1, MAX_TRIALS),
                     help="Finished trials the whole study should end with, across all workers (default: the spec's)."),
        click.option("--seeds", type=click.IntRange(1, MAX_SEEDS), help="Fits per trial (overrides the spec)."),
        click.option("--max-epochs", type=click.IntRange(1, MAX_EPOCHS),
                     help="Epochs per fit at most (overrides the spec)."),
    ]):
        f = option(f)
    return f


def _worker_options(f):
    for option in reversed([
        click.option("--timeout", type=click.FloatRange(0, min_open=True),
                     help="Stop starting trials after this many seconds."),
        click.option("--max-failures", type=click.IntRange(1), default=5, show_default=True,
                     help="Stop the study after this many failed trials in a row."),
        click.option("--heartbeat-interval", type=click.IntRange(1), default=None,
                     help="Seconds between a running trial's heartbeats [default: 10]."),
        click.option("--grace-period", type=click.IntRange(1), default=None,
                     help="Seconds without a heartbeat after which a trial's worker counts as dead and "
                          "the trial is retried; must outlast a database restart [default: 60]."),
    ]):
        f = option(f)
    return f


def _open_storage(storage: str, heartbeat_interval: int | None, grace_period: int | None, command: str,
                  create: bool = True, connections: int = 1):
    """The study database; `create=False` (commands that only join or read a study) first
    checks that a SQLite file exists, so a mistyped path creates no empty database."""
    from hpo.store.storage import GRACE_PERIOD, HEARTBEAT_INTERVAL, get_storage
    from hpo.store.urls import existing_sqlite_path

    _check_proxy_options(storage, heartbeat_interval, grace_period)
    if not create:
        existing_sqlite_path(storage)
    return get_storage(storage, heartbeat_interval=heartbeat_interval or HEARTBEAT_INTERVAL,
                       grace_period=grace_period or GRACE_PERIOD, command=command, connections=connections)


def _check_proxy_options(storage: str, heartbeat_interval: int | None, grace_period: int | None) -> None:
    """Heartbeat settings belong to a storage proxy, not to the workers behind it."""
    from hpo.store.urls import proxy_address

    if proxy_address(storage) is not None and (heartbeat_interval or grace_period):
        raise OptionError("--heartbeat-interval" if heartbeat_interval else "--grace-period",
                          "is the storage proxy's, the same for all its workers: pass it to hpo storage-proxy")


def _storage_arg(storage: str) -> str:
    """` --storage URL` for a printed command, unless it is the default (password masked)."""
    from hpo.api import storage_arg

    return storage_arg(storage)


_memory_option = click.option(
    "--max-memory-growth", type=click.FloatRange(0), default=None,
    help="Restart a worker (same process id) between trials once its memory has grown this many MB since its "
         "first trial: TensorFlow keeps memory per fitted model; 0 never [default: 150 on the TensorFlow "
         "backend, never on JAX].")


# Set by a single-process `hpo run` that re-executes itself to give memory back: when it
# started (epoch seconds) and the study's trial counts then, so the new process prints
# no second header and its summary covers the whole run.
RESUMED_ENV = "HPO_RESUMED_RUN"


def _restart_if_memory_grew(summary, label: str, resume: dict | None = None) -> None:
    """Re-execute this very command when a run stopped to give memory back; the study's
    budget carries over, so the new process goes on where this one stopped."""
    if not summary.restart:
        return
    click.echo(f"{label}: {summary.stopped_reason}")
    sys.stdout.flush()
    sys.stderr.flush()
    if resume is not None:
        import json

        os.environ[RESUMED_ENV] = json.dumps(resume)
    os.execv(sys.executable, [sys.executable, "-m", "hpo", *sys.argv[1:]])


@cli.command()
@click.argument("study")
@storage_option
@_spec_options
@_worker_options
@_memory_option
@click.option("--workers", type=_workers_type, default="1", show_default=True, metavar="N|auto",
              help="Local worker processes on the study, or auto: the count `hpo bench-workers throughput` measured "
                   "fastest on this machine's cores, else one per core.")
def run(study: str, storage: str, study_name: str | None, trials: int | None, timeout: float | None,
        seeds: int | None, max_epochs: int | None, workers: int | str, max_failures: int,
        heartbeat_interval: int | None, grace_period: int | None, max_memory_growth: float | None) -> None:
    """Run the study STUDY (a file, or a name from studies/) until its budget is spent."""
    import dataclasses
    import json
    import time

    from hpo.specs import load_spec
    from hpo.store.storage import count_trials, rdb_storage
    from hpo.study.run import run_study

    _check_proxy_options(storage, heartbeat_interval, grace_period)
    spec = load_spec(study).with_overrides(seeds=seeds, max_epochs=max_epochs, trials=trials, name=study_name)
    resumed = json.loads(os.environ.pop(RESUMED_ENV, "") or "null")
    if workers == "auto":
        from hpo.study.local import auto_workers

        workers, why = auto_workers()
        if resumed is None:
            click.echo(f"--workers auto: {workers} ({why})")

    def created(optuna_study) -> None:
        nonlocal resumed
        if resumed is None:
            before = count_trials(rdb_storage(optuna_study._storage), optuna_study._study_id)
            resumed = {"started": time.time(), "before": dataclasses.asdict(before)}

    # A process that re-executed itself to give memory back prints no second header.
    optuna_study, summary = run_study(
        spec, storage, workers=workers, timeout=timeout, max_failures=max_failures,
        heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_memory_growth=max_memory_growth,
        header=resumed is None, created=created, echo=click.echo, echo_err=lambda line: click.echo(line, err=True))
    if workers == 1:
        _restart_if_memory_grew(summary, "hpo run", resumed)
        # The summary covers the whole run, across any restarts: counted in the database.
        after = count_trials(rdb_storage(optuna_study._storage), optuna_study._study_id)
        before = resumed["before"]
        summary.complete = after.complete - before["complete"]
        summary.pruned = after.pruned - before["pruned"]
        summary.failed = after.failed - before["failed"]
        summary.lost = after.lost - before["lost"]
        summary.seconds = time.time() - resumed["started"]
        _auto_confirm(optuna_study, spec, summary)
    _print_summary(spec, summary, storage)
    if summary.exit_code:
        sys.exit(summary.exit_code)


def _checked_spec(study: str, **overrides):
    """The study file with the command line's overrides, its data and model built once to
    check them."""
    from hpo.specs import load_spec
    from hpo.train.fit import check_spec_runs

    spec = load_spec(study).with_overrides(**overrides)
    check_spec_runs(spec)
    return spec


@cli.command()
@click.argument("study")
@storage_option
@_spec_options
def create(study: str, storage: str, study_name: str | None, trials: int | None, seeds: int | None,
           max_epochs: int | None) -> None:
    """Create the study STUDY in the database without running trials (start workers with
    `hpo worker`)."""
    from hpo.store.urls import mask_url
    from hpo.study.study import create_study
    from hpo.study.workers import clear_stop

    spec = _checked_spec(study, seeds=seeds, max_epochs=max_epochs, trials=trials, name=study_name)
    clear_stop(create_study(spec, _open_storage(storage, None, None, "create")))
    click.echo(f"study {spec.name} ({spec.source}) ready on {mask_url(storage)}: "
               f"budget {plural(spec.trials, 'trial')}; "
               f"start workers with: hpo worker{_storage_arg(storage)} --study-name {shlex.quote(spec.name)}")


@cli.command()
@storage_option
@click.option("--study-name", required=True, help="Study to join (created by hpo create or hpo run).")
@click.option("--trials", type=click.IntRange(1, MAX_TRIALS),
              help="Finished trials the whole study should end with (default: the stored spec's).")
@_worker_options
@click.option("--threads", type=click.IntRange(1),
              help="Training threads of this worker, JAX's and TensorFlow's (default: theirs, one per core).")
@_memory_option
@click.option("--worker-index", type=click.IntRange(0, 10**6),
              help="This worker's number, shown in its lines (default: a random number). Proposals do not "
                   "depend on it: each trial's are seeded by the study seed and the trial's number.")
@click.option("--study-dir", type=click.Path(file_okay=False, path_type=Path), envvar="HPO_STUDY_DIR",
              help="This machine's copy of the study file's folder, where its build and loader files are "
                   "[default: the folder recorded when the study was created].")
def worker(storage: str, study_name: str, trials: int | None, timeout: float | None, max_failures: int,
           heartbeat_interval: int | None, grace_period: int | None, threads: int | None,
           max_memory_growth: float | None, worker_index: int | None, study_dir: Path | None) -> None:
    """Join the study STUDY_NAME from any machine and run trials until its budget is spent;
    the spec is rebuilt from the database."""
    from hpo.backend import limit_threads, share_gpu
    from hpo.store.urls import mask_url
    from hpo.study.local import die_with_parent
    from hpo.study.study import load_study
    from hpo.study.workers import memory_growth_limit, run_trials
    from hpo.train.fit import check_spec_runs

    die_with_parent()
    if threads is not None:
        limit_threads(threads)
    share_gpu()
    if worker_index is None:
        import random

        worker_index = random.SystemRandom().randrange(1, 10**6)
    optuna_study, spec = load_study(_open_storage(storage, heartbeat_interval, grace_period, "worker", create=False),
                                    study_name)
    if study_dir is not None:
        spec = dataclasses.replace(spec, base_dir=str(study_dir.resolve()))
    # The hooks' code must be the code the study's trials were fitted with.
    check_spec_runs(spec)
    budget = trials if trials is not None else spec.trials
    click.echo(f"worker {worker_index} on study {study_name} ({mask_url(storage)}): budget {plural(budget, 'trial')}")
    summary = run_trials(optuna_study, spec, budget=budget, timeout=timeout,
                         max_consecutive_failures=max_failures, echo=click.echo,
                         max_memory_growth_mb=memory_growth_limit(spec, max_memory_growth))
    # TensorFlow does not give back what it keeps per model; a fresh process does.
    _restart_if_memory_grew(summary, f"worker {worker_index}")
    _auto_confirm(optuna_study, spec, summary)
    click.echo(f"worker {worker_index} done in {summary.seconds:.1f} s: {summary.complete} complete, "
               f"{summary.pruned} pruned, {summary.failed} failed, {summary.lost} given back"
               + (f"; {summary.stopped_reason}" if summary.stopped_reason else ""))
    if summary.exit_code:
        sys.exit(summary.exit_code)


def _auto_confirm(optuna_study, spec, summary) -> None:
    """The spec's `[confirm]`, once the study is done: its budget spent or its grid
    exhausted (not after a failure, an interrupt, a timeout or a memory restart)."""
    cut_short = (summary.stopped_reason or "").startswith("stopped starting trials")
    if spec.confirm.top and summary.best is not None and not summary.exit_code and not summary.restart \
            and not cut_short:
        from hpo.study.confirm import confirm_study

        confirm_study(optuna_study, spec, spec.confirm.top, spec.confirm.seeds, echo=click.echo)


@cli.command()
@click.option("--study-name", help="Study whose top trials to confirm (default: the storage's only study).")
@storage_option
@click.option("--top", type=click.IntRange(1), default=3, show_default=True, help="Trials to refit.")
@click.option("--seeds", type=click.IntRange(2), default=10, show_default=True,
              help="Fresh seeds per trial (none of the study's trials used them).")
def confirm(study_name: str | None, storage: str, top: int, seeds: int) -> None:
    """Refit the top trials on fresh seeds and store confirm_seeds/scores/mean/std on each;
    several of these on one study share the work (each trial is refitted once)."""
    from hpo.backend import share_gpu
    from hpo.study.confirm import confirm_study
    from hpo.study.study import load_study

    # Several of these (and workers) may share one GPU.
    share_gpu()
    study_name = _study_name_or_only(study_name, storage)
    optuna_study, spec = load_study(_open_storage(storage, None, None, "confirm", create=False), study_name)
    done = confirm_study(optuna_study, spec, top, seeds, echo=click.echo)
    from hpo.store.urls import proxy_address

    where = " --storage DATABASE_URL" if proxy_address(storage) is not None else _storage_arg(storage)
    click.echo(f"confirmed {plural(len(done), 'trial')} here; see hpo report --study-name {shlex.quote(study_name)}{where}")


def _print_summary(spec, summary, storage: str) -> None:
    from hpo.api import summary_lines

    for line in summary_lines(spec, summary, storage):
        click.echo(line)


@cli.group("bench-workers")
def bench_workers() -> None:
    """Figures for parallel workers: storage overhead, memory, throughput."""


@bench_workers.command("storage")
@storage_option
@click.option("--trials", type=int, default=100, show_default=True)
def bench_storage(storage: str, trials: int) -> None:
    """Seconds per beale trial: hpo's worker loop versus plain Optuna optimize, same database."""
    from hpo.bench.workers import measure_storage_overhead

    r = measure_storage_overhead(storage, trials)
    click.echo(f"{r.url}: {trials} beale trials: plain optuna {1000 * r.plain_seconds / trials:.1f} ms/trial, "
               f"hpo worker {1000 * r.hpo_seconds / trials:.1f} ms/trial, ratio {r.ratio:.2f} "
               f"({r.extra_ms_per_trial:+.1f} ms/trial)")


@bench_workers.command("memory")
@click.argument("study", default="sine_lstm")
@storage_option
@click.option("--trials", type=int, default=200, show_default=True)
@click.option("--seeds", type=int, default=1, show_default=True)
@click.option("--max-epochs", type=int, default=2, show_default=True)
@click.option("--max-memory-growth", type=float, help="Passed to hpo worker (0: never restart).")
def bench_memory(study: str, storage: str, trials: int, seeds: int, max_epochs: int,
                 max_memory_growth: float | None) -> None:
    """Resident memory of one `hpo worker` after 10, 50, 100, ... trials of STUDY."""
    from hpo.bench.workers import measure_memory

    checkpoints = tuple(sorted({1, 10, *range(50, trials + 1, 50), trials}))
    seen, restarts = measure_memory(storage, study, trials, checkpoints, seeds=seeds, max_epochs=max_epochs,
                                    max_memory_growth=max_memory_growth)
    for n, mb in seen:
        click.echo(f"after {plural(n, 'trial'):>11}: RSS {mb:.0f} MB")
    click.echo(f"the worker restarted itself {plural(restarts, 'time')}")


@bench_workers.command("throughput")
@click.argument("study", default="sine_lstm")
@storage_option
@click.option("--trials", type=int, default=16, show_default=True)
@click.option("--workers", "worker_counts", default="1,2", show_default=True, help="Comma-separated worker counts.")
@click.option("--seeds", type=int, default=1, show_default=True)
@click.option("--max-epochs", type=int, default=5, show_default=True)
def bench_throughput(study: str, storage: str, trials: int, worker_counts: str, seeds: int, max_epochs: int) -> None:
    """Trials per minute of `hpo run STUDY --workers N`, each N on a new study; the fastest N
    becomes this machine's `--workers auto`."""
    from hpo.backend import available_cores
    from hpo.bench.workers import measure_throughput
    from hpo.study.local import measured_workers_path, record_throughput

    rates = {}
    for n in (int(x) for x in worker_counts.split(",")):
        rates[n] = measure_throughput(storage, study, trials, n, seeds=seeds, max_epochs=max_epochs)
        click.echo(f"{plural(n, 'worker')}: {rates[n]:.1f} trials/min")
    first = next(iter(rates))
    for n, rate in rates.items():
        if n != first:
            click.echo(f"{n} vs {plural(first, 'worker')}: x{rate / rates[first]:.2f}")
    if len(rates) < 2:
        # One count measured says nothing about which is fastest.
        click.echo("not recorded for --workers auto: measure two or more counts (e.g. --workers 1,2) to compare")
        return
    try:
        best = record_throughput(study, rates)
    except OSError as e:
        click.echo(f"not recorded for --workers auto: cannot write {measured_workers_path()} ({e.strerror or e})")
        return
    click.echo(f"recorded in {measured_workers_path()}: hpo run --workers auto on {plural(available_cores(), 'core')} "
               f"now starts {plural(best, 'worker')}")


@bench_workers.command("scale")
@click.option("--storage", "urls", multiple=True, envvar=STORAGE_ENV, default=[DEFAULT_STORAGE], show_default=True,
              help="Study database URL; repeat to measure several (e.g. a PostgreSQL and a SQLite file).")
@click.option("--workers", "worker_counts", default="1,4,16,64,128", show_default=True,
              help="Comma-separated worker counts.")
@click.option("--trials-per-worker", type=click.IntRange(1), default=4, show_default=True,
              help="Budget of each study: this many trials per worker, at least 100.")
@click.option("--proxy", is_flag=True, help="Workers go through an hpo storage-proxy on each database.")
def bench_scale(urls: tuple[str, ...], worker_counts: str, trials_per_worker: int, proxy: bool) -> None:
    """N worker processes on one analytic (beale) study per database: trials per second,
    peak server connections, admission-lock wait, and whether the budget came out exact."""
    from hpo.bench.workers import measure_scale

    for url in urls:
        for n in (int(x) for x in worker_counts.split(",")):
            r = measure_scale(url, n, max(100, trials_per_worker * n), through_proxy=proxy)
            peak = "" if r.peak_connections is None else f", peak {r.peak_connections} connections"
            click.echo(f"{r.url}{' via a storage proxy' if proxy else ''}: {n:>3} workers: {r.trials_per_second:6.1f} trials/s{peak}, "
                       f"lock wait {r.lock_wait_seconds:.1f} s, budget {r.spent}/{r.budget} "
                       f"{'exact' if r.exact else 'NOT exact'}, {r.running} running, {r.errors} workers failed; "
                       f"{r.worker_rss_mb:.0f} MB a worker" + (f" (loaded {', '.join(r.heavy_imports)})"
                                                                if r.heavy_imports else ""))


@cli.command()
def studies() -> None:
    """List the study files shipped in studies/."""
    from hpo.specs import list_specs

    rows = list_specs()
    width = max((len(name) for name, _ in rows), default=0)
    for name, description in rows:
        click.echo(f"{name:<{width}}  {description}")


@cli.command()
@click.argument("trial_number", type=int)
@click.option("--study-name", help="Study that holds the trial (default: the storage's only study).")
@storage_option
def replay(trial_number: int, study_name: str | None, storage: str) -> None:
    """Re-run TRIAL_NUMBER with its stored params and seeds; print stored vs replayed scores."""
    from hpo.study.replay import replay_trial

    study_name = _study_name_or_only(study_name, storage)
    result = replay_trial(storage, study_name, trial_number)
    click.echo(f"trial #{trial_number} of {study_name}: {format_params(result.params)}")
    click.echo(f"{'seed':>8} {'stored':>14} {'replayed':>14} {'diff':>10}")
    for seed, stored, replayed in zip(result.seeds, result.stored, result.replayed):
        click.echo(f"{seed:>8} {stored:>14.8g} {replayed:>14.8g} {replayed - stored:>10.2g}")
    click.echo("identical" if result.identical else "differs (another machine or library version?)")


@cli.command("export")
@click.option("--study-name", help="Study to export from (default: the storage's only study).")
@storage_option
@click.option("--trial", "trial_number", type=int,
              help="Trial to export [default: the winner: the best confirmed mean where hpo confirm ran, else "
                   "the best objective value].")
@click.option("--seed", type=int, help="Export only this seed's model.")
@click.option("--all-seeds", is_flag=True, help="Export every seed's model (the default).")
@click.option("--ensemble", is_flag=True, help="Also save one model averaging the seeds' outputs, and print "
                                               "its validation score next to the seeds' mean.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="A folder (one FILE per model, created if new) or a FILE.keras for one model.")
@click.option("--study-dir", type=click.Path(file_okay=False, path_type=Path), envvar="HPO_STUDY_DIR",
              help="This machine's copy of the study file's folder, where its build and loader files are "
                   "[default: the folder recorded when the study was created].")
def export_command(study_name: str | None, storage: str, trial_number: int | None, seed: int | None,
                   all_seeds: bool, ensemble: bool, output: Path, study_dir: Path | None) -> None:
    """Refit a trial (the winner by default) and save each seed's model at its best epoch,
    as EarlyStopping(restore_best_weights=True) leaves it, in Keras' .keras format."""
    import statistics

    from hpo.errors import OptionError
    from hpo.study.export import custom_classes, export

    if seed is not None and all_seeds:
        raise OptionError("--seed", "give --seed K or --all-seeds, not both")
    study_name = _study_name_or_only(study_name, storage)
    result, files = export(storage, study_name, output, number=trial_number, seed=seed, ensemble=ensemble,
                           study_dir=study_dir)
    which = ("the winner, confirmed on fresh seeds" if result.confirmed else
             "the winner" if trial_number is None else "as asked")
    click.echo(f"trial #{result.number} of {study_name} ({which}): {format_params(result.searched)}")
    refitted = len(result.seeds) + len(result.also_refitted)
    click.echo(f"refitted {plural(refitted, 'seed')} to their best epochs in {result.refit_seconds:.1f} s"
               + (f" (seeds {', '.join(map(str, result.also_refitted))} were trained with them, as in the search)"
                  if result.also_refitted else ""))
    click.echo(f"{'seed':>8} {'stored ' + result.metric:>18} {'saved model':>14} {'diff':>10}")
    for m in result.seeds:
        click.echo(f"{m.seed:>8} {m.stored:>18.8g} {m.score:>14.8g} {m.score - m.stored:>10.2g}")
    if result.ensemble_score is not None:
        scores = [m.score for m in result.seeds]
        click.echo(f"ensemble of {len(scores)} seeds: {result.metric} {result.ensemble_score:.6g} "
                   f"(per-seed mean {result.mean_score:.6g} ± {statistics.stdev(scores):.2g})")
    for path in files:
        click.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    custom = custom_classes(result.ensemble or result.seeds[0].model)
    click.echo(f"load with: keras.saving.load_model({str(files[0])!r})"
               + (f"; it uses classes of your own ({', '.join(custom)}): import the module that defines them, "
                  "registered with @keras.saving.register_keras_serializable(), or pass custom_objects={...} "
                  "(a Lambda layer also needs safe_mode=False)" if custom else ""))


@cli.command()
@click.argument("query")
@storage_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True, help="Output format.")
def sql(query: str, storage: str, fmt: str) -> None:
    """Run QUERY on the study database through a read-only connection.

    The views hpo_trials, hpo_trial_params, hpo_seed_scores and hpo_learning_curves
    read like results tables; the database itself refuses any write.
    """
    from hpo.reports.results import format_frame, run_sql

    click.echo(format_frame(run_sql(query, storage), fmt))


@cli.command()
@click.option("--study-name", help="Study to report on (default: the storage's only study).")
@storage_option
@click.option("--top", type=click.IntRange(1), default=5, show_default=True, help="Trials to list.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True, help="Output format.")
@click.option("--wide", is_flag=True, help="Every column (params, per-seed scores, full diagnosis); "
                                          "the default fits 120 columns.")
def report(study_name: str | None, storage: str, top: int, fmt: str, wide: bool) -> None:
    """The top trials with mean ± std, bootstrap 95% CI, seeds, the mean confirmed on fresh
    seeds and a learning-curve diagnosis; whether the best beats the runner-up; and the
    expected best score vs number of trials."""
    from hpo.reports.report import build_report, format_report

    study_name = _study_name_or_only(study_name, storage, reads_tables=True)
    click.echo(format_report(build_report(storage, study_name, top), fmt, wide=wide))


@cli.command()
@click.option("--study-name", help="Study to plot (default: the storage's only study).")
@storage_option
@click.option("--top", type=click.IntRange(1), default=10, show_default=True,
              help="Box plot: this many best trials, one box each.")
@click.option("--by", "by_param", metavar="PARAM", help="Box plot: one box per value of PARAM over all complete trials.")
@click.option("--trial", "trial_number", type=int, help="Plot this trial's learning curves instead (one line per seed).")
@click.option("--expected-best", is_flag=True, help="Plot the expected best score vs number of trials instead.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="PNG file to write (default: named after the plot).")
def plot(study_name: str | None, storage: str, top: int, by_param: str | None, trial_number: int | None,
         expected_best: bool, output: str | None) -> None:
    """Box plot of per-seed scores (top trials, or --by PARAM), --trial N's learning curves,
    or --expected-best (expected best score vs trials), as PNG."""
    from hpo.reports.plots import plot_expected_best, plot_learning_curves, plot_seed_scores

    study_name = _study_name_or_only(study_name, storage, reads_tables=True)
    if expected_best:
        path = plot_expected_best(storage, study_name, output or f"{study_name}-expected-best.png")
    elif trial_number is not None:
        path = plot_learning_curves(storage, study_name, trial_number,
                                    output or f"{study_name}-trial{trial_number}-curves.png")
    else:
        default = f"{study_name}-by-{by_param}.png" if by_param else f"{study_name}-top{top}.png"
        path = plot_seed_scores(storage, study_name, output or default, top=top, by=by_param)
    click.echo(f"wrote {path}")


@cli.command()
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--allow-writes", is_flag=True, help="Let the page delete and create studies and edit notes "
                                                  "(default: read-only).")
@click.option("--access-log", is_flag=True, help="Print a line per HTTP request.")
def dashboard(storage: str, host: str, port: int, allow_writes: bool, access_log: bool) -> None:
    """Serve optuna-dashboard on the study database, read-only unless --allow-writes; trials
    lacking a note get one first."""
    from hpo.reports.dashboard import serve_dashboard

    serve_dashboard(storage, host, port, echo=click.echo, allow_writes=allow_writes, access_log=access_log)


@cli.command("storage-proxy")
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 for workers on other machines.")
@click.option("--port", type=click.IntRange(0, 65535), default=13000, show_default=True,
              help="Port to listen on (0: a free one, printed).")
@click.option("--threads", type=click.IntRange(1), default=32, show_default=True,
              help="Calls answered at once.")
@click.option("--connections", type=click.IntRange(1), default=4, show_default=True,
              help="Database connections kept open (two more are opened at busy moments).")
@click.option("--heartbeat-interval", type=click.IntRange(1), default=None,
              help="Seconds between a running trial's heartbeats, for every worker [default: 10].")
@click.option("--grace-period", type=click.IntRange(1), default=None,
              help="Seconds without a heartbeat after which a trial's worker counts as dead [default: 60].")
def storage_proxy(storage: str, host: str, port: int, threads: int, connections: int,
                  heartbeat_interval: int | None, grace_period: int | None) -> None:
    """Serve the study database to many workers on one port (Optuna's gRPC storage proxy,
    with hpo's admission lock, counts and heartbeats): run workers with
    `hpo worker --storage grpc://HOST:PORT`. They hold no database connection; the proxy
    holds a few, however many workers it serves."""
    from hpo.store.proxy import serve_proxy
    from hpo.store.urls import address, mask_url, proxy_address
    from hpo.store.views import create_views
    from hpo.study.local import die_with_parent

    die_with_parent()
    if proxy_address(storage) is not None:
        raise OptionError("--storage", f"{storage} is a storage proxy; pass the database's URL")
    rdb = _open_storage(storage, heartbeat_interval, grace_period, "storage-proxy", connections=connections)
    create_views(rdb.engine)

    def ready(bound: int) -> None:
        where = f"grpc://{address(host, bound)}"
        click.echo(f"storage proxy for {mask_url(storage)} on {where} ({threads} calls at once, "
                   f"{connections} database connections); workers: hpo worker --storage {where} "
                   "--study-name NAME; Ctrl-C stops it")

    serve_proxy(rdb, host, port, threads=threads, ready=ready)
    click.echo("storage proxy stopped")


@cli.command()
@click.option("--seeds", "seed_counts", default="1,5,30", show_default=True,
              help="Comma-separated seed counts R to time.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True, help="Epochs per fit.")
@click.option("--samples", type=click.IntRange(100), default=1000, show_default=True,
              help="Points of the noisy sine (shrink for a quick run).")
@click.option("--units", type=click.IntRange(1), default=32, show_default=True,
              help="Width of the recurrent or convolutional layers.")
@click.option("--model", type=click.Choice(["lstm", "conv1d", "embedding_gru"]), default="lstm", show_default=True,
              help="lstm: the reference LSTM; conv1d, embedding_gru: models no built-in family has.")
@click.option("--skip-sequential", is_flag=True, help="Do not time R native fits one after another (the slow part).")
def bench(seed_counts: str, fmt: str, epochs: int, samples: int, units: int, model: str,
          skip_sequential: bool) -> None:
    """Time one native Keras fit, R native fits, and R replicas trained together (fresh and
    for a repeated shape), on the device JAX uses."""
    import json

    from hpo.bench.seeds import format_table, run_bench

    try:
        counts = [int(c) for c in seed_counts.split(",") if c.strip()]
    except ValueError:
        raise click.BadParameter(f"expected numbers like 1,5,30, got {seed_counts!r}", param_hint="--seeds")
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected seed counts of at least 1, got {seed_counts!r}", param_hint="--seeds")
    progress = (lambda line: click.echo(line, err=True)) if fmt == "json" else click.echo
    result = run_bench(counts, model=model, epochs=epochs, samples=samples, units=units,
                       sequential=not skip_sequential, echo=progress)
    click.echo(json.dumps(result.to_json()) if fmt == "json" else format_table(result))


@cli.command("bench-study")
@click.argument("study", default="sine_lstm")
@_spec_options
@click.option("--warm-cache", is_flag=True,
              help="Use the compilation cache HPO_CACHE_DIR names (default: an empty one of its own).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def bench_study(study: str, study_name: str | None, trials: int | None, seeds: int | None, max_epochs: int | None,
                warm_cache: bool, fmt: str) -> None:
    """Run STUDY (default: sine_lstm) once, with one worker in this process on a new SQLite
    file, and split its wall time into compiling, epochs, the database and the rest, per
    trial and in total."""
    import json
    import tempfile

    from hpo.backend import CACHE_DIR_ENV
    from hpo.bench.study import format_study_time, time_study

    with tempfile.TemporaryDirectory(prefix="hpo-bench-cache-") as cache:
        if not warm_cache:
            # Before anything configures JAX: the spec check below builds a model.
            os.environ[CACHE_DIR_ENV] = cache
        spec = _checked_spec(study, seeds=seeds, max_epochs=max_epochs, trials=trials, name=study_name)
        progress = (lambda line: click.echo(line, err=True)) if fmt == "json" else click.echo
        result = time_study(spec, cache=os.environ.get(CACHE_DIR_ENV, "the user's") if warm_cache
                            else "empty at the start", echo=progress)
    click.echo(json.dumps(result.to_json()) if fmt == "json" else format_study_time(result))


@cli.command("bench-peers")
@click.argument("study", default="csv_lstm")
@click.option("--tools", default=None, metavar="LIST",
              help="Comma-separated, from hpo, optuna-jax, optuna-tensorflow, keras-tuner "
                   "(default: every one this machine has; keras-tuner needs `pip install -e \".[peers]\"` "
                   "or `pip install keras-tuner`).")
@click.option("--trials", type=click.IntRange(1, MAX_TRIALS), default=None, help="Override the study's trials.")
@click.option("--seeds", type=click.IntRange(1, MAX_SEEDS), default=None, help="Override the seeds per trial.")
@click.option("--max-epochs", type=click.IntRange(1, MAX_EPOCHS), default=None, help="Override max_epochs.")
@click.option("--refit-seeds", type=click.IntRange(2, MAX_SEEDS), default=10, show_default=True,
              help="Fresh seeds each tool's pick is refitted on.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def bench_peers(study: str, tools: str | None, trials: int | None, seeds: int | None, max_epochs: int | None,
                refit_seeds: int, fmt: str) -> None:
    """Run STUDY (default: csv_lstm) by hpo, by a hand-written Optuna loop of native
    `model.fit` calls (JAX, TensorFlow) and by KerasTuner's RandomSearch, with the same
    space, seeds and budget; print each tool's wall time, its ratio to hpo, and each pick
    refitted on fresh seeds."""
    import json

    from hpo.bench.peers import TOOLS, available_tools, format_peers, run_peers

    available = available_tools()
    chosen = available if tools is None else [t.strip() for t in tools.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TOOLS]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown tool {', '.join(unknown) or '(none given)'}; choose from {', '.join(TOOLS)}",
                                 param_hint="--tools")
    if "keras-tuner" in chosen and "keras-tuner" not in available:
        raise click.BadParameter('keras-tuner is not installed; pip install -e ".[peers]" (or keras-tuner), '
                                 "or leave it out",
                                 param_hint="--tools")
    progress = (lambda line: click.echo(line, err=True)) if fmt == "json" else click.echo
    result = run_peers(study, chosen, trials=trials, seeds=seeds, max_epochs=max_epochs,
                       refit_seeds=refit_seeds, echo=progress)
    click.echo(json.dumps(result.to_json()) if fmt == "json" else format_peers(result))


def _storage_of(args: list[str]) -> str:
    """The storage URL a command line names (or the default), password masked."""
    from hpo.store.urls import mask_url, resolve_storage_url

    url = None
    for i, arg in enumerate(args):
        if arg == "--storage" and i + 1 < len(args):
            url = args[i + 1]
        elif arg.startswith("--storage="):
            url = arg.split("=", 1)[1]
    return mask_url(resolve_storage_url(url))


def _study_name_or_only(study_name: str | None, storage: str, reads_tables: bool = False) -> str:
    """`--study-name`, or the storage's only study when it was not given; a command that
    `reads_tables` (SQL) is refused a storage proxy first."""
    from hpo.reports.results import study_names
    from hpo.store.urls import proxy_address, refuse_proxy

    if reads_tables:
        refuse_proxy(storage, "reports, plots and hpo sql")
    if study_name:
        return study_name
    if proxy_address(storage) is not None:
        # A storage proxy serves Optuna's calls, not SQL.
        import optuna

        from hpo.store.storage import get_storage

        names = sorted(optuna.get_all_study_names(get_storage(storage, command="--study-name lookup")))
    else:
        names = study_names(storage)
    if len(names) == 1:
        return names[0]
    raise click.UsageError("--study-name is needed: " + (f"this storage holds {len(names)} studies: {', '.join(names)}"
                                                         if names else "this storage holds no study"))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `hpo` command: one line `error: ...` on failure, exit non-zero."""
    args = argv if argv is not None else sys.argv[1:]
    # --debug is an option of `hpo` itself, before the command (not inside a SQL string).
    debug = bool(args) and args[0] == "--debug"
    try:
        cli.main(args=argv, prog_name="hpo", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        hint = ""
        if isinstance(e, click.UsageError) and e.ctx is not None:
            hint = f" (see {e.ctx.command_path} --help)"
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except HpoError as e:
        if debug:
            # The traceback without its closing "hpo.errors.X: message" line: the message
            # follows once, as the error line.
            lines = traceback.format_exception(e)
            click.echo("".join(lines[:-1]).rstrip(), err=True)
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a database fault met outside the storage layer's checks
        from hpo.store.faults import database_fault

        fault = database_fault(e)
        if fault is None:
            raise
        if debug:
            click.echo("".join(traceback.format_exception(e)[:-1]).rstrip(), err=True)
        click.echo(f"error: storage {_storage_of(args)}: {fault[1]}", err=True)
        sys.exit(1)
