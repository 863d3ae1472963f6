"""Plots: a study database (read through `hpo.results`) in, PNG files out: box plots of
per-seed scores (top trials, or grouped by one parameter) and a trial's learning curves.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hpo.errors import HpoError, StorageError
from hpo.results import (connect_readonly, curves_frame, params_frame, rank_trials, seed_scores_frame,
                         study_direction, trials_frame)

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


def plot_seed_scores(storage: str | None, study_name: str, output: str | Path, *, top: int = 10,
                     by: str | None = None) -> Path:
    """Box-and-whisker plot of per-seed scores: one box per top trial, best first; or with
    `by`, one box per value of that parameter over all complete trials.

    Raises:
        PlotError: No complete trial with per-seed scores, or no parameter `by`.
    """
    engine = connect_readonly(storage)
    try:
        direction = study_direction(engine, study_name)
        ranked = rank_trials(trials_frame(study_name=study_name, engine=engine), direction)
        if ranked.empty:
            raise PlotError(f'study "{study_name}" has no complete trial yet; nothing to plot')
        numbers = [int(n) for n in (ranked["number"] if by else ranked["number"].head(top))]
        seeds = seed_scores_frame(study_name=study_name, numbers=numbers, engine=engine)
        params = params_frame(study_name=study_name, numbers=numbers, engine=engine) if by else None
    finally:
        engine.dispose()
    seeds = seeds.dropna(subset=["score"])
    if by:
        labels, groups, xlabel = _grouped(seeds, params, by, study_name)
        title = f"{study_name}: per-seed scores by {by} ({len(numbers)} complete trials)"
    else:
        per_trial = seeds.groupby("number")["score"].apply(list)
        labels = [f"#{n}" for n in numbers if n in per_trial.index]
        groups = [per_trial[n] for n in numbers if n in per_trial.index]
        xlabel = f"trial (best {direction[:3]} first)"
        title = f"{study_name}: per-seed scores of the top {len(groups)} trials"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.boxplot(groups, tick_labels=labels, showmeans=True)
    for i, values in enumerate(groups, start=1):
        ax.scatter([i] * len(values), values, s=12, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score per seed")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, output)


def _grouped(seeds: pd.DataFrame, params: pd.DataFrame, by: str, study_name: str):
    rows = params[params["param_name"] == by]
    if rows.empty:
        names = sorted(params["param_name"].unique())
        raise PlotError(f'study "{study_name}" has no parameter "{by}"; its parameters: {", ".join(names) or "none"}')
    merged = seeds.merge(rows[["number", "value", "value_number", "kind"]], on="number")
    kind = rows["kind"].iloc[0]
    if kind == "float" and merged["value_number"].nunique() > MAX_GROUPS:
        merged["group"] = pd.qcut(merged["value_number"], MAX_GROUPS, duplicates="drop", precision=3).astype(str)
        order = sorted(merged["group"].unique(), key=lambda g: float(g.strip("([").split(",")[0]))
    else:
        merged["group"] = merged["value_number"].map("{:.4g}".format) if kind == "float" else merged["value"]
        numeric = merged.dropna(subset=["value_number"]).drop_duplicates("group")
        if len(numeric) == merged["group"].nunique():
            order = numeric.sort_values("value_number")["group"].tolist()
        else:
            order = sorted(merged["group"].unique())
    groups = [merged.loc[merged["group"] == g, "score"].tolist() for g in order]
    labels = [f"{g}\n(n={len(v)})" for g, v in zip(order, groups)]
    return labels, groups, by


def plot_learning_curves(storage: str | None, study_name: str, trial_number: int, output: str | Path) -> Path:
    """Learning curves of one trial: training (solid) and validation (dashed), one colour
    per seed; loss on the left, the metric on the right.

    Raises:
        PlotError: No such trial, or it stored no curves.
    """
    engine = connect_readonly(storage)
    try:
        study_direction(engine, study_name)
        curves = curves_frame(study_name=study_name, numbers=[trial_number], engine=engine)
    finally:
        engine.dispose()
    if curves.empty:
        raise PlotError(f'trial {trial_number} of study "{study_name}" has no learning curves '
                        f"(no such trial, or it failed before its first epoch)")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (train, val, name) in zip(axes, [("loss", "val_loss", "loss"), ("metric", "val_metric", "metric")]):
        for i, (seed_index, g) in enumerate(curves.groupby("seed_index", sort=True)):
            g = g.sort_values("epoch")
            colour = colours[i % len(colours)]
            seed = g["seed"].iloc[0]
            ax.plot(g["epoch"], g[train], color=colour, linestyle="-", label=f"seed {seed} training")
            ax.plot(g["epoch"], g[val], color=colour, linestyle="--", label=f"seed {seed} validation")
        ax.set_title(f"{name}: training (solid) and validation (dashed)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{study_name}: trial {trial_number}")
    return _save(fig, plt, output)


def _save(fig, plt, output: str | Path) -> Path:
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI, format="png")
    except OSError as e:
        raise StorageError(f"cannot write the plot to {path}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return path
