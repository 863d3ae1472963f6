import numpy as np
import pytest

from hpo.specs import DEFAULT_PARAMS
from hpo.train.models import build_model, compile_model


def params(**overrides):
    return {**DEFAULT_PARAMS, "window": 5, **overrides}


@pytest.mark.parametrize("family", ["lstm", "gru", "simple_rnn", "mlp"])
@pytest.mark.parametrize("output, n_outputs", [("regression", 1), ("classification", 4)])
def test_every_family_builds_the_right_shapes(family, output, n_outputs):
    p = params(units=6, layers=2, dropout=0.1, l2=1e-4, optimizer="sgd", momentum=0.9, nesterov=True,
               lr_schedule="time", lr_decay=0.1, clipnorm=1.0)
    if family != "mlp":
        p["recurrent_dropout"] = 0.1
    model = build_model(p, (5, 3), family=family, output=output, n_outputs=n_outputs)
    compile_model(model, p, output=output, steps_per_epoch=4)
    x = np.zeros((7, 5, 3), dtype=np.float32)
    out = model.predict(x, verbose=0)
    assert out.shape == (7, n_outputs)
    if output == "classification":
        assert np.allclose(out.sum(axis=1), 1, atol=1e-5)
    kinds = [type(layer).__name__ for layer in model.layers]
    expected = {"lstm": "LSTM", "gru": "GRU", "simple_rnn": "SimpleRNN", "mlp": "Dense"}[family]
    assert kinds.count(expected) == (2 if family != "mlp" else 3)  # two hidden layers (+ the head for mlp)


def test_stateful_lstm_fixes_the_batch_and_resets():
    p = params(units=4, batch_size=8)
    model = build_model(p, (5, 1), family="lstm", output="regression", n_outputs=1, stateful=True)
    lstm = [layer for layer in model.layers if type(layer).__name__ == "LSTM"][0]
    assert lstm.stateful and model.inputs[0].shape[0] == 8
    model(np.ones((8, 5, 1), dtype=np.float32))
    assert np.abs(np.asarray(lstm.states[0])).sum() > 0
    lstm.reset_state()
    assert np.abs(np.asarray(lstm.states[0])).sum() == 0


@pytest.mark.parametrize("schedule", ["constant", "time", "exponential"])
def test_learning_rate_schedules(schedule):
    from hpo.train.models import make_optimizer

    opt = make_optimizer(params(learning_rate=0.1, lr_schedule=schedule, lr_decay=1.0), steps_per_epoch=10)
    lr = opt.learning_rate if schedule == "constant" else opt._learning_rate(20)
    expected = {"constant": 0.1, "time": 0.1 / 3, "exponential": 0.1 * np.exp(-2)}[schedule]
    assert float(lr) == pytest.approx(expected, rel=1e-5)
