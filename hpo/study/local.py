"""Local workers: a created study, a budget and N in; N `hpo worker` processes started afresh (no fork
of a process whose JAX or TensorFlow threads run), their training threads sharing the cores, their
lines relayed with a prefix, out (`hpo run --workers N`).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import optuna

from hpo.backend import available_cores, user_cache_dir
from hpo.specs import StudySpec
from hpo.store.urls import STORAGE_ENV, mask_url
from hpo.study.signals import record_signals, stop_requested, stop_signal
from hpo.study.workers import RunSummary, best_trial
from hpo.words import plural


# How long `run_workers` waits for a stopped child before it kills it.
STOP_SECONDS = 20.0


def measured_workers_path() -> Path:
    """Where `hpo bench-workers throughput` keeps, per core count, the worker count that
    ran fastest: `workers.json` in `user_cache_dir()`."""
    return user_cache_dir() / "workers.json"


def record_throughput(study: str, rates: dict[int, float], cores: int | None = None) -> int:
    """Keep the fastest of `rates` (trials per minute by worker count, measured on `study`)
    as this machine's choice for `--workers auto`; returns that count. Written whole to a
    new file then renamed, so a reader never sees half of it."""
    cores = cores or available_cores()
    best = max(rates, key=lambda n: (rates[n], -n))
    path = measured_workers_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    records = _measured_workers(path)
    records[str(cores)] = {"workers": best, "study": study, "rates": {str(n): round(r, 2) for n, r in rates.items()},
                           "measured": datetime.date.today().isoformat()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
    tmp.replace(path)
    return best


def auto_workers(cores: int | None = None) -> tuple[int, str]:
    """`--workers auto`: the count `hpo bench-workers throughput` measured fastest on this
    many cores, else one worker per core; with the reason, for the start line."""
    cores = cores or available_cores()
    path = measured_workers_path()
    record = _measured_workers(path).get(str(cores))
    try:
        workers = record["workers"]
        if isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1:
            rates = ", ".join(f"{plural(int(n), 'worker')} {float(r):g}/min" for n, r in sorted(
                record["rates"].items(), key=lambda kv: int(kv[0])))
            return workers, (f"fastest measured on {plural(cores, 'core')} by hpo bench-workers throughput "
                             f"{record.get('study', '?')} on {record.get('measured', '?')}: {rates}")
    except (KeyError, TypeError, ValueError, AttributeError):
        pass  # a damaged record is no record
    return cores, (f"one per core, {plural(cores, 'core')}; run hpo bench-workers throughput STUDY once to "
                   "choose by measurement on this machine")


def _measured_workers(path: Path) -> dict:
    # A missing or damaged record is no record: auto falls back to one worker per core.
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Training threads (JAX's or TensorFlow's) per worker so that `workers` processes share the cores."""
    cores = cores or available_cores()
    return max(1, cores // max(1, workers))


def describe_threads(spec: StudySpec, workers: int) -> str:
    """The start line of `hpo run --workers N`: how many threads of which backend each worker trains with."""
    from hpo.backend import resolve_backend

    if spec.model.family == "analytic":
        return f"{plural(workers, 'worker')} (analytic study: nothing to train, no training threads)"
    backend = {"jax": "JAX", "tensorflow": "TensorFlow"}[resolve_backend(spec.training.backend)]
    return f"{plural(workers, 'worker')}, {plural(worker_threads(workers), backend + ' thread')} each"


def run_workers(storage_url: str, spec: StudySpec, workers: int, *, budget: int, timeout: float | None = None,
                max_consecutive_failures: int = 5, heartbeat_interval: int | None = None,
                grace_period: int | None = None, max_memory_growth: float | None = None,
                echo: Callable[[str], None] = print,
                echo_err: Callable[[str], None] | None = None) -> RunSummary:
    """Run `workers` local `hpo worker` processes on the study (created already) and relay
    their progress lines, each prefixed with its worker number.

    SIGINT or SIGTERM to this process stops every worker: each fails its running trial
    (not counted, queued again) and exits; one that does not within `STOP_SECONDS` is
    killed, and its trial is retried after the grace period by the next run.
    """
    from hpo.store.storage import count_trials as _count, get_storage

    echo_err = echo_err or (lambda line: print(line, file=sys.stderr, flush=True))
    threads = worker_threads(workers)
    storage = get_storage(storage_url, heartbeat_interval=None)
    study = optuna.load_study(study_name=spec.name, storage=storage)
    before = _count(storage, study._study_id)
    start = time.perf_counter()
    cmd_tail = ["--study-name", spec.name, "--trials", str(budget), "--threads", str(threads),
                "--max-failures", str(max_consecutive_failures)]
    if timeout is not None:
        cmd_tail += ["--timeout", str(timeout)]
    if heartbeat_interval is not None:
        cmd_tail += ["--heartbeat-interval", str(heartbeat_interval)]
    if grace_period is not None:
        cmd_tail += ["--grace-period", str(grace_period)]
    if max_memory_growth is not None:
        cmd_tail += ["--max-memory-growth", str(max_memory_growth)]
    # The URL travels in the environment, not on the command line, where `ps` would show
    # its password.
    env = package_env({STORAGE_ENV: storage_url, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())})
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    for i in range(workers):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "hpo", "worker", "--worker-index", str(i), *cmd_tail],
            # No preexec_fn: with one, Python forks (and runs JAX's fork warning) in a process
            # whose JAX or TensorFlow threads are running; without, the child is spawned afresh.
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True))
    relays = [threading.Thread(target=_relay, args=(p.stdout, f"w{i}", echo, lock), daemon=True)
              for i, p in enumerate(procs)]
    relays += [threading.Thread(target=_relay, args=(p.stderr, f"w{i}", echo_err, lock), daemon=True)
               for i, p in enumerate(procs)]
    for t in relays:
        t.start()
    summary = RunSummary(spec.name)
    restore = record_signals()
    try:
        while any(p.poll() is None for p in procs):
            if stop_requested():
                summary.stopped_reason = (f"interrupted by {signal.Signals(stop_signal()).name}; "
                                          f"stopped {workers} workers")
                summary.exit_code = 130
                _stop_all(procs, echo_err)
                break
            time.sleep(0.1)
    finally:
        restore()
    for t in relays:
        t.join(timeout=5)
    after = _count(storage, study._study_id)
    summary.complete = after.complete - before.complete
    summary.pruned = after.pruned - before.pruned
    summary.failed = after.failed - before.failed
    summary.lost = after.lost - before.lost
    summary.seconds = time.perf_counter() - start
    if not summary.stopped_reason and after.stop_reason:
        summary.stopped_reason = f"study stopped: {after.stop_reason}"
    codes = [p.returncode for p in procs]
    if summary.exit_code == 0 and any(codes):
        summary.exit_code = 1
        summary.stopped_reason = summary.stopped_reason or f"worker exit codes {codes}"
    summary.best = best_trial(study, spec)
    return summary


