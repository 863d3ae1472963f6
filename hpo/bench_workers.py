"""Worker benchmarks: a storage URL or a study in; seconds per trial against plain Optuna,
resident memory over a long run, trials per minute with N workers out.

Figures for the documentation, run by `hpo bench-workers ...`; nothing here is timed in tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import optuna

from hpo.errors import TrialFailed
from hpo.objective import Objective
from hpo.spec import load_spec
from hpo.storage import STORAGE_ENV, count_trials, get_storage, mask_url
from hpo.study import create_study, make_pruner, make_sampler
from hpo.study import quiet_optuna
from hpo.workers import _package_root, rss_mb, run_trials


@dataclass
class StorageOverhead:
    url: str
    trials: int
    hpo_seconds: float
    plain_seconds: float

    @property
    def ratio(self) -> float:
        return self.hpo_seconds / self.plain_seconds

    @property
    def extra_ms_per_trial(self) -> float:
        return 1000 * (self.hpo_seconds - self.plain_seconds) / self.trials


def measure_storage_overhead(url: str, trials: int = 100, study: str = "beale", rounds: int = 5) -> StorageOverhead:
    """Run `trials` trials of the study with hpo's worker loop (admission lock, counts,
    heartbeats, progress line) and with a plain `study.optimize` on the same database,
    same objective, sampler and pruner, each in a new study. The two grow in turns, a
    `trials / rounds` chunk at a time, so a busy machine slows both alike."""
    quiet_optuna()
    tag = uuid.uuid4().hex[:8]
    spec = load_spec(study).with_overrides(trials=trials, name=f"bench_plain_{tag}")
    plain = optuna.create_study(study_name=spec.name, storage=url, sampler=make_sampler(spec),
                                pruner=make_pruner(spec), directions=spec.directions)
    hpo_spec = spec.with_overrides(name=f"bench_hpo_{tag}")
    hpo_study = create_study(hpo_spec, get_storage(url))
    plain_seconds = hpo_seconds = 0.0
    done = 0
    for r in range(rounds):
        chunk = trials * (r + 1) // rounds - done
        start = time.perf_counter()
        plain.optimize(Objective(spec), n_trials=chunk, catch=(TrialFailed,), gc_after_trial=False)
        plain_seconds += time.perf_counter() - start
        done += chunk
        start = time.perf_counter()
        run_trials(hpo_study, hpo_spec, budget=done, echo=lambda line: None)
        hpo_seconds += time.perf_counter() - start
    return StorageOverhead(mask_url(url), trials, hpo_seconds, plain_seconds)


def measure_memory(url: str, study: str, trials: int, checkpoints: tuple[int, ...], *, seeds: int | None = None,
                   max_epochs: int | None = None, max_memory_growth: float | None = None) -> tuple[list[tuple[int, float]], int]:
    """Run one real `hpo worker` for `trials` trials of the study; its resident memory (read
    from outside, by process id, which a restarting worker keeps) when the study reaches
    each checkpoint, and how often it restarted itself."""
    spec = load_spec(study).with_overrides(trials=trials, seeds=seeds, max_epochs=max_epochs,
                                           name=f"bench_memory_{uuid.uuid4().hex[:8]}")
    storage = get_storage(url)
    hpo_study = create_study(spec, storage)
    cmd = [sys.executable, "-m", "hpo", "worker", "--study-name", spec.name, "--worker-index", "0",
           "--max-failures", str(trials)]
    if max_memory_growth is not None:
        cmd += ["--max-memory-growth", str(max_memory_growth)]
    seen: list[tuple[int, float]] = []
    pending = sorted(checkpoints)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, cwd=_package_root(),
                                env={**os.environ, STORAGE_ENV: url})
        while proc.poll() is None:
            done = count_trials(storage, hpo_study._study_id).spent
            while pending and done >= pending[0]:
                seen.append((pending.pop(0), rss_mb(proc.pid)))
            time.sleep(0.5)
        out.seek(0)
        restarts = sum("restarting" in line for line in out)
    return seen, restarts


def measure_throughput(url: str, study: str, trials: int, workers: int, *, seeds: int | None = None,
                       max_epochs: int | None = None) -> float:
    """Trials per minute of `hpo run STUDY --workers N` (the real command, in a subprocess)."""
    name = f"bench_throughput_{workers}_{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "hpo", "run", study, "--storage", url, "--study-name", name,
           "--trials", str(trials), "--workers", str(workers)]
    if seeds is not None:
        cmd += ["--seeds", str(seeds)]
    if max_epochs is not None:
        cmd += ["--max-epochs", str(max_epochs)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=_package_root())
    return trials / ((time.perf_counter() - start) / 60)
