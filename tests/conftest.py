import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpo.backend import use_backend
from tests.postgres import PgBouncer, PostgresServer, find_pg_bin, find_pgbouncer

ROOT = Path(__file__).resolve().parent.parent

# One persistent compilation cache for the suite and every `hpo` it starts, kept between
# runs (pytest's own cache folder), so a shape compiled once is never compiled again.
os.environ.setdefault("HPO_CACHE_DIR", str(ROOT / ".pytest_cache" / "hpo-jax"))

# Keras fixes its backend at first import: choose it (hpo's default, or HPO_BACKEND)
# before any test module imports Keras.
if use_backend() == "jax":
    from hpo.backend import use_compilation_cache

    use_compilation_cache()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session. Outside CI a machine without PostgreSQL
    skips these tests (and says so); in CI (`CI` set) that is a failure."""
    bin_dir = find_pg_bin()
    _require(bin_dir, "PostgreSQL (initdb, pg_ctl)", "postgresql")
    server = PostgresServer(bin_dir)
    yield server
    server.close()


@pytest.fixture(scope="session")
def pgbouncer(postgres):
    """PgBouncer in transaction mode with two server connections a database, in front of
    the session's PostgreSQL (skipped outside CI where it is not installed)."""
    _require(find_pgbouncer(), "PgBouncer", "pgbouncer")
    bouncer = PgBouncer(postgres)
    yield bouncer
    bouncer.close()


def _require(found, what: str, package: str) -> None:
    """Fail in CI (`CI` set), where .ci/run installs `package`; skip, saying so, elsewhere."""
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{what} not found in CI; .ci/run should have installed it")
        pytest.skip(f"{what} not installed (apt-get install -y {package}); these tests run in CI")


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """The same test on every storage backend: a SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres").create_database()


def run_hpo(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """The real `hpo` command (`python -m hpo`) in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "hpo", *args], capture_output=True, text=True,
                            env=full_env, cwd=cwd or ROOT, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"hpo {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def wait_until(condition, what: str, timeout: float = 120, poll: float = 0.05):
    """Poll `condition()` until it returns something truthy (no fixed sleeps: under load a
    step takes as long as it takes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")
