"""The [model] table: a built-in family or the user's `build` in, a `ModelSpec` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpo.errors import SpecError
from hpo.specs.table import Table, hook_sha256


FAMILIES = ("lstm", "gru", "simple_rnn", "mlp", "analytic")
# The family of a study whose [model] names the user's own `build` function.
CUSTOM = "custom"
RECURRENT_FAMILIES = ("lstm", "gru", "simple_rnn")
OUTPUTS = ("regression", "classification")

ANALYTIC_FUNCTIONS = ("beale", "rosenbrock", "sphere")


@dataclass(frozen=True)
class ModelSpec:
    family: str = "lstm"
    output: str | None = None
    stateful: bool = False
    function: str = "beale"
    noise: float = 0.0
    # Analytic family only: wall-clock seconds each epoch sleeps, standing in for training
    # time when testing or demonstrating workers (crashes, restarts). None: no sleep.
    epoch_seconds: float | None = None
    # The user's `build(params, input_shape, n_outputs)`, and the sha256 of its code.
    build: str | None = None
    build_sha256: str | None = None


def parse_model(t: "Table", base_dir: Path | None) -> ModelSpec:
    build = t.str("build", default=None)
    if build is not None:
        return _parse_build(t, build, base_dir)
    family = t.str("family", required=True)
    t.choice("family", family, FAMILIES)
    output = t.str("output", default=None)
    if output is not None:
        t.choice("output", output, OUTPUTS)
    spec = ModelSpec(
        family=family,
        output=output,
        stateful=t.bool("stateful", default=False),
        function=t.str("function", default="beale"),
        noise=t.float("noise", default=0.0, low=0.0, high=1e6),
        epoch_seconds=t.float("epoch_seconds", default=None, low=0.0, high=3600.0) if "epoch_seconds" in t.raw else None,
    )
    if family == "analytic":
        t.choice("function", spec.function, ANALYTIC_FUNCTIONS)
    elif spec.epoch_seconds is not None:
        raise SpecError(t.source, f"{t.prefix}epoch_seconds", 'only the analytic family sleeps per epoch; remove epoch_seconds')
    if spec.stateful and family != "lstm":
        raise SpecError(t.source, f"{t.prefix}stateful", 'stateful models are LSTMs; set family = "lstm" or stateful = false')
    t.finish()
    return spec


def _parse_build(t: "Table", build: str, base_dir: Path | None) -> ModelSpec:
    family = t.str("family", default=CUSTOM)
    if family != CUSTOM:
        raise SpecError(t.source, f"{t.prefix}family", f'[model] names both family = "{family}" and build = "{build}"; '
                                                       "keep one of them")
    output = t.str("output", default=None)
    if output is not None:
        t.choice("output", output, OUTPUTS)
    sha = hook_sha256(t, "build", build, base_dir)
    t.finish()
    return ModelSpec(family=CUSTOM, output=output, build=build, build_sha256=sha)
