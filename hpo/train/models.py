"""Models: a resolved params dict and an input shape in, a compiled `keras.Model` out.

The built-in families and the user's own `build(params, input_shape, n_outputs)` are the
same kind of thing (`model_factory`); nothing here knows about Optuna, so a model can be
rebuilt, replayed or replicated from the params a trial stored.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import keras

from hpo.errors import SpecError
from hpo.specs import CUSTOM, DEFAULT_PARAMS, StudySpec
from hpo.train import flat_random
from hpo.words import format_params

# A model builder: (params, input_shape, n_outputs) -> an uncompiled keras.Model.
Builder = Callable[[dict[str, Any], tuple[int, ...], int], keras.Model]

RECURRENT_LAYERS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "simple_rnn": keras.layers.SimpleRNN}


def model_factory(spec: StudySpec) -> Builder:
    """The spec's model builder: the user's `[model] build` function (its code checked
    against the hash the study recorded; a KerasTuner-style `build(hp)` answered from the
    params), or a built-in family's."""
    if spec.model.family == CUSTOM:
        from hpo.specs.tuner_hp import build_hp_model, is_hp_build, load_build

        user_build = load_build(spec)
        if not is_hp_build(user_build):
            return user_build
        return lambda params, input_shape, n_outputs: build_hp_model(user_build, params)

    def build(params: dict[str, Any], input_shape: tuple[int, ...], n_outputs: int) -> keras.Model:
        return build_model(params, input_shape, family=spec.model.family, output=spec.output, n_outputs=n_outputs,
                           stateful=spec.model.stateful)

    return build


def compiles_itself(spec: StudySpec) -> bool:
    """Whether the spec's models come compiled (a KerasTuner-style `build(hp)`, whose
    optimizer, loss and metrics are kept) rather than compiled by hpo from the params."""
    from hpo.specs.tuner_hp import hp_build

    return hp_build(spec) is not None


def check_first_params(spec: StudySpec) -> dict[str, Any]:
    """The space's first point (`space.first_params`); a `build(hp)`, which runs to
    declare its space, failing there stops the run like any failing build.

    Raises:
        SpecError: Naming the study file, the hook and the fix.
    """
    from hpo.specs.space import first_params

    try:
        return first_params(spec)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's code, reported as theirs
        raise _build_failed(spec, e, {}) from e


