from hpo.diagnosis import GOOD_FIT, OVERFIT, UNDERFIT, UNKNOWN, diagnose_seed


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
