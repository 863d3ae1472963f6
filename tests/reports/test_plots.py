import pytest
from PIL import Image

from hpo.reports.plots import DPI, FIGSIZE, PlotError, plot_learning_curves, plot_seed_scores
from tests.conftest import run_hpo
from tests.made import add_trial, curve_record, make_study

SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


@pytest.fixture
def study_url(tmp_path):
    """Six trials: units 16, 32 and 64 twice each; four seeds; curves of five epochs."""
    url = f"sqlite:///{tmp_path / 'plots.db'}"
    study = make_study(url)
    for i, units in enumerate([16, 32, 64, 16, 32, 64]):
        scores = [units / 16 + 0.1 * s + 0.01 * i for s in range(4)]
        curves = curve_record(scores, [[3.0, 2.0, 1.5, 1.2, s] for s in scores])
        add_trial(study, {"act": "relu", "units": units, "lr": 0.01 * (i + 1)}, scores, curves=curves)
    return url


def opened(path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_box_plot_of_the_top_trials_is_a_png_of_the_expected_size(study_url, tmp_path):
    path = plot_seed_scores(study_url, "hand", tmp_path / "top.png", top=3)
    image = opened(path)
    assert image.format == "PNG" and image.size == SIZE
    # Not a blank canvas: boxes, points and labels make many colours.
    assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 50


def test_box_plot_by_parameter_and_learning_curves_through_the_command(study_url, tmp_path):
    out = run_hpo("plot", "--study-name", "hand", "--storage", study_url, "--by", "units",
                  "-o", str(tmp_path / "units.png")).stdout
    assert out.strip() == f"wrote {tmp_path / 'units.png'}"
    assert opened(tmp_path / "units.png").size == SIZE
    path = plot_learning_curves(study_url, "hand", 2, tmp_path / "curves.png")
    assert opened(path).size == SIZE


def test_plots_say_what_is_missing(study_url, tmp_path):
    with pytest.raises(PlotError, match='no parameter "depth"; its parameters: act, lr, units'):
        plot_seed_scores(study_url, "hand", tmp_path / "x.png", by="depth")
    with pytest.raises(PlotError, match="trial 99 .* has no learning curves"):
        plot_learning_curves(study_url, "hand", 99, tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_expected_best_plot_through_the_command(study_url, tmp_path):
    out = run_hpo("plot", "--study-name", "hand", "--storage", study_url, "--expected-best",
                  "-o", str(tmp_path / "eb.png")).stdout
    assert out.strip() == f"wrote {tmp_path / 'eb.png'}"
    image = opened(tmp_path / "eb.png")
    assert image.size == SIZE and len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 20


def test_learning_curves_tick_whole_epochs_and_a_pruned_trial_says_so(tmp_path):
    from hpo.reports.plots import learning_curves_figure

    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = make_study(url)
    scores = [1.0, 1.1]
    add_trial(study, {"act": "relu", "units": 16, "lr": 0.01}, scores, curves=curve_record(scores))
    add_trial(study, {"act": "relu", "units": 20, "lr": 0.01}, scores, curves=curve_record(scores), pruned_at=3)
    # Seen: ticks at epochs 1.5 and 2.5 of a three-epoch curve.
    complete = learning_curves_figure(url, "hand", 0)
    for ax in complete.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert "pruned" not in complete._suptitle.get_text()
    # Seen: a pruned trial's plot did not say it was pruned.
    pruned = learning_curves_figure(url, "hand", 1)
    assert "pruned after epoch 3" in pruned._suptitle.get_text()
    assert "pruned after epoch 3" in [t.get_text() for t in pruned.legends[0].get_texts()]
    assert "2 seeds" in pruned._suptitle.get_text()


def test_a_box_plot_by_parameter_squashed_by_one_wide_box_goes_log(tmp_path):
    from hpo.reports.plots import seed_scores_figure

    url = f"sqlite:///{tmp_path / 'w.db'}"
    study = make_study(url)
    # Five tight groups near 0.05-0.1 and one that spans up to 5: under 100x end to end.
    for i, units in enumerate([16, 20, 24, 28, 32]):
        add_trial(study, {"act": "relu", "units": units, "lr": 0.01}, [0.05 + 0.01 * i, 0.055 + 0.01 * i, 0.06 + 0.01 * i])
    add_trial(study, {"act": "relu", "units": 64, "lr": 0.01}, [0.06, 1.0, 5.0])
    figure = seed_scores_figure(url, "hand", by="units")
    assert figure.axes[0].get_yscale() == "log" and "log scale" in figure.axes[0].get_ylabel()
    # A top-trials plot of the same study follows the same rule; a narrow spread stays linear.
    assert seed_scores_figure(url, "hand", top=6).axes[0].get_yscale() == "log"
    assert seed_scores_figure(url, "hand", top=5).axes[0].get_yscale() == "linear"
