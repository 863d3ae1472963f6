"""Worker benchmarks: a storage URL or a study in; seconds per trial against plain Optuna,
resident memory over a long run, trials per minute with N workers out.

Figures for the documentation, run by `hpo bench-workers ...`; nothing here is timed in tests.
"""

from __future__ import annotations

import collections
import contextlib
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import optuna

from hpo.backend import rss_mb
from hpo.errors import HpoError, TrialFailed
from hpo.specs import load_spec
from hpo.store.storage import count_trials, get_storage
from hpo.store.urls import STORAGE_ENV, mask_url, refuse_proxy
from hpo.study.local import package_env, start_storage_proxy
from hpo.study.objective import Objective
from hpo.study.study import create_study, make_pruner, make_sampler, quiet_optuna
from hpo.study.workers import run_trials


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
    refuse_proxy(url, "plain Optuna's side of this comparison and its database URL")
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
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=package_env({STORAGE_ENV: url}))
        while proc.poll() is None:
            done = count_trials(storage, hpo_study._study_id).spent
            while pending and done >= pending[0]:
                seen.append((pending.pop(0), rss_mb(proc.pid)))
            time.sleep(0.1)
        out.seek(0)
        lines = out.read().splitlines()
    if proc.returncode != 0:
        last = next((line for line in reversed(lines) if line.strip()), "no output")
        raise HpoError(f"the measured worker exited with status {proc.returncode}: {last.strip()}")
    restarts = sum("restarting" in line for line in lines)
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
    subprocess.run(cmd, check=True, capture_output=True, env=package_env({}))
    return trials / ((time.perf_counter() - start) / 60)


@dataclass
class ScaleResult:
    """One row of the scale drill: N worker processes on one database."""

    url: str
    workers: int
    budget: int
    spent: int
    running: int
    trials_per_second: float
    peak_connections: int | None
    lock_wait_seconds: float
    errors: int
    worker_rss_mb: float
    heavy_imports: list[str]

    @property
    def exact(self) -> bool:
        return self.spent == self.budget and self.running == 0


def measure_scale(url: str, workers: int, trials: int, study: str = "beale", through_proxy: bool = False) -> ScaleResult:
    """Start `workers` processes that each run hpo's worker loop (`run_trials`, as `hpo
    worker` does) on one new study of `trials` analytic trials; once every one has
    imported and connected, let them go together.

    Trials per second run from the first trial's start to the last one's end (as the
    database records them); peak connections is the most client connections to the
    study's database PostgreSQL's `pg_stat_activity` showed at once (None on SQLite); lock wait sums the seconds the
    workers spent waiting for the study's admission lock; errors counts workers that
    exited non-zero. With `through_proxy`, the workers reach the database through an `hpo
    storage-proxy` started for the drill, which holds its connections for them.
    """
    refuse_proxy(url, "the scale drill's connection count and the database behind it (--proxy puts a proxy in front)")
    spec = load_spec(study).with_overrides(trials=trials, name=f"bench_scale_{workers}_{uuid.uuid4().hex[:8]}")
    storage = get_storage(url)
    hpo_study = create_study(spec, storage)
    proxy = None
    worker_url = url
    if through_proxy:
        proxy, worker_url = start_storage_proxy(url)
    try:
        return _drill(url, worker_url, storage, hpo_study, workers, trials)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()


def _drill(url: str, worker_url: str, storage, hpo_study, workers: int, trials: int) -> ScaleResult:
    import json
    import threading

    env = package_env({STORAGE_ENV: worker_url})
    procs = [subprocess.Popen([sys.executable, "-m", "hpo.bench.workers", hpo_study.study_name], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(workers)]
    # "ready": imported, storage open, study loaded; a worker that could not get there
    # (a server refusing more clients) says why and has exited.
    early = [p.stdout.readline() for p in procs]
    peak = [0]
    done = threading.Event()
    sampler = threading.Thread(target=_sample_connections, args=(storage, peak, done), daemon=True)
    if storage.engine.dialect.name == "postgresql":
        sampler.start()
    for p, first in zip(procs, early):
        with contextlib.suppress(BrokenPipeError):
            if first.strip() == "ready":
                p.stdin.write("go\n")
            p.stdin.close()
    lock_wait, errors, peak_rss, heavy = 0.0, 0, 0.0, set()
    said: collections.Counter[str] = collections.Counter()
    for p, first in zip(procs, early):
        out = ("" if first.strip() == "ready" else first) + p.stdout.read()
        p.wait()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if p.returncode or not lines:
            errors += 1
            said[f"worker exit {p.returncode}: {(out.strip().splitlines() or [''])[-1]}"] += 1
        elif "waiting for" in out:
            said[f"worker: {out.strip().splitlines()[0]}"] += 1
        else:
            report = json.loads(lines[-1])
            lock_wait += report["lock_wait_seconds"]
            peak_rss = max(peak_rss, report["rss_mb"])
            heavy.update(report["heavy_imports"])
    for line, n in said.items():
        print(f"{n} x {line}", file=sys.stderr)
    done.set()
    if sampler.is_alive():
        sampler.join()
    counts = count_trials(storage, hpo_study._study_id)
    frozen = [t for t in hpo_study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    seconds = ((max(t.datetime_complete for t in frozen) - min(t.datetime_start for t in frozen)).total_seconds()
               if frozen else 0.0)
    return ScaleResult(mask_url(url), workers, trials, counts.spent, counts.running,
                       len(frozen) / seconds if seconds else 0.0,
                       peak[0] if sampler.ident is not None else None, lock_wait, errors, peak_rss, sorted(heavy))


def _sample_connections(storage, peak: list[int], done) -> None:
    import sqlalchemy

    query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                            "AND datname = current_database() "
                            "AND pid <> pg_backend_pid()")
    with storage.engine.connect() as conn:
        while not done.wait(0.05):
            peak[0] = max(peak[0], conn.execute(query).scalar())
            conn.rollback()


def _scale_worker(study_name: str) -> None:
    """One process of `measure_scale`: hpo's worker loop on the study, released by "go"
    on stdin; prints its lock wait as JSON."""
    import json

    from hpo.store import storage as hpo_storage
    from hpo.study.study import load_study

    try:
        study, spec = load_study(get_storage(), study_name)
    except HpoError as e:
        print(f"error: {e}", flush=True)
        sys.exit(e.exit_code)
    print("ready", flush=True)
    sys.stdin.readline()
    summary = run_trials(study, spec, budget=spec.trials, max_consecutive_failures=spec.trials,
                         echo=lambda line: None)
    # 128 of these must fit in memory: the analytic path loads no training framework.
    heavy = [m for m in ("keras", "tensorflow", "jax") if m in sys.modules]
    print(json.dumps({"lock_wait_seconds": hpo_storage.lock_wait_seconds(), "complete": summary.complete,
                      "stopped": summary.stopped_reason, "rss_mb": rss_mb(), "heavy_imports": heavy}), flush=True)
    sys.exit(summary.exit_code)


if __name__ == "__main__":
    _scale_worker(sys.argv[1])
