"""Plots: a study database (read through `hpo.reports.results`, ranked as the report ranks)
in, PNG files out: box plots of per-seed scores (top trials, or grouped by one parameter),
a trial's learning curves, and the expected best score vs number of trials.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hpo.errors import HpoError, StorageError
from hpo.reports.report import rank_trials
from hpo.reports.results import (connect_readonly, curves_frame, params_frame, seed_scores_frame, stored_spec,
                                 study_direction, trial_attr, trials_frame)
from hpo.reports.stats import expected_best
from hpo.words import plural

# Inches at DPI: 1000 x 600 pixels, readable on a laptop screen and in a README.
FIGSIZE = (10.0, 6.0)
DPI = 100
# A float parameter with more distinct values than this is cut into this many quantile bins.
MAX_GROUPS = 8


class PlotError(HpoError):
    """Nothing to plot: no such trial or parameter, or no per-seed record yet."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _study_metric(engine, study_name: str) -> tuple[str, str]:
    """(the objective's metric, the name of its training-side curve) from the stored spec."""
    spec = stored_spec(engine, study_name)
    if not spec:
        return "score", "metric"
    metric = spec.get("metric", "score")
    # The "metric" curves hold the objective's metric on training and validation data.
    return metric, metric.removeprefix("val_")


def plot_seed_scores(storage: str | None, study_name: str, output: str | Path, *, top: int = 10,
                     by: str | None = None) -> Path:
    """Box-and-whisker plot of per-seed scores: one box per top trial, best first; or with
    `by`, one box per value of that parameter over all complete trials.

    Raises:
        PlotError: No complete trial with per-seed scores, or no parameter `by`.
    """
    return _save(seed_scores_figure(storage, study_name, top=top, by=by), _pyplot(), output)


