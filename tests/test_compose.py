"""docker-compose.yml: its structure (no Docker engine needed), and the exact `command:`
lines of its services run against a real local PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import ROOT, wait_until

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name, "")
        if op == ":-":
            return current or arg
        if op == ":?" and not current:
            raise AssertionError(f"compose would stop: {arg}")
        return current

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def test_services_healthcheck_dependencies_and_ports(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "create", "worker", "dashboard"}
    pg = services["postgres"]
    assert pg["volumes"] == ["pgdata:/var/lib/postgresql/data"] and "pgdata" in compose["volumes"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"]) and pg["healthcheck"]["retries"] >= 3
    assert "ports" not in pg  # the database is reachable from the compose network only
    healthy = {"condition": "service_healthy"}
    created = {"condition": "service_completed_successfully"}
    assert services["create"]["depends_on"] == {"postgres": healthy}
    assert services["create"]["restart"] == "no"
    assert services["worker"]["depends_on"] == {"postgres": healthy, "create": created}
    assert services["dashboard"]["depends_on"] == {"postgres": healthy, "create": created}
    # Scalable: nothing that two copies of a worker would fight over.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert interpolate(services["dashboard"]["ports"], {}) == ["127.0.0.1:8080:8080"]
    assert [name for name, s in services.items() if "ports" in s] == ["dashboard"]


def test_the_proxy_file_puts_the_workers_behind_the_proxy(compose):
    proxied = yaml.safe_load((ROOT / "docker-compose.proxy.yml").read_text())["services"]
    assert proxied["worker"]["environment"] == {"HPO_STORAGE": "grpc://proxy:13000"}
    assert proxied["worker"]["depends_on"] == {"proxy": {"condition": "service_healthy"}}
    proxy = proxied["proxy"]
    assert proxy["build"] == compose["x-hpo"]["build"] and proxy["image"] == compose["x-hpo"]["image"]
    assert proxy["environment"] == compose["x-hpo"]["environment"]  # the database's URL, from .env
    assert interpolate(proxy["ports"], {}) == ["127.0.0.1:13000:13000"]  # this machine only, unless told
    assert proxy["command"][:2] == ["hpo", "storage-proxy"] and "healthcheck" in proxy


def test_credentials_come_from_the_environment(compose):
    text = COMPOSE.read_text()
    assert "${POSTGRES_PASSWORD:?" in text
    proxied = yaml.safe_load((ROOT / "docker-compose.proxy.yml").read_text())["services"]
    for service in [*compose["services"].values(), *proxied.values()]:
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "postgresql" in value:  # a proxy's grpc:// URL holds none
                assert "${POSTGRES_PASSWORD" in value, (key, value)
        command = " ".join(service.get("command", []))
        assert "POSTGRES_PASSWORD" not in command and "postgresql" not in command  # never on a command line
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["POSTGRES_PASSWORD"] == ""
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
    assert "COPY hpo" in (ROOT / "Dockerfile").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compose_commands_run_against_real_postgresql(compose, postgres):
    """create, then two workers, then the dashboard: the very command lines of the file."""
    url = postgres.create_database()
    dotenv = {"POSTGRES_PASSWORD": "unused-here", "HPO_STUDY": "beale", "HPO_STUDY_NAME": "compose_beale",
              "HPO_TRIALS": "8"}
    services = compose["services"]
    env = {**os.environ, "HPO_STORAGE": url, "PYTHONUNBUFFERED": "1"}

    def command(name: str) -> list[str]:
        argv = interpolate(services[name]["command"], dotenv)
        # The image's `hpo` is this repository's package; run it from here.
        return [sys.executable, "-m", "hpo", *argv[1:]] if argv[0] == "hpo" else [sys.executable, *argv[1:]]

    subprocess.run(command("create"), env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
    workers = [subprocess.Popen(command("worker"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, out + err
    trials = optuna.load_study(study_name="compose_beale", storage=url).get_trials(deepcopy=False)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 8 == len(trials)
    # Started alike, the scaled workers still seed their samplers apart.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 8

    port = _free_port()
    dotenv.update(DASHBOARD_HOST="127.0.0.1", DASHBOARD_PORT=str(port))
    dashboard = subprocess.Popen(command("dashboard"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 env=env)
    try:
        body = None
        deadline = time.monotonic() + 60
        while body is None and time.monotonic() < deadline and dashboard.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, dashboard.stderr.read() if dashboard.poll() is not None else "no answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["compose_beale"]
        assert "unused-here" not in " ".join(command("dashboard"))
        delete = urllib.request.Request(f"http://127.0.0.1:{port}/api/studies/1", method="DELETE")
        try:
            urllib.request.urlopen(delete, timeout=10)
            raise AssertionError("the compose dashboard let a DELETE through")
        except urllib.error.HTTPError as e:
            assert e.code == 403
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


# The real stack: images built here (no registry needed), docker-compose up, faults injected.
BASE_IMAGE = "hpo-base:bookworm"
POSTGRES_IMAGE = "hpo-postgres:local"
STACK_STUDY = """
name = "compose_slow"
seeds = 1
trials = TRIALS
[model]
family = "analytic"
function = "beale"
epoch_seconds = 0.4
[training]
max_epochs = 6
patience = 100
[pruner]
kind = "none"
[space]
x = { low = -4.5, high = 4.5 }
y = { low = -4.5, high = 4.5 }
"""


def _docker_or_skip() -> None:
    import shutil

    ok = shutil.which("docker-compose") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    if not ok:
        if os.environ.get("CI"):
            pytest.fail("no Docker engine or docker-compose in CI; .ci/run should have installed and started them")
        pytest.skip("no Docker engine (apt-get install docker.io docker-compose debootstrap; dockerd &)")


def _sh(*cmd: str, env: dict | None = None, timeout: float = 1800) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


class _Stack:
    """One compose project of the real files (and `extra` ones from the repository) on
    images built here, with PostgreSQL published on this machine for the test alone, a
    study of `trials` analytic trials, and what the tests ask of it."""

    def __init__(self, tmp_path, trials: int, *extra: str) -> None:
        import secrets

        _docker_or_skip()
        if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode != 0:
            _sh(str(ROOT / "docker" / "make-base.sh"), BASE_IMAGE)
        _sh("docker", "build", "-q", "--build-arg", f"BASE={BASE_IMAGE}", "-t", POSTGRES_IMAGE, "docker/postgres")
        studies = tmp_path / "studies"
        studies.mkdir()
        (studies / "compose_slow.toml").write_text(STACK_STUDY.replace("TRIALS", str(trials)))
        studies.chmod(0o755)
        (studies / "compose_slow.toml").chmod(0o644)
        pg_port, self.web_port, self.proxy_port = _free_port(), _free_port(), _free_port()
        # The test only: PostgreSQL published on this machine, so `hpo report` can read it.
        override = tmp_path / "override.yml"
        override.write_text(f"""