def package_root() -> str:
    """The folder that holds the `hpo` package this process runs."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def package_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment and `extra`, for a child that runs from the caller's
    own folder (where a relative `sqlite:///study.db` lies) with this process's `hpo`
    package on its path (an `hpo` folder in the caller's folder would come first)."""
    return {**os.environ, **extra,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root(), os.environ.get("PYTHONPATH")]))}


def start_storage_proxy(storage_url: str, threads: int | None = None,
                        wait_seconds: float = 60.0) -> tuple[subprocess.Popen, str]:
    """An `hpo storage-proxy` process on `storage_url`, on a free loopback port; it and its
    `grpc://` URL, once it listens. Stop it with SIGTERM.

    Raises:
        HpoError: It exited, or did not listen within `wait_seconds`, with its last line.
    """
    import queue

    from hpo.errors import HpoError

    # The URL (its password) in the environment, not on a command line others can read.
    cmd = [sys.executable, "-m", "hpo", "storage-proxy", "--port", "0"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=package_env({STORAGE_ENV: storage_url, PARENT_ENV: str(os.getpid())}))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + wait_seconds
    last = "no output"
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                break
            continue
        last = line.strip() or last
        found = [w for w in line.split() if w.startswith("grpc://")]
        if found:
            return proc, found[0].rstrip(";,")
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    raise HpoError(f"hpo storage-proxy on {mask_url(storage_url)} did not start: {last}")


def _relay(stream, prefix: str, echo: Callable[[str], None], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            echo(f"{prefix} {line.rstrip()}")


def _stop_all(procs: list[subprocess.Popen], echo_err: Callable[[str], None]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            echo_err(f"w{i} did not stop within {STOP_SECONDS:g} s and was killed; "
                     "its trial is retried once the grace period has passed")


# Set by `run_workers` for its children: the process id of the `hpo run` that started them.
PARENT_ENV = "HPO_WORKER_PARENT"


def die_with_parent() -> None:
    """In a worker started by `run_workers`: get SIGTERM when that `hpo run` dies, even
    by SIGKILL, so no worker is left behind (Linux; elsewhere nothing happens).

    The worker asks for it itself, first thing: asked by the parent between fork and exec,
    it would take a fork of a process whose JAX threads run.
    """
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        # The parent died before the request was made: nobody would send the signal.
        os.kill(os.getpid(), signal.SIGTERM)