def seed_scores_figure(storage: str | None, study_name: str, *, top: int = 10, by: str | None = None):
    """The matplotlib figure `plot_seed_scores` saves (to show or change in a notebook)."""
    engine = connect_readonly(storage)
    try:
        direction = study_direction(engine, study_name)
        ranked = rank_trials(trials_frame(study_name=study_name, engine=engine), direction)
        if ranked.empty:
            raise PlotError(f'study "{study_name}" has no complete trial yet; nothing to plot')
        numbers = [int(n) for n in (ranked["number"] if by else ranked["number"].head(top))]
        seeds = seed_scores_frame(study_name=study_name, numbers=numbers, engine=engine)
        params = params_frame(study_name=study_name, numbers=numbers, engine=engine) if by else None
        metric, _ = _study_metric(engine, study_name)
    finally:
        engine.dispose()
    seeds = seeds.dropna(subset=["score"])
    if by:
        labels, groups, xlabel, drawn = _grouped(seeds, params, by, study_name)
        title = (f"{study_name}: {metric} per seed by {by} ({plural(drawn, 'complete trial')}, "
                 f"{plural(len(seeds), 'seed')})")
    else:
        per_trial = seeds.groupby("number")["score"].apply(list)
        labels = [f"#{n}\n({plural(len(per_trial[n]), 'seed')})" for n in numbers if n in per_trial.index]
        groups = [per_trial[n] for n in numbers if n in per_trial.index]
        xlabel = f"trial, best first ({direction})"
        title = f"{study_name}: {metric} per seed of the top {len(groups)} of {plural(len(ranked), 'complete trial')}"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    # Every seed is drawn as a point, so the box draws no outliers of its own (they would
    # appear twice).
    ax.boxplot(groups, tick_labels=labels, showmeans=True, showfliers=False,
               medianprops={"color": "tab:orange"},
               meanprops={"marker": "^", "markerfacecolor": "tab:green", "markeredgecolor": "tab:green"})
    rng = np.random.default_rng(0)
    for i, values in enumerate(groups, start=1):
        jitter = rng.uniform(-0.08, 0.08, len(values))
        ax.scatter(i + jitter, values, s=14, alpha=0.6, color="tab:blue", zorder=3)
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], color="tab:orange", label="median"),
                       Line2D([], [], marker="^", linestyle="", color="tab:green", label="mean"),
                       Line2D([], [], marker="o", linestyle="", color="tab:blue", alpha=0.6, label="one seed")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    values = np.concatenate([np.asarray(g, dtype=float) for g in groups]) if groups else np.array([])
    log = _log_scale(values)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({direction}{', log scale' if log else ''})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _log_scale(values) -> bool:
    """The one rule for a log y axis: every value positive, and they span decades (over
    100x), or one tail stretches a linear axis so that the middle half of the values
    fills under a tenth of it (one wide box squashing the others) across over 10x."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2 or not np.all(values > 0):
        return False
    ratio = values.max() / values.min()
    q25, q75 = np.percentile(values, [25, 75])
    return bool(ratio > 100 or (ratio > 10 and q75 - q25 < 0.1 * (values.max() - values.min())))


def _grouped(seeds: pd.DataFrame, params: pd.DataFrame, by: str, study_name: str):
    rows = params[params["param_name"] == by]
    if rows.empty:
        names = sorted(params["param_name"].unique())
        raise PlotError(f'study "{study_name}" has no parameter "{by}"; its parameters: {", ".join(names) or "none"}')
    merged = seeds.merge(rows[["number", "value", "value_number", "kind"]], on="number")
    kind = rows["kind"].iloc[0]
    if kind == "float" and merged["value_number"].nunique() > MAX_GROUPS:
        bins = pd.qcut(merged["value_number"], MAX_GROUPS, duplicates="drop")
        merged["group"] = [f"{b.left:.3g}\nto {b.right:.3g}" for b in bins]
        lefts = {f"{b.left:.3g}\nto {b.right:.3g}": b.left for b in bins}
        order = sorted(merged["group"].unique(), key=lefts.__getitem__)
    else:
        merged["group"] = merged["value_number"].map("{:.4g}".format) if kind == "float" else merged["value"]
        numeric = merged.dropna(subset=["value_number"]).drop_duplicates("group")
        if len(numeric) == merged["group"].nunique():
            order = numeric.sort_values("value_number")["group"].tolist()
        else:
            order = sorted(merged["group"].unique())
    groups = [merged.loc[merged["group"] == g, "score"].tolist() for g in order]
    trials = [merged.loc[merged["group"] == g, "number"].nunique() for g in order]
    labels = [f"{g}\n({plural(t, 'trial')},\n{plural(len(v), 'seed')})" for g, t, v in zip(order, trials, groups)]
    return labels, groups, by, int(merged["number"].nunique())


def plot_learning_curves(storage: str | None, study_name: str, trial_number: int, output: str | Path) -> Path:
    """Learning curves of one trial: training (solid) and validation (dashed), one colour
    per seed, each seed's best epoch marked; loss on the left, the compiled metric on the
    right; whole epochs on the x axis, and a pruned trial's last epoch marked and named
    in the title; a log scale by the rule of the box plots; the legend beside the plots.

    Raises:
        PlotError: No such trial, or it stored no curves.
    """
    return _save(learning_curves_figure(storage, study_name, trial_number), _pyplot(), output)


def learning_curves_figure(storage: str | None, study_name: str, trial_number: int):
    """The matplotlib figure `plot_learning_curves` saves (to show or change in a notebook)."""
    engine = connect_readonly(storage)
    try:
        study_direction(engine, study_name)
        curves = curves_frame(study_name=study_name, numbers=[trial_number], engine=engine)
        seeds = seed_scores_frame(study_name=study_name, numbers=[trial_number], engine=engine)
        metric, curve_name = _study_metric(engine, study_name)
        pruned_at = trial_attr(engine, study_name, "pruned_at_epoch").get(trial_number)
    finally:
        engine.dispose()
    if curves.empty:
        raise PlotError(f'trial {trial_number} of study "{study_name}" has no learning curves '
                        f"(no such trial, or it failed before its first epoch)")
    best_epoch = dict(zip(seeds["seed_index"], seeds["best_epoch"]))
    plt = _pyplot()
    # When the objective's metric is the loss itself, a second panel would repeat the first.
    panels = [("loss", "val_loss", "loss")] + ([] if curve_name == "loss" else [("metric", "val_metric", curve_name)])
    fig, axes = plt.subplots(1, len(panels), figsize=FIGSIZE, dpi=DPI, squeeze=False)
    axes = list(axes[0])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for ax, (train, val, name) in zip(axes, panels):
        for i, (seed_index, g) in enumerate(curves.groupby("seed_index", sort=True)):
            g = g.sort_values("epoch")
            colour = colours[i % len(colours)]
            seed = g["seed"].iloc[0]
            line, = ax.plot(g["epoch"], g[train], color=colour, linestyle="-", linewidth=1)
            ax.plot(g["epoch"], g[val], color=colour, linestyle="--", linewidth=1)
            b = best_epoch.get(seed_index)
            at = g[g["epoch"] == b]
            if b is not None and not at.empty and pd.notna(at[val].iloc[0]):
                ax.plot([b], [at[val].iloc[0]], marker="o", markersize=6, color=colour, markeredgecolor="black")
            if ax is axes[0]:
                handles.append((line, f"seed {seed} (best epoch {b})"))
        if _log_scale(pd.concat([curves[train], curves[val]]).dropna()):
            ax.set_yscale("log")
        if pruned_at is not None:
            ax.axvline(pruned_at, color="tab:red", linestyle=":", linewidth=1.5)
        ax.xaxis.set_major_locator(_whole_numbers())
        ax.set_title(name if name == "loss" else f"{name} (the objective's metric)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name + (" (log scale)" if ax.get_yscale() == "log" else ""))
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    style = [Line2D([], [], color="grey", linestyle="-", label="training"),
             Line2D([], [], color="grey", linestyle="--", label="validation"),
             Line2D([], [], color="grey", marker="o", linestyle="", markeredgecolor="black",
                    label="best epoch (validation)")]
    if pruned_at is not None:
        style.append(Line2D([], [], color="tab:red", linestyle=":", label=f"pruned after epoch {pruned_at}"))
    fig.legend(handles=[h for h, _ in handles] + style, labels=[l for _, l in handles] + [h.get_label() for h in style],
               loc="center right", fontsize="small")
    state = "" if pruned_at is None else f", pruned after epoch {pruned_at}"
    fig.suptitle(f"{study_name}: trial {trial_number}{state}, {plural(len(handles), 'seed')} (objective: {metric})")
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    return fig


def plot_expected_best(storage: str | None, study_name: str, output: str | Path) -> Path:
    """Expected best score vs number of trials (Dodge et al. 2019) beside the best found
    so far in trial order: a curve still falling at the right edge says more trials help.

    Raises:
        PlotError: No complete trial.
    """
    return _save(expected_best_figure(storage, study_name), _pyplot(), output)


def expected_best_figure(storage: str | None, study_name: str):
    """The matplotlib figure `plot_expected_best` saves (to show or change in a notebook)."""
    engine = connect_readonly(storage)
    try:
        direction = study_direction(engine, study_name)
        trials = trials_frame(study_name=study_name, engine=engine)
        metric, _ = _study_metric(engine, study_name)
    finally:
        engine.dispose()
    done = trials[(trials["state"] == "COMPLETE") & trials["value"].notna()].sort_values("number")
    if done.empty:
        raise PlotError(f'study "{study_name}" has no complete trial yet; nothing to plot')
    values = done["value"].to_numpy(dtype=float)
    curve = expected_best(values, direction)
    running = np.minimum.accumulate(values) if direction == "minimize" else np.maximum.accumulate(values)
    n = np.arange(1, len(values) + 1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.plot(n, curve, color="tab:blue", marker=".", label="expected best of n trials (Dodge et al. 2019)")
    ax.step(n, running, where="post", color="tab:grey", alpha=0.7, label="best so far, in trial order")
    if _log_scale(values):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(_whole_numbers())
    ax.set_xlabel("number of trials")
    ax.set_ylabel(f"best {metric} ({direction})")
    ax.set_title(f"{study_name}: expected best {metric} vs trials ({plural(len(values), 'complete trial')})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _whole_numbers():
    # Epochs and trial counts are whole: no tick at epoch 1.5.
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig, plt, output: str | Path) -> Path:
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format="png")
    except OSError as e:
        raise StorageError(f"cannot write the plot to {path}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return path
