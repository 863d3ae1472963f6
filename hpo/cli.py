"""Command line: parse, call one library function, print.

Heavy modules (TensorFlow, Keras) are imported inside the commands that train, so
`hpo --help`, `hpo studies` and the SQL commands answer at once.
"""

from __future__ import annotations

import sys
import traceback

import click

from hpo.errors import HpoError
from hpo.storage import DEFAULT_STORAGE, STORAGE_ENV

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


@cli.command()
@click.argument("study")
@storage_option
@click.option("--study-name", help="Name of the study in the database (default: the spec's name).")
@click.option("--trials", type=int, help="Finished trials the study should end with (default: the spec's).")
@click.option("--timeout", type=float, help="Stop starting trials after this many seconds.")
@click.option("--seeds", type=int, help="Fits per trial (overrides the spec).")
@click.option("--max-epochs", type=int, help="Epochs per fit at most (overrides the spec).")
def run(study: str, storage: str, study_name: str | None, trials: int | None, timeout: float | None,
        seeds: int | None, max_epochs: int | None) -> None:
    """Run the study STUDY (a file, or a name from studies/) until its budget is spent."""
    from hpo.spec import load_spec
    from hpo.storage import get_storage, mask_url
    from hpo.study import create_study
    from hpo.workers import run_trials

    spec = load_spec(study).with_overrides(seeds=seeds, max_epochs=max_epochs, trials=trials, name=study_name)
    optuna_study = create_study(spec, get_storage(storage))
    click.echo(f"study {spec.name} ({spec.source}) on {mask_url(storage)}: budget {spec.trials} trials, "
               f"{spec.seeds} seeds each, up to {spec.training.max_epochs} epochs, {spec.metric} "
               f"({spec.direction}), objective {spec.objective.mode}")
    summary = run_trials(optuna_study, spec, budget=spec.trials, timeout=timeout, echo=click.echo)
    _print_summary(spec, summary, storage)


def _print_summary(spec, summary, storage: str) -> None:
    from hpo.storage import mask_url

    click.echo("")
    click.echo(f"done in {summary.seconds:.1f} s: {summary.complete} complete, {summary.pruned} pruned, "
               f"{summary.failed} failed in this run")
    if summary.stopped_reason:
        click.echo(summary.stopped_reason)
    best = summary.best
    if best is None:
        click.echo("no complete trial yet")
        return
    a = best.user_attrs
    click.echo(f"best trial #{best.number}: {spec.metric} {a['mean']:.5g} ± {a['std']:.2g} "
               f"over seeds {a['seeds']} (per seed: {', '.join(f'{s:.4g}' for s in a['seed_scores'])})")
    click.echo("params: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in best.params.items()))
    click.echo(f"stored in {mask_url(storage)} (study {spec.name}); "
               f"replay it with: hpo replay --study-name {spec.name} {best.number}")


@cli.command()
def studies() -> None:
    """List the study files shipped in studies/."""
    from hpo.spec import list_specs

    rows = list_specs()
    width = max((len(name) for name, _ in rows), default=0)
    for name, description in rows:
        click.echo(f"{name:<{width}}  {description}")


@cli.command()
@click.argument("trial_number", type=int)
@click.option("--study-name", required=True, help="Study that holds the trial.")
@storage_option
def replay(trial_number: int, study_name: str, storage: str) -> None:
    """Re-run TRIAL_NUMBER with its stored params and seeds; print stored vs replayed scores."""
    from hpo.replay import replay_trial

    result = replay_trial(storage, study_name, trial_number)
    click.echo(f"trial #{trial_number} of {study_name}: {result.params}")
    click.echo(f"{'seed':>8} {'stored':>14} {'replayed':>14} {'diff':>10}")
    for seed, stored, replayed in zip(result.seeds, result.stored, result.replayed):
        click.echo(f"{seed:>8} {stored:>14.8g} {replayed:>14.8g} {replayed - stored:>10.2g}")
    click.echo("identical" if result.identical else "differs (another machine or library version?)")


@cli.command()
@click.option("--seeds", "seed_counts", default="1,5,30", show_default=True,
              help="Comma-separated seed counts R to time.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True, help="Epochs per fit.")
@click.option("--samples", type=click.IntRange(100), default=1000, show_default=True,
              help="Points of the noisy sine (shrink for a quick run).")
@click.option("--units", type=click.IntRange(1), default=32, show_default=True, help="LSTM units.")
@click.option("--skip-sequential", is_flag=True, help="Do not time R sequential fits (the slow part).")
def bench(seed_counts: str, fmt: str, epochs: int, samples: int, units: int, skip_sequential: bool) -> None:
    """Time one native Keras fit, R sequential fits and R replicas trained together."""
    import json

    from hpo.bench import format_table, run_bench

    try:
        counts = [int(c) for c in seed_counts.split(",") if c.strip()]
    except ValueError:
        raise click.BadParameter(f"expected numbers like 1,5,30, got {seed_counts!r}", param_hint="--seeds")
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected seed counts of at least 1, got {seed_counts!r}", param_hint="--seeds")
    progress = (lambda line: click.echo(line, err=True)) if fmt == "json" else click.echo
    result = run_bench(counts, epochs=epochs, samples=samples, units=units, sequential=not skip_sequential,
                       echo=progress)
    click.echo(json.dumps(result.to_json()) if fmt == "json" else format_table(result))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `hpo` command: one line `error: ...` on failure, exit non-zero."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="hpo", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except HpoError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
