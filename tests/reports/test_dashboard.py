import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest
from optuna_dashboard import get_note

from hpo.errors import StorageError
from hpo.record import SPEC_ATTR
from hpo.reports.dashboard import serve_dashboard, write_missing_notes
from tests.conftest import ROOT, run_hpo
from tests.made import add_trial, close, make_study

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """A beale study run by the real command (notes written by the objective) and a study
    made by hand without notes, as one from before notes existed."""
    path = tmp_path_factory.mktemp("dashboard") / "dash.db"
    url = f"sqlite:///{path}"
    run_hpo("run", "beale", "--storage", url, "--trials", "3", "--seeds", "2")
    old = make_study(url, name="older")
    old.set_user_attr(SPEC_ATTR, {"metric": "val_mae"})
    add_trial(old, {"act": "relu", "units": 16, "lr": 0.01}, [1.0, 1.1, 0.9])
    add_trial(old, {"act": "tanh", "units": 32, "lr": 0.01}, [2.0, 2.1, 1.9])
    close(old)
    return path


@pytest.fixture
def study_db(template_db, tmp_path):
    """A fresh copy of the template for each test (the dashboard writes notes into it)."""
    shutil.copy(template_db, tmp_path / "dash.db")
    return f"sqlite:///{tmp_path / 'dash.db'}"


def test_objective_writes_notes_and_the_dashboard_fills_in_the_rest(study_db):
    beale = optuna.load_study(study_name="beale", storage=study_db)
    for trial in beale.get_trials():
        note = get_note(optuna.trial.Trial(beale, trial._trial_id))
        assert f"## Trial {trial.number}" in note and "**Diagnosis:**" in note
        assert f"| 0 | {trial.user_attrs['seed_scores'][0]:.5g} |" in note

    assert write_missing_notes(study_db) == 2
    assert write_missing_notes(study_db) == 0
    older = optuna.load_study(study_name="older", storage=study_db)
    note = get_note(optuna.trial.Trial(older, older.get_trials()[1]._trial_id))
    assert "**val_mae: 2 ± 0.1** over 3 seeds" in note and "| 11 | 2.1 | 3 | 5 |" in note


def test_dashboard_on_a_missing_file_says_so_and_creates_none(tmp_path):
    with pytest.raises(StorageError, match="no study database at"):
        serve_dashboard(f"sqlite:///{tmp_path / 'nope.db'}", port=free_port())
    assert not (tmp_path / "nope.db").exists()


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"hpo dashboard exited {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"hpo dashboard did not answer at {url} within {timeout} s")


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver not found in CI; .ci/run should have installed them")
        pytest.skip("chromium and chromium-driver not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path / "chromium-profile"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_serves_the_study_its_trials_and_their_notes(study_db, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "hpo", "dashboard", "--storage", study_db, "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/api/studies", process)

        def body_text(driver) -> str:
            return driver.find_element(By.TAG_NAME, "body").text

        browser.get(f"{base}/dashboard")
        WebDriverWait(browser, 60).until(lambda d: "beale" in body_text(d) and "older" in body_text(d))
        browser.save_screenshot(str(tmp_path / "studies.png"))
        # Read-only by default: the page says so beside the buttons that would answer 403.
        assert "Read-only: this dashboard refuses changes" in body_text(browser)
        assert "--allow-writes" in body_text(browser)

        beale = optuna.load_study(study_name="beale", storage=study_db)
        browser.get(f"{base}/dashboard/studies/{beale._study_id}/trials")
        WebDriverWait(browser, 60).until(lambda d: "Diagnosis:" in body_text(d))
        text = body_text(browser)
        for trial in beale.get_trials():
            assert f"Trial {trial.number}" in text
        assert "3 Trials" in text and "over 2 seeds" in text
        browser.save_screenshot(str(tmp_path / "trials.png"))
        assert (tmp_path / "trials.png").stat().st_size > 10_000
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert "writing notes for 2 trials of older" in output


def test_dashboard_is_read_only_by_default_and_quiet(study_db):
    """A DELETE from anyone who can open the page is refused and the study stays; no line
    per request is printed."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "dashboard", "--storage", study_db, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/studies", proc)
        study_id = optuna.load_study(study_name="older", storage=study_db)._study_id
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/studies/{study_id}", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 403 and b"--allow-writes" in e.value.read()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "older" in [s.study_name for s in optuna.get_all_study_summaries(study_db)]
    assert "GET /api/studies" not in out and "read-only" in out


def test_the_readmes_screenshot_command_captures_the_loaded_page(study_db, tmp_path):
    """The README's command, as printed, with the page's port: the screenshot shows the
    loaded page, not "Loading studies..."."""
    import re

    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium not found in CI; .ci/run should have installed it")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    readme = (ROOT / "README.md").read_text()
    command_text = re.search(r"^chromium --headless .*?dashboard$", readme, re.S | re.M).group(0)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "hpo", "dashboard", "--storage", study_db, "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/studies", process)
        args = shlex.split(command_text.replace("\\\n", " ").replace(":8080", f":{port}"))
        subprocess.run([CHROMIUM, *args[1:], f"--user-data-dir={tmp_path / 'profile'}"], cwd=tmp_path,
                       capture_output=True, timeout=120, check=True)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    shot = tmp_path / "studies.png"
    # The loaded page (studies, buttons, banner) is about 30 KB of PNG.
    assert shot.exists() and shot.stat().st_size > 20_000
