"""Plots from Python, under the names the README documents: a study database in, matplotlib
figures or PNG files out. They live in `hpo.reports.plots`.
"""

from hpo.reports.plots import (PlotError, expected_best_figure, learning_curves_figure, plot_expected_best,
                               plot_learning_curves, plot_seed_scores, seed_scores_figure)

__all__ = ["PlotError", "expected_best_figure", "learning_curves_figure", "plot_expected_best", "plot_learning_curves",
           "plot_seed_scores", "seed_scores_figure"]
