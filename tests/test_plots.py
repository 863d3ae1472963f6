import pytest
from PIL import Image

from hpo.plots import DPI, FIGSIZE, PlotError, plot_learning_curves, plot_seed_scores
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
