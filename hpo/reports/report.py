"""The report: a study database URL in; which trial is best, by how much, and whether the seeds
can tell it from the runner-up (Welch's test, bootstrap), with a learning-curve diagnosis per
trial, out as a table, CSV, JSON or markdown (`hpo report`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field

import pandas as pd

from hpo.reports.diagnosis import diagnose_curves
from hpo.reports.results import (confirmations_frame, connect_readonly, curves_frame, format_frame, params_frame,
                                 seed_scores_frame, stored_spec, study_direction, trial_attr, trials_frame)
from hpo.reports.stats import bootstrap_ci, expected_best, p_improvement, p_improvement_words, welch
from hpo.words import mean_std, plural


ALPHA = 0.05


@dataclass
class Comparison:
    """Best trial against the runner-up: Welch's t-test and bootstrap P(improvement) on
    their per-seed scores (the confirmation's when both were confirmed)."""

    best: int
    runner_up: int
    difference: float
    t: float
    p: float
    distinguishable: bool
    hint: str
    p_improvement: float = math.nan
    on: str = "selection seeds"
    n_seeds: int = 0

    @property
    def words(self) -> str:
        """P(improvement) in words; a bootstrap over a handful of seeds is optimistic, so
        when Welch's test is not convinced the sentence says so rather than "clear winner"."""
        if not self.distinguishable and math.isfinite(self.p_improvement) and self.p_improvement >= 0.75:
            welch_p = f" (p = {self.p:.2g})" if math.isfinite(self.p) else ""
            return (f"#{self.best} is ahead of #{self.runner_up} in {100 * self.p_improvement:.0f}% of bootstrap "
                    f"resamples, but with {plural(self.n_seeds, 'seed')} per trial Welch's test cannot confirm "
                    f"the difference{welch_p}: no clear winner yet")
        return p_improvement_words(self.p_improvement, f"#{self.best}", f"#{self.runner_up}")


@dataclass
class Report:
    """What `hpo report` prints: the top trials, the best-vs-runner-up comparison, and
    the expected best score vs number of trials."""

    study_name: str
    direction: str
    n_complete: int
    top: pd.DataFrame
    comparison: Comparison | None
    expected_best: list[float] = field(default_factory=list)
    ranked_by: str = "objective value"
    # Pruned trials, best partial score first: the objective over each seed's best score
    # up to the epoch the trial was stopped at.
    pruned: pd.DataFrame = field(default_factory=pd.DataFrame)


def compare_scores(a: list[float], b: list[float], alpha: float = ALPHA) -> tuple[float, float, bool, str]:
    """Welch's t-test of two trials' per-seed scores: (t, p, distinguishable, hint).

    The hint is plain words for a person: whether the difference is real at this many
    seeds and, if not, roughly how many seeds would resolve a difference this size.
    """
    a = [x for x in a if x is not None and math.isfinite(x)]
    b = [x for x in b if x is not None and math.isfinite(x)]
    n = min(len(a), len(b))
    if n < 2:
        return math.nan, math.nan, False, f"cannot tell with {plural(n, 'seed')}: raise seeds to 3 or more"
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a), statistics.variance(b)
    if var_a == 0 and var_b == 0:
        same = mean_a == mean_b
        return (math.nan, 1.0 if same else 0.0, not same,
                "identical per-seed scores" if same else "every seed agrees exactly: the difference is real")
    t, p = welch(a, b)
    if p < alpha:
        return t, p, True, f"distinguishable at {n} seeds (Welch p = {p:.2g})"
    diff = abs(mean_a - mean_b)
    if diff == 0:
        return t, p, False, f"not distinguishable at {n} seeds (same mean): either is as good"
    # Seeds per trial for a two-sided 5% test with 80% power at this difference and spread.
    needed = math.ceil((1.96 + 0.84) ** 2 * (var_a + var_b) / diff**2)
    if needed > 100 * n:
        return t, p, False, (f"not distinguishable at {n} seeds (Welch p = {p:.2g}): the difference is tiny next "
                             f"to the spread over seeds; treat them as equally good")
    return t, p, False, (f"not distinguishable at {n} seeds (Welch p = {p:.2g}): raise seeds "
                         f"(about {max(needed, n + 1)} would resolve a difference this size)")