services:
  postgres:
    ports: ["127.0.0.1:{pg_port}:5432"]
  create:
    volumes: ["{studies}:/app/test-studies:ro"]
""")
        password = secrets.token_hex(12)
        self.trials_wanted = trials
        self.env = {**os.environ, "POSTGRES_PASSWORD": password, "HPO_STUDY": "/app/test-studies/compose_slow.toml",
                    "HPO_STUDY_NAME": "compose_slow", "HPO_TRIALS": str(trials), "HPO_BASE_IMAGE": BASE_IMAGE,
                    "HPO_POSTGRES_IMAGE": POSTGRES_IMAGE, "HPO_DASHBOARD_PORT": str(self.web_port),
                    "HPO_PROXY_PORT": str(self.proxy_port)}
        files = [COMPOSE, *(ROOT / name for name in extra), override]
        self.cmd = ["docker-compose", "-p", f"hpotest{secrets.token_hex(4)}",
                    *(arg for f in files for arg in ("-f", str(f)))]
        self.url = f"postgresql+psycopg://hpo:{password}@127.0.0.1:{pg_port}/hpo"
        _sh(*self.cmd, "build", env=self.env)

    def compose(self, *args: str, timeout: float = 600) -> str:
        return _sh(*self.cmd, *args, env=self.env, timeout=timeout)

    def trials(self) -> list:
        try:
            return optuna.load_study(study_name="compose_slow", storage=self.url).get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - not created yet, or the database is restarting
            return []

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).split()

    @staticmethod
    def hostname(container: str) -> str:
        return _sh("docker", "inspect", "-f", "{{.Config.Hostname}}", container).strip()

    def up_with_workers(self, n: int) -> list[str]:
        self.compose("up", "-d", "--scale", f"worker={n}")
        return wait_until(lambda: len(self.containers("worker")) == n and self.containers("worker"),
                          f"{n} worker containers", timeout=600, poll=1)

    def kill_mid_trial(self, victim: str) -> None:
        """`docker kill` a worker container while it runs a trial: its trial is retried
        after the grace period."""
        host = self.hostname(victim)
        wait_until(lambda: any(t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").startswith(f"{host}:")
                               for t in self.trials()), "a trial running on the first worker", timeout=600, poll=1)
        _sh("docker", "kill", victim)

    def wait_complete(self, n: int) -> None:
        wait_until(lambda: sum(t.state == TrialState.COMPLETE for t in self.trials()) >= n, f"{n} complete trials",
                   timeout=600, poll=1)

    def check_finished(self, workers: list[str], victim: str) -> None:
        """Every worker container exits (the killed one 137, the others 0); exactly the
        budget ran, nothing RUNNING, the killed worker's trial lost and retried, every
        trial run by a worker container."""
        def finished() -> list[str]:
            states = [_sh("docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", c).strip()
                      for c in self.containers("worker")]
            return all(s.startswith("exited") for s in states) and states
        states = wait_until(finished, "every worker to finish", timeout=900, poll=1)
        done = self.trials()
        spent = [t for t in done if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                 or (t.state == TrialState.FAIL and "fail_reason" in t.user_attrs)]
        assert len(spent) == self.trials_wanted, [(t.number, t.state, t.user_attrs.get("worker")) for t in done]
        assert not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        assert any(t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs for t in done)  # the lost one
        hosts = {self.hostname(c) for c in workers}
        assert {t.user_attrs["worker"].split(":")[0] for t in spent} <= hosts
        # Docker does not restart a container it was told to kill; the others end cleanly.
        exits = {c: _sh("docker", "inspect", "-f", "{{.State.ExitCode}}", c).strip() for c in workers}
        assert exits == {c: "137" if c == victim else "0" for c in workers}, (exits, states)

    def report(self) -> None:
        """`hpo report` from the host reads the study from the database."""
        report = subprocess.run([sys.executable, "-m", "hpo", "report", "--study-name", "compose_slow"],
                                capture_output=True, text=True, cwd=ROOT, timeout=300,
                                env={**os.environ, "HPO_STORAGE": self.url})
        assert report.returncode == 0 and "compose_slow" in report.stdout, report.stdout + report.stderr

    def __enter__(self) -> "_Stack":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:
            print(subprocess.run([*self.cmd, "logs", "--tail", "40"], capture_output=True, text=True,
                                 env=self.env, cwd=ROOT).stdout)
        subprocess.run([*self.cmd, "down", "-v"], capture_output=True, env=self.env, cwd=ROOT, timeout=300)


@pytest.mark.compose
def test_the_compose_stack_runs_a_study_through_a_killed_worker_and_a_database_restart(tmp_path):
    """Build the images, `docker-compose up` postgres, create, two workers and the
    dashboard; kill a worker mid-trial and restart PostgreSQL mid-run: the study ends with
    exactly its budget, nothing RUNNING, every trial run by a worker container; the
    dashboard reads (200) and refuses writes (403); `hpo report` reads it from the host."""
    with _Stack(tmp_path, 20) as stack:
        start = time.monotonic()
        workers = stack.up_with_workers(2)
        stack.kill_mid_trial(workers[0])
        # PostgreSQL restarted mid-run: the workers wait for it and carry on.
        stack.wait_complete(8)
        _sh("docker", "restart", stack.containers("postgres")[0])
        stack.check_finished(workers, workers[0])
        print(f"compose stack: up to a finished 20-trial study (with a kill and a restart) in "
              f"{time.monotonic() - start:.0f} s")
        base = f"http://127.0.0.1:{stack.web_port}"
        with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as r:
            assert r.status == 200
            assert [s["study_name"] for s in json.loads(r.read())["study_summaries"]] == ["compose_slow"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/studies/1", method="DELETE"), timeout=10)
        assert refused.value.code == 403
        stack.report()


@pytest.mark.compose
def test_the_compose_stack_through_the_storage_proxy(tmp_path):
    """`docker-compose.proxy.yml` beside the main file: the workers reach the study only
    through the `proxy` container (gRPC), one of them killed mid-trial and the proxy
    restarted mid-run; the study ends with exactly its budget and nothing RUNNING; the
    proxy's port is published on this machine and plain Optuna reads the study through it."""
    with _Stack(tmp_path, 12, "docker-compose.proxy.yml") as stack:
        workers = stack.up_with_workers(2)
        for c in workers:
            env = json.loads(_sh("docker", "inspect", "-f", "{{json .Config.Env}}", c))
            assert "HPO_STORAGE=grpc://proxy:13000" in env, env
        stack.kill_mid_trial(workers[0])
        # The proxy restarted mid-run: the workers wait for it and carry on.
        stack.wait_complete(4)
        _sh("docker", "restart", stack.containers("proxy")[0])
        stack.check_finished(workers, workers[0])
        code = ("import optuna, warnings; warnings.simplefilter('ignore'); "
                f"s = optuna.storages.GrpcStorageProxy(host='127.0.0.1', port={stack.proxy_port}); "
                "print(len(optuna.load_study(study_name='compose_slow', storage=s).trials))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.stdout.strip() == str(len(stack.trials())), out.stderr
        stack.report()
