"""Learning-curve diagnosis: a trial's per-seed curves in, *underfit*, *overfit* or
*good fit* out (with the reason; *no fit* for the analytic family, which trains nothing),
and the trial's markdown note for optuna-dashboard.

Pure Python on plain lists, so the objective (while recording a trial) and the reports
(reading the database) share one rule.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from hpo.words import mean_std, plural

UNDERFIT = "underfit"
OVERFIT = "overfit"
GOOD_FIT = "good fit"
UNKNOWN = "unknown"
NO_FIT = "no fit"
# A change counts when it exceeds this share of what the curve learned from its first
# epoch to its best: small enough to see a real turn, large enough to ignore seed noise.
CHANGE_SHARE = 0.05
# "Flat and high": the final loss is still above this share of the first epoch's loss.
FLAT_SHARE = 0.9


@dataclass(frozen=True)
class Diagnosis:
    """The verdict over all seeds and why; `per_seed` holds each seed's verdict."""

    verdict: str
    reason: str
    per_seed: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.verdict}: {self.reason}" if self.reason else self.verdict


def diagnose_seed(loss: Sequence[float | None], val_loss: Sequence[float | None]) -> tuple[str, str]:
    """One seed's verdict and reason from its training and validation loss per epoch."""
    verdict, reason, epoch = _diagnose(loss, val_loss)
    return verdict, reason.format(at=f"epoch {epoch}", last=epoch)


def _diagnose(loss: Sequence[float | None], val_loss: Sequence[float | None]) -> tuple[str, str, int | None]:
    # The reason is a template: {at} / {last} become this seed's epoch, or the range of
    # epochs over the seeds that share the verdict.
    pairs = [(t, v) for t, v in zip(loss, val_loss) if _finite(t) and _finite(v)]
    if len(pairs) < 2:
        return UNKNOWN, "fewer than two epochs with finite losses", None
    train = [t for t, _ in pairs]
    val = [v for _, v in pairs]
    last = len(val) - 1
    best = min(range(len(val)), key=val.__getitem__)
    learned = max(val[0] - val[best], train[0] - min(train), 0.0)
    tol = CHANGE_SHARE * learned if learned > 0 else 1e-12
    if best < last and val[last] - val[best] > tol and train[best] - train[last] > tol:
        return OVERFIT, "validation loss rose after its minimum at {at} while training loss kept falling", best + 1
    # Best epoch == last epoch with validation still falling: whatever the size of the last
    # step, training stopped while it still helped (seen: best epoch 10 of 10 called good fit).
    if best == last and val[last] < val[last - 1]:
        return UNDERFIT, "validation loss still falling at the last epoch ({last}): train longer", last + 1
    if train[0] > 0 and val[0] > 0 and train[last] > FLAT_SHARE * train[0] and val[last] > FLAT_SHARE * val[0]:
        return UNDERFIT, "training and validation loss flat and high: the model barely learns", None
    return GOOD_FIT, "validation loss settled at {at}", best + 1


def diagnose_curves(curves: Sequence[dict[str, Sequence[float | None]]] | None, trained: bool = True) -> Diagnosis:
    """The trial's verdict: the verdict most seeds share (ties go to the more serious one:
    overfit, then underfit), with the reason of the first seed that has it, its epoch
    given over all the seeds that share it ("epochs 6-16, median 13"). `trained=False`
    (the analytic family, whose curves are a formula) is *no fit*: there is no fit to judge."""
    if not trained:
        return Diagnosis(NO_FIT, "an analytic function trains nothing, so there is no fit to diagnose")
    if not curves:
        return Diagnosis(UNKNOWN, "no learning curves stored")
    results = [_diagnose(c.get("loss") or [], c.get("val_loss") or []) for c in curves]
    verdicts = [v for v, _, _ in results]
    counts = Counter(verdicts)
    order = (OVERFIT, UNDERFIT, GOOD_FIT, UNKNOWN)
    verdict = max(order, key=lambda v: (counts[v], -order.index(v)))
    reason = next(r for v, r, _ in results if v == verdict)
    epochs = sorted(e for v, r, e in results if v == verdict and r == reason and e is not None)
    if epochs and epochs[0] != epochs[-1]:
        span = f"{epochs[0]}-{epochs[-1]}, median {statistics.median(epochs):g}"
        reason = reason.format(at=f"epochs {span}", last=span)
    elif epochs:
        reason = reason.format(at=f"epoch {epochs[0]}", last=epochs[0])
    if len(results) > 1:
        reason = f"{counts[verdict]} of {len(results)} seeds; {reason}"
    return Diagnosis(verdict, reason, tuple(verdicts))