def rank_trials(trials: pd.DataFrame, direction: str) -> pd.DataFrame:
    """The complete trials of a `trials_frame`, best objective value first (ties by mean)."""
    done = trials[(trials["state"] == "COMPLETE") & trials["value"].notna()]
    return done.sort_values(["value", "mean"], ascending=direction == "minimize", kind="stable")


def build_report(storage: str | None, study_name: str, top: int = 5) -> Report:
    """The study's top trials with mean ± std, a bootstrap 95% CI, seeds, the confirmed
    mean on fresh seeds, params and diagnosis; whether the best is distinguishable from
    the runner-up; and the expected best score vs number of trials.

    A trial's figures cover every seed it was fitted on, those added while it was the
    incumbent included; its objective value is the one it was selected on.

    Trials confirmed on fresh seeds rank first, by their confirmed mean (the selection
    mean of the winner is biased in its favour); the rest follow by objective value.

    Raises:
        StudyNotFound: No study of that name.
    """
    engine = connect_readonly(storage)
    try:
        direction = study_direction(engine, study_name)
        trials = trials_frame(study_name=study_name, engine=engine)
        done = rank_trials(trials, direction)
        confirmed = confirmations_frame(study_name=study_name, engine=engine)
        confirmed = {int(r.number): r for r in confirmed.itertuples(index=False)}
        minimize = direction == "minimize"
        order = sorted(range(len(done)), key=lambda i: (
            0 if int(done["number"].iloc[i]) in confirmed else 1,
            (1 if minimize else -1) * confirmed[int(done["number"].iloc[i])].confirm_mean
            if int(done["number"].iloc[i]) in confirmed else 0.0, i))
        ranked = done.iloc[order].head(top)
        numbers = [int(n) for n in ranked["number"]]
        params = params_frame(study_name=study_name, numbers=numbers, engine=engine)
        seeds = seed_scores_frame(study_name=study_name, numbers=numbers, engine=engine)
        curves = curves_frame(study_name=study_name, numbers=numbers, engine=engine)
        stop_reason = trial_attr(engine, study_name, "seed_stop_reason")
        pruned_at = trial_attr(engine, study_name, "pruned_at_epoch")
        spec = stored_spec(engine, study_name)
    finally:
        engine.dispose()

    scores = {n: [_round(x) for x in g["score"]] for n, g in seeds.groupby("number")}
    table = ranked[["number", "value", "mean", "std", "ci_low", "ci_high", "n_seeds", "n_added_seeds",
                    "mean_best_epoch"]].copy().reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    # The interval the trial stored, as the hpo_trials view shows it; trials recorded before
    # intervals were stored get theirs from their per-seed scores here, the same way.
    unrounded = {n: g["score"].tolist() for n, g in seeds.groupby("number")}
    for i, n in enumerate(numbers):
        if pd.isna(table.loc[i, "ci_low"]):
            table.loc[i, "ci_low"], table.loc[i, "ci_high"] = bootstrap_ci(unrounded.get(n, []))
    table["ci_low"] = table["ci_low"].astype(float)
    table["ci_high"] = table["ci_high"].astype(float)
    table["confirm_mean"] = [confirmed[n].confirm_mean if n in confirmed else math.nan for n in numbers]
    table["confirm_std"] = [confirmed[n].confirm_std if n in confirmed else math.nan for n in numbers]
    table["seed_scores"] = [scores.get(n, []) for n in numbers]
    # Conditional params (SGD's momentum, a schedule's decay) exist only on some trials.
    by_trial = {n: dict(zip(g["param_name"], g["value"])) for n, g in params.groupby("number")}
    table["params"] = [{k: _param_value(v) for k, v in sorted(by_trial.get(n, {}).items())} for n in numbers]
    table["confirmation"] = [_confirmation(confirmed.get(n)) for n in numbers]
    table["seed_stop_reason"] = [stop_reason.get(n) for n in numbers]
    trained = spec.get("model", {}).get("family") != "analytic"
    diagnoses = [diagnose_curves(_curves_of(curves, n), trained=trained) for n in numbers]
    table["verdict"] = [d.verdict for d in diagnoses]
    table["diagnosis"] = [str(d) for d in diagnoses]

    comparison = None
    if len(numbers) >= 2:
        best, second = numbers[0], numbers[1]
        both = best in confirmed and second in confirmed
        a = json.loads(confirmed[best].confirm_scores) if both else scores.get(best, [])
        b = json.loads(confirmed[second].confirm_scores) if both else scores.get(second, [])
        t, p, ok, hint = compare_scores(a, b)
        n_seeds = min(len([x for x in a if x is not None and math.isfinite(x)]),
                      len([x for x in b if x is not None and math.isfinite(x)]))
        key = "confirm_mean" if both else "value"
        diff = abs(float(table[key].iloc[1] - table[key].iloc[0]))
        added = table["n_added_seeds"].iloc[:2].fillna(0).sum() > 0
        on = ("fresh confirmation seeds" if both else
              "selection seeds and seeds added to the incumbent" if added else "selection seeds")
        comparison = Comparison(best, second, diff, t, p, ok, hint, p_improvement(a, b, direction), on, n_seeds)
    curve = expected_best(done["value"].tolist(), direction)
    return Report(study_name, direction, len(done), table, comparison, [float(x) for x in curve],
                  "confirmed mean, then objective value" if confirmed else "objective value",
                  _pruned_table(trials, pruned_at, spec, direction))