def check_model(spec: StudySpec, params: dict[str, Any], input_shape: tuple[int, ...], n_outputs: int,
                n_train: int) -> None:
    """Build and compile the spec's model once, so a build hook that fails, returns no
    model, or a head that disagrees with the data stops the run before any trial.

    Raises:
        SpecError: Naming the study file, the hook and the fix.
    """
    field = "model.build" if spec.model.family == CUSTOM else "model.family"
    what = spec.model.build or spec.model.family
    build = model_factory(spec)
    compiled_by_build = compiles_itself(spec)
    try:
        # Initial weights drawn as a trial's are (`flat_random`): the check compiles no
        # random draw of its own shapes, and the first trial finds its draws compiled.
        with flat_random.drawing():
            model = build(params, input_shape, n_outputs)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's code, reported as theirs
        raise _build_failed(spec, e, params) from e
    if not isinstance(model, keras.Model):
        raise SpecError(spec.source, field, f"{what} returned {type(model).__name__}, not a keras.Model; return "
                                            + ("the compiled model" if compiled_by_build else
                                               "keras.Model(inputs, outputs) (uncompiled)"))
    try:
        if not model.built:
            # A Sequential without an Input (KerasTuner's guide writes them so) is built
            # for the data on its first call, as `fit` would.
            with flat_random.drawing():
                model.build((None, *input_shape))
        out = model.compute_output_spec(keras.KerasTensor((2, *input_shape), dtype=_input_dtype(input_shape, model)))
    except Exception as e:  # noqa: BLE001
        raise SpecError(spec.source, field, f"{what} builds a model that cannot take inputs of shape {input_shape}: "
                                            f"{type(e).__name__}: {e}; make its Input shape {input_shape}") from e
    width = out.shape[-1] if len(out.shape) > 1 else 1
    if width != n_outputs:
        kind = "classes" if spec.output == "classification" else "targets"
        raise SpecError(spec.source, field, f"{what} returns {width} outputs per sample but the data has {n_outputs} "
                                            f"{kind}; end the model with a layer of n_outputs units")
    if compiled_by_build:
        _check_hp_model(spec, model, params)
        return
    if getattr(model, "compiled", False):
        raise SpecError(spec.source, field, f"{what} returned a compiled model, but hpo compiles the model of a "
                                            "build(params, input_shape, n_outputs) itself, with the space's optimizer "
                                            "and learning rate; return it uncompiled, or write a KerasTuner-style "
                                            "build(hp) to keep your own compile")
    try:
        compile_model(model, params, output=spec.output, steps_per_epoch=max(1, n_train // params["batch_size"]),
                      loss=spec.training.loss)
    except ValueError as e:
        raise SpecError(spec.source, "training.loss", f"{e}; name a Keras loss such as \"mse\" or "
                                                      "\"sparse_categorical_crossentropy\"") from e


def _build_failed(spec: StudySpec, error: Exception, params: dict[str, Any]) -> SpecError:
    from hpo.specs.tuner_hp import SUPPORTED, UnsupportedHyperParameter

    what = spec.model.build or spec.model.family
    field = "model.build" if spec.model.family == CUSTOM else "model.family"
    if isinstance(error, UnsupportedHyperParameter):
        if error.detail:
            return SpecError(spec.source, field, f"{what} calls hp.{error.call}{error.detail}")
        return SpecError(spec.source, field, f"{what} calls hp.{error.call}, which hpo's hp does not implement "
                                             f"(it has {', '.join(SUPPORTED)}); rewrite that call with one of them")
    # The space's own parameters (or a build(hp)'s calls), not every default a build is handed.
    declared = {k: v for k, v in sorted(params.items()) if k in spec.space or k not in DEFAULT_PARAMS}
    if declared:
        point = f" ({format_params(declared)})"
    else:
        point = "" if params else " (each hp call's default)"
    return SpecError(spec.source, field, f"{what} raised {type(error).__name__}: {error} when built with the first "
                                         f"point of the space{point}; fix it")


def _check_hp_model(spec: StudySpec, model: keras.Model, params: dict[str, Any]) -> None:
    # A build(hp) brings its own compile: check what hpo needs of it, and that [space],
    # [training] loss and the sampler leave its space to its hp calls.
    from hpo.specs.tuner_hp import FIT_PARAMS, HyperParameters, hp_build

    what = spec.model.build
    if not getattr(model, "compiled", False):
        raise SpecError(spec.source, "model.build", f"{what} returned an uncompiled model; a build(hp) compiles its "
                                                    "own, as KerasTuner requires: call model.compile(optimizer=..., "
                                                    "loss=..., metrics=[...]) before returning it")
    wanted = spec.metric.removeprefix("val_")
    names = sorted(_metric_name(m) for m in (model.get_compile_config() or {}).get("metrics") or [])
    if wanted != "loss" and wanted not in names:
        raise SpecError(spec.source, "metric", f"the study's metric is {spec.metric} but {what} compiles no "
                                               f"\"{wanted}\" metric (it has {', '.join(names) or 'none'}); add "
                                               f"metrics=[\"{wanted}\"] to its compile, or set metric = \"val_loss\"")
    if spec.training.loss is not None:
        raise SpecError(spec.source, "training.loss", f"{what} compiles its own loss; remove [training] loss")
    for name in spec.space:
        if name not in FIT_PARAMS:
            raise SpecError(spec.source, f"space.{name}", f"a build(hp) declares its space with its hp calls; "
                                                          f"[space] may only hold {', '.join(FIT_PARAMS)}: declare "
                                                          f"{name} with an hp call in {what}, or remove it")
    if spec.sampler.kind == "grid":
        raise SpecError(spec.source, "sampler.kind", f"the grid sampler needs the whole space before the first trial, "
                                                     f"and {what} declares it as it runs; use \"tpe\" or \"random\"")
    hp = HyperParameters(values=params)
    hp_build(spec)(hp)
    clash = sorted(set(hp.declared) & set(spec.space))
    if clash:
        raise SpecError(spec.source, f"space.{clash[0]}", f"{what} declares {clash[0]} with an hp call and [space] "
                                                          "names it too; keep one of them")


def _metric_name(metric: Any) -> str:
    # A compile config lists a metric by its string, or serialised with its name.
    if isinstance(metric, dict):
        return str((metric.get("config") or {}).get("name"))
    return metric if isinstance(metric, str) else str(getattr(metric, "name", metric))


def _input_dtype(input_shape: tuple[int, ...], model: keras.Model) -> str:
    return model.inputs[0].dtype if getattr(model, "inputs", None) else "float32"


def build_model(params: dict[str, Any], input_shape: tuple[int, ...], *, family: str, output: str,
                n_outputs: int, stateful: bool = False) -> keras.Model:
    """Build (uncompiled) the network a trial's params describe.

    Args:
        params: Resolved params (`space.resolve_params`), every vocabulary name present.
        input_shape: One sample's shape, `(steps, features)` for recurrent families.
        family: `lstm`, `gru`, `simple_rnn` (stacked when `layers > 1`) or `mlp`.
        output: `regression` (linear head of `n_outputs`) or `classification` (softmax).
        n_outputs: Width of the head.
        stateful: A stateful LSTM keeps its state across batches; the batch size is fixed.
    """
    tokens = len(input_shape) == 1 and family != "mlp" and params.get("vocab_size")
    if stateful:
        inputs = keras.Input(batch_shape=(params["batch_size"], *input_shape))
    else:
        inputs = keras.Input(shape=input_shape, dtype="int32" if tokens else None)
    regularizer = _regularizer(params)
    x = inputs
    if tokens:
        # Token ids (a csv_text dataset): an embedding front for the recurrent layers.
        x = keras.layers.Embedding(params["vocab_size"], params["embedding_dim"])(x)
    for i in range(params["layers"]):
        if family == "mlp":
            if i == 0 and len(input_shape) > 1:
                x = keras.layers.Flatten()(x)
            x = keras.layers.Dense(params["units"], activation=params["activation"],
                                   kernel_initializer=params["initializer"], kernel_regularizer=regularizer)(x)
            if params["dropout"] > 0:
                x = keras.layers.Dropout(params["dropout"])(x)
        else:
            layer = RECURRENT_LAYERS[family]
            kwargs = dict(activation=params["activation"], kernel_initializer=params["initializer"],
                          kernel_regularizer=regularizer, dropout=params["dropout"],
                          recurrent_dropout=params["recurrent_dropout"],
                          return_sequences=i < params["layers"] - 1)
            if stateful:
                kwargs["stateful"] = True
            x = layer(params["units"], **kwargs)(x)
    if output == "classification":
        outputs = keras.layers.Dense(n_outputs, activation="softmax")(x)
    else:
        outputs = keras.layers.Dense(n_outputs)(x)
    return keras.Model(inputs, outputs)


def compile_model(model: keras.Model, params: dict[str, Any], *, output: str, steps_per_epoch: int,
                  loss: str | None = None) -> None:
    """Compile with the params' optimizer, schedule and clipping, and the task's loss (or
    `loss`, a Keras loss name) and metrics.

    Raises:
        ValueError: `loss` is not a Keras loss.
    """
    if loss is not None:
        keras.losses.get(loss)
    if output == "classification":
        model.compile(optimizer=make_optimizer(params, steps_per_epoch),
                      loss=loss or "sparse_categorical_crossentropy", metrics=["accuracy"])
    else:
        model.compile(optimizer=make_optimizer(params, steps_per_epoch), loss=loss or "mse", metrics=["mae", "mse"])


def make_optimizer(params: dict[str, Any], steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer the params name, with its learning-rate schedule and clipping."""
    lr: Any = params["learning_rate"]
    decay = params["lr_decay"]
    if params["lr_schedule"] == "time" and decay > 0:
        lr = keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=steps_per_epoch, decay_rate=decay)
    elif params["lr_schedule"] == "exponential" and decay > 0:
        lr = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=steps_per_epoch, decay_rate=math.exp(-decay))
    clip = {"clipnorm": params["clipnorm"]} if params["clipnorm"] > 0 else {}
    if params["optimizer"] == "sgd":
        return keras.optimizers.SGD(lr, momentum=params["momentum"], nesterov=params["nesterov"], **clip)
    if params["optimizer"] == "rmsprop":
        return keras.optimizers.RMSprop(lr, **clip)
    return keras.optimizers.Adam(lr, **clip)


def _regularizer(params: dict[str, Any]) -> keras.regularizers.Regularizer | None:
    if params["l1"] > 0 or params["l2"] > 0:
        return keras.regularizers.L1L2(l1=params["l1"], l2=params["l2"])
    return None
