from hpo.reports.diagnosis import GOOD_FIT, OVERFIT, UNDERFIT, UNKNOWN, diagnose_seed


def test_best_epoch_is_the_last_with_validation_still_falling_is_underfit_never_good_fit():
    # Seen in the field: best epoch 10 of max_epochs 10, the last step tiny, called good fit.
    val = [3.0, 1.0, 0.6, 0.5, 0.45, 0.43, 0.42, 0.415, 0.412, 0.411]
    verdict, reason = diagnose_seed([v * 0.9 for v in val], val)
    assert verdict == UNDERFIT and "train longer" in reason and "epoch (10)" in reason


def test_overfit_when_validation_rises_after_its_minimum_while_training_falls():
    assert diagnose_seed([3, 2, 1, 0.5, 0.2, 0.1], [3, 2.2, 1.5, 1.2, 1.4, 1.7])[0] == OVERFIT


def test_underfit_when_both_losses_stay_flat_and_high():
    verdict, reason = diagnose_seed([1.0, 0.99, 0.98, 0.98], [1.0, 1.0, 0.99, 0.995])
    assert verdict == UNDERFIT and "flat and high" in reason


def test_good_fit_when_validation_settled_before_the_last_epoch():
    verdict, reason = diagnose_seed([3, 1, 0.5, 0.45, 0.44], [3, 1.1, 0.6, 0.58, 0.59])
    assert verdict == GOOD_FIT and "epoch 4" in reason


def test_unknown_with_fewer_than_two_finite_epochs():
    assert diagnose_seed([1.0, None], [float("nan"), 1.0])[0] == UNKNOWN


def test_a_trial_s_reason_speaks_of_every_seed_that_shares_its_verdict():
    from hpo.reports.diagnosis import diagnose_curves

    # Seen: "validation loss settled at epoch 16" beside best epochs 16, 12, 13, 15, 6.
    def settled_at(best, epochs=20):
        val = [3.0 - 0.1 * e for e in range(best)] + [3.0 - 0.1 * (best - 1) + 0.001 * e for e in range(1, epochs - best + 1)]
        return {"loss": [v - 0.5 for v in val], "val_loss": val}

    d = diagnose_curves([settled_at(b) for b in (16, 12, 13, 15, 6)])
    assert d.verdict == GOOD_FIT
    assert d.reason == "5 of 5 seeds; validation loss settled at epochs 6-16, median 13"
    same = diagnose_curves([settled_at(9), settled_at(9)])
    assert same.reason == "2 of 2 seeds; validation loss settled at epoch 9"


def test_an_analytic_function_is_not_diagnosed_as_a_fit():
    from hpo.reports.diagnosis import NO_FIT, diagnose_curves, trial_note

    curves = [{"loss": [3.0, 1.0, 0.5, 0.5], "val_loss": [3.0, 1.0, 0.5, 0.55]}]
    assert diagnose_curves(curves).verdict == GOOD_FIT
    assert diagnose_curves(curves, trained=False).verdict == NO_FIT
    note = trial_note(0, {"mean": 0.5, "std": 0.0, "seed_scores": [0.5], "curves": curves, "training_path": "analytic"})
    assert "good fit" not in note and "no fit" in note and "over 1 seed" in note and "± 0" not in note