def _pruned_table(trials: pd.DataFrame, pruned_at: dict[int, int], spec: dict, direction: str) -> pd.DataFrame:
    """Pruned trials with their partial score: the objective over the scores their seeds
    had reached when stopped (what the pruner judged last), best first."""
    rows = trials[(trials["state"] == "PRUNED") & trials["mean"].notna()]
    objective = spec.get("objective", {})
    k = float(objective.get("k", 1.0)) if objective.get("mode") == "mean+k*std" else 0.0
    sign = 1.0 if direction == "minimize" else -1.0
    table = pd.DataFrame({
        "number": rows["number"].astype(int).tolist(),
        "pruned_at_epoch": [pruned_at.get(int(n)) for n in rows["number"]],
        "partial_score": (rows["mean"] + sign * k * rows["std"].fillna(0.0)).astype(float).tolist(),
        "mean": rows["mean"].astype(float).tolist(), "std": rows["std"].astype(float).tolist(),
        "n_seeds": rows["n_seeds"].tolist(),
    })
    return table.sort_values("partial_score", ascending=direction == "minimize", kind="stable").reset_index(drop=True)


def _confirmation(row) -> dict | None:
    if row is None:
        return None
    return {"mean": float(row.confirm_mean), "std": float(row.confirm_std),
            "seeds": json.loads(row.confirm_seeds), "scores": json.loads(row.confirm_scores)}


def _param_value(v):
    """A param as its own type: numbers as numbers, true/false as booleans."""
    if v in ("true", "false"):
        return v == "true"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


def _curves_of(curves: pd.DataFrame, number: int) -> list[dict[str, list]]:
    rows = curves[curves["number"] == number]
    out = []
    for _, g in rows.groupby("seed_index", sort=True):
        g = g.sort_values("epoch")
        out.append({k: [None if pd.isna(x) else float(x) for x in g[k]] for k in ("loss", "val_loss")})
    return out