def trial_note(number: int, attrs: dict[str, Any], metric: str = "score") -> str:
    """Markdown for the trial's optuna-dashboard note: mean ± std, one row per seed (those
    added while it was the incumbent marked), diagnosis."""
    scores = attrs.get("seed_scores") or []
    seeds = attrs.get("seeds") or list(range(len(scores)))
    best = attrs.get("best_epochs") or [None] * len(scores)
    run = attrs.get("epochs_run") or [None] * len(scores)
    added = attrs.get("incumbent_scores") or []
    n = len(scores) + len(added)
    lines = [f"## Trial {number}", ""]
    if added and "all_seeds_mean" in attrs:
        lines += [f"**{metric}: {mean_std(attrs['all_seeds_mean'], attrs.get('all_seeds_std'), n)}** over "
                  f"{plural(n, 'seed')}: {len(scores)} it was selected on "
                  f"({mean_std(attrs.get('mean'), attrs.get('std'), len(scores))}), "
                  f"{len(added)} added while it was the incumbent", ""]
    elif "mean" in attrs:
        lines += [f"**{metric}: {mean_std(attrs['mean'], attrs.get('std'), len(scores))}** over "
                  f"{plural(len(scores), 'seed')}", ""]
    lines += ["| seed | score | best epoch | epochs run |", "|---:|---:|---:|---:|"]
    rows = list(zip(seeds, scores, best, run))
    rows += [(f"{s} (added)", v, b, r) for s, v, b, r in zip(
        attrs.get("incumbent_seeds") or [], added, attrs.get("incumbent_best_epochs") or [None] * len(added),
        attrs.get("incumbent_epochs_run") or [None] * len(added))]
    lines += [f"| {s} | {_fmt(v)} | {b if b is not None else ''} | {r if r is not None else ''} |"
              for s, v, b, r in rows]
    curves = (attrs.get("curves") or []) + (attrs.get("incumbent_curves") or [])
    lines += ["", f"**Diagnosis:** {diagnose_curves(curves, trained=attrs.get('training_path') != 'analytic')}"]
    if attrs.get("seed_stop_reason"):
        lines += ["", f"Adaptive seeds stopped at {len(scores)}: {attrs['seed_stop_reason']}."]
    if attrs.get("incumbent_fail_reason"):
        lines += ["", f"Adding seeds as the incumbent failed: {attrs['incumbent_fail_reason']}."]
    if attrs.get("pruned_at_epoch") is not None:
        lines += ["", f"Pruned after epoch {attrs['pruned_at_epoch']}."]
    if attrs.get("confirm_mean") is not None:
        confirm_seeds = attrs.get("confirm_seeds") or []
        lines += ["", f"**Confirmed on {len(confirm_seeds)} fresh seeds:** {_fmt(attrs['confirm_mean'])} ± "
                      f"{_fmt(attrs.get('confirm_std'))} (seeds {', '.join(map(str, confirm_seeds))}; per seed: "
                      f"{', '.join(_fmt(v) for v in attrs.get('confirm_scores') or [])})"]
    return "\n".join(lines) + "\n"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x: Any) -> str:
    return f"{x:.5g}" if isinstance(x, (int, float)) else str(x)