def _round(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(f"{x:.6g}")


def _short(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(v) if f.is_integer() and "." not in str(v) else f"{f:.4g}"


# Columns of the default report, which fits a 120-column terminal; --wide shows all.
_NARROW_WIDTH = 120


def _num(x, digits: int = 5) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _narrow(top: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in top.itertuples(index=False):
        confirmed = ""
        if r.confirmation is not None:
            confirmed = f"{_num(r.confirm_mean)} ± {_num(r.confirm_std, 2)} ({len(r.confirmation['seeds'])})"
        diag = r.verdict + (": train longer" if "train longer" in r.diagnosis else "")
        m = re.match(r"(\d+) of (\d+) seeds", r.diagnosis.split(": ", 1)[-1])
        diag += f" ({m.group(1)}/{m.group(2)} seeds)" if m else ""
        rows.append({"rank": r.rank, "trial": r.number, "mean ± std": mean_std(r.mean, r.std, int(r.n_seeds)),
                     "95% CI (bootstrap)": f"[{_num(r.ci_low, 4)}, {_num(r.ci_high, 4)}]" if not math.isnan(r.ci_low) else "",
                     "seeds": _seeds(r), "confirmed (seeds)": confirmed, "diagnosis": diag})
    return pd.DataFrame(rows)


def _seeds(r) -> str:
    """Seed count, as selected + added while the incumbent when it gained some."""
    added = 0 if pd.isna(r.n_added_seeds) else int(r.n_added_seeds)
    return f"{int(r.n_seeds) - added}+{added}" if added else str(r.n_seeds)


def _wide(top: pd.DataFrame) -> pd.DataFrame:
    frame = top.drop(columns=["confirmation", "verdict"]).copy()
    frame["seed_scores"] = [json.dumps(x) for x in frame["seed_scores"]]
    frame["params"] = [", ".join(f"{k}={_short(v)}" for k, v in p.items()) for p in frame["params"]]
    return frame


def report_dict(report: Report) -> dict:
    """The report as plain JSON types: arrays for scores, objects for params and confirmation."""
    c = report.comparison
    trials = []
    for rec in report.top.to_dict(orient="records"):
        trials.append({k: (None if isinstance(v, float) and math.isnan(v) else
                           (v.item() if hasattr(v, "item") else v)) for k, v in rec.items()})
    return {
        "study_name": report.study_name, "direction": report.direction, "n_complete": report.n_complete,
        "ranked_by": report.ranked_by, "trials": trials,
        "comparison": None if c is None else {
            "best": c.best, "runner_up": c.runner_up, "difference": c.difference, "on": c.on,
            "welch_t": None if math.isnan(c.t) else c.t, "welch_p": None if math.isnan(c.p) else c.p,
            "distinguishable": c.distinguishable, "p_improvement": None if math.isnan(c.p_improvement) else c.p_improvement,
            "summary": f"{c.hint}; {c.words}"},
        "expected_best": report.expected_best,
        "pruned": [{k: (None if isinstance(v, float) and math.isnan(v) else (v.item() if hasattr(v, "item") else v))
                    for k, v in rec.items()} for rec in report.pruned.to_dict(orient="records")],
    }


# Fewer complete trials than this cannot say whether more would help: the last doubling
# of 3 trials is one trial against three.
MIN_TRIALS_FOR_ADVICE = 8


def _expected_best_line(report: Report) -> str:
    curve = report.expected_best
    n = len(curve)
    if n < 2:
        return ""
    marks = sorted({1, max(1, n // 4), max(1, n // 2), n})
    pts = ", ".join(f"n={k}: {curve[k - 1]:.4g}" for k in marks)
    if n < MIN_TRIALS_FOR_ADVICE:
        return (f"expected best of n trials (Dodge et al. 2019): {pts}; {plural(n, 'complete trial')} are too few "
                f"to tell whether more trials would help (it takes {MIN_TRIALS_FOR_ADVICE})")
    # Doubling the trials is worth it when it is expected to gain more than the seed noise
    # of the best trial (what a single trial's mean can be trusted to).
    gain = abs(curve[n // 2 - 1] - curve[-1])
    noise = float(report.top["std"].iloc[0]) if len(report.top) else 0.0
    verdict = (f"the last doubling of trials gained {gain:.3g}, more than the best trial's seed std {noise:.2g}: "
               "more trials would likely help" if gain > noise else
               f"the last doubling of trials gained {gain:.3g}, within the best trial's seed std {noise:.2g}: "
               "more trials would add little")
    return f"expected best of n trials (Dodge et al. 2019): {pts}; {verdict}"


def format_report(report: Report, fmt: str = "table", wide: bool = False) -> str:
    """The report as text in one of FORMATS. The default table fits 120 columns; `wide`
    shows every column. json is one object with real arrays and objects; csv is the wide
    table with the comparison on the first row."""
    c = report.comparison
    if fmt == "json":
        return json.dumps(report_dict(report), allow_nan=False, default=str)
    if fmt == "csv":
        frame = _wide(report.top)
        frame["distinguishable_from_next"] = None
        if c is not None and not frame.empty:
            frame.loc[0, "distinguishable_from_next"] = c.distinguishable
            frame["welch_p"] = [c.p] + [None] * (len(frame) - 1)
            frame["p_improvement"] = [c.p_improvement] + [None] * (len(frame) - 1)
        return format_frame(frame, fmt)
    head = (f"study {report.study_name}: {plural(report.n_complete, 'complete trial')}, {report.direction}; "
            f"top {len(report.top)} by {report.ranked_by}")
    lines = [f"## {head}" if fmt == "markdown" else head, ""]
    frame = _wide(report.top) if wide else _narrow(report.top)
    lines.append(format_frame(frame, "markdown" if fmt == "markdown" else "table"))
    lines.append("")
    if c is None:
        lines.append("fewer than two complete trials: nothing to compare yet")
    else:
        lines.append(f"best #{c.best} vs runner-up #{c.runner_up} on {c.on}: difference {c.difference:.4g}; {c.hint}")
        lines.append(c.words)
    line = _expected_best_line(report)
    if line:
        lines.append(line)
    lines += _pruned_lines(report, fmt)
    if not wide and fmt == "table":
        lines = [_fold(l, _NARROW_WIDTH) for block in lines for l in block.split("\n")]
    return "\n".join(lines)


def _pruned_lines(report: Report, fmt: str) -> list[str]:
    """The pruned trials apart from the ranking (their scores cover fewer epochs), and in
    words each whose partial score beats the best complete trial."""
    pruned = report.pruned
    if pruned.empty:
        return []
    shown = pruned.head(len(report.top) or 5)
    frame = pd.DataFrame({
        "trial": shown["number"],
        "pruned after epoch": ["" if e is None or pd.isna(e) else int(e) for e in shown["pruned_at_epoch"]],
        "partial score": [_num(x) for x in shown["partial_score"]],
        "mean ± std": [mean_std(m, s, int(n)) for m, s, n in zip(shown["mean"], shown["std"], shown["n_seeds"])],
        "seeds": shown["n_seeds"],
    })
    lines = ["", f"pruned trials ({len(pruned)}), not ranked, best first; partial score: the objective over each "
                 f"seed's best until it was stopped",
             format_frame(frame, "markdown" if fmt == "markdown" else "table")]
    if len(report.top):
        best, value = int(report.top["number"].iloc[0]), float(report.top["value"].iloc[0])
        minimize = report.direction == "minimize"
        for r in pruned.itertuples(index=False):
            if (r.partial_score < value) if minimize else (r.partial_score > value):
                known = r.pruned_at_epoch is not None and not pd.isna(r.pruned_at_epoch)
                epoch = f" by epoch {int(r.pruned_at_epoch)}" if known else ""
                lines.append(f"pruned trial #{r.number} reached {_num(r.partial_score)}{epoch}, better than the best "
                             f"complete trial #{best} ({_num(value)}): the pruner stopped a trial that was ahead; "
                             f"a later n_warmup_steps or a gentler pruner would have let it finish")
    return lines


def _fold(line: str, width: int) -> str:
    """A prose line wrapped to `width` (table rows are built to fit already), between its
    "; " clauses where it can, so that a phrase such as "raise seeds (about 12 would
    resolve ...)" is not split across lines; only a clause longer than a line is wrapped
    within."""
    if len(line) <= width:
        return line
    import textwrap

    indent = "  "
    out: list[str] = []
    current = ""
    for clause in re.split(r"(?<=;) ", line):
        room = width - (len(indent) if out else 0)
        joined = f"{current} {clause}" if current else clause
        if len(joined) <= room:
            current = joined
            continue
        if current:
            out.append(current)
        current = clause
        if len(current) > width - len(indent):
            *full, current = textwrap.wrap(current, width - len(indent), break_on_hyphens=False)
            out += full
    out.append(current)
    return "\n".join(out[:1] + [indent + l for l in out[1:]])
