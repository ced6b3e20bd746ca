"""The web console (/ui) in a real browser: Playwright drives the machine's Chromium (Debian's package; no
browser download) against a real API and worker started once for this module. Every request that leaves
127.0.0.1 is refused, so the pages must load air-gapped.

The walk: sign in; upload a bad file (each bad line's number and reason shown) and good ones; a job from the
form, its plan first; its loss curve growing while it trains; its evaluation; the adapter downloaded and checked
by sha256; two jobs compared; another team's job as a 404 page; a revoked key back to sign-in. The API docs
load air-gapped too. A screenshot of each page is saved under test-output/console/ (test output, not committed;
docs/screenshots/ holds copies for the README)."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from mlflow.tracking import MlflowClient

from shared.db import session_scope
from shared.models import ApiKey
from shared.services.auth import revoke_api_key
from tests.conftest import ROOT, TINY_MODEL, ServiceProcesses
from tests.helpers import color_messages, to_jsonl

pytestmark = pytest.mark.e2e
playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("TUNEFORGE_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("TUNEFORGE_TEST_OUTPUT", ROOT / "test-output")) / "console"
LONG = 240_000  # ms: a job from the form trains for a while on two shared cores
PROMPTS = ["What color is sky?", "Color of snow?"]


@pytest.fixture(scope="module")
def console(settings, tiny_model_dir, mlflow_server, make_team, tmp_path_factory) -> Iterator[dict]:
    """The API and one worker (logging to the tests' MLflow server), and a team of the console's own."""
    deployment = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server})
    procs = ServiceProcesses(deployment, tmp_path_factory.mktemp("console-logs"))
    procs.start_api()
    procs.start_worker("console-worker")
    team_id, key = make_team("console-team")
    try:
        yield {"procs": procs, "url": procs.base_url, "team": team_id, "key": key, "settings": deployment}
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make install does)")
    with playwright_api.sync_playwright() as playwright:
        # Bounded: a browser that does not start fails the test instead of hanging the suite.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A browser tab on the console that refuses every request leaving 127.0.0.1, and records the URLs it asked
    for, its console errors and the downloads it saved."""

    def __init__(self, browser, base_url: str, downloads: Path) -> None:
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1360, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.base_url = base_url
        self.downloads = downloads
        self.urls: list[str] = []
        self.refused: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page.on("request", lambda request: self.urls.append(request.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _route(self, route) -> None:
        host = urlsplit(route.request.url).hostname
        if route.request.url.startswith(("blob:", "data:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.refused.append(route.request.url)
            route.abort()

    def goto(self, fragment: str) -> None:
        self.page.goto(f"{self.base_url}/ui{fragment}")

    def shot(self, name: str, locator: str | None = None, *, full_page: bool = False) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        if locator:
            self.page.locator(locator).screenshot(path=str(SCREENSHOTS / f"{name}.png"))
        else:
            self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)

    def download(self, click) -> Path:
        with self.page.expect_download(timeout=60_000) as info:
            click()
        download = info.value
        path = self.downloads / download.suggested_filename
        download.save_as(path)
        return path

    def close(self) -> None:
        self.context.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_status(http: httpx.Client, job_id: str, statuses: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")


def test_the_console_from_sign_in_to_compare(console, browser, make_team, tmp_path):
    key, url = console["key"], console["url"]
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    tab = Page(browser, url, tmp_path)
    page = tab.page
    expect = playwright_api.expect

    # Sign-in: the page itself has a strict Content-Security-Policy; a wrong key is refused.
    response = page.goto(f"{url}/ui")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    page.wait_for_url("**/ui#/signin")
    tab.shot("sign-in")
    page.fill("#api-key", "tf_wrong_" + "x" * 20)
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#sign-in .error")).to_contain_text("not accepted")
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    page.wait_for_url("**/ui#/jobs")
    assert page.evaluate("sessionStorage.getItem('tuneforge.apiKey')") == key
    assert page.evaluate("localStorage.length") == 0

    # Files: a bad upload names each bad line and why; good ones are listed with their sha256.
    tab.goto("#/files")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n{"text": "fine"}\nnot json\n')
    page.set_input_files("#file-input", str(bad))
    page.click("#upload-form button[type=submit]")
    expect(page.locator("#bad-lines tbody tr")).to_have_count(2)
    lines = page.locator("#bad-lines tbody tr td:first-child").all_inner_texts()
    assert lines == ["2", "4"]
    expect(page.locator("#bad-lines")).to_contain_text("invalid JSON")
    tab.shot("files")
    uploads = {}
    for name, rows in (
        ("colors.jsonl", color_messages(48)),
        ("colors-validation.jsonl", color_messages(8, seed=1)),
    ):
        path = tmp_path / name
        path.write_bytes(to_jsonl(rows))
        page.set_input_files("#file-input", str(path))
        page.click("#upload-form button[type=submit]")
        expect(page.locator("#upload-result .success")).to_contain_text(name)
        uploads[name] = page.locator("#upload-result .success .mono").inner_text()
        expect(page.locator("#upload-result .success")).to_contain_text(sha256(path))
    expect(page.locator("#files-table tbody tr")).to_have_count(2)

    # New job: the plan (memory per GPU, parameters, the dataset report) before the job can be submitted.
    tab.goto("#/new")
    expect(page.locator(f"#dataset option[value='{uploads['colors.jsonl']}']")).to_have_count(1)
    page.select_option("#base_model", TINY_MODEL)
    page.select_option("#dataset", uploads["colors.jsonl"])
    page.select_option("#validation_dataset", uploads["colors-validation.jsonl"])
    page.fill("#rank", "8")
    page.select_option("#length", "max_steps")
    page.fill("#length_value", "120")
    page.fill("#learning_rate", "0.01")
    page.fill("#batch_size", "8")
    page.fill("#eval_prompts", "\n".join(PROMPTS))
    page.fill("#mlflow", "console-e2e")
    expect(page.locator("#submit-job")).to_be_disabled()
    page.click("#check-plan")
    expect(page.locator("#plan-result .plan")).to_have_attribute("data-status", "ready", timeout=120_000)
    expect(page.locator("#plan-memory")).to_contain_text("GiB")
    expect(page.locator("#plan-params")).to_contain_text("trainable of")
    tab.shot("new-job")
    expect(page.locator("#submit-job")).to_be_enabled()
    page.click("#submit-job")
    page.wait_for_url("**/ui#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[-1]

    # A second, shorter job queues behind it (one worker): the jobs list shows its queue position.
    spec = {
        "base_model": TINY_MODEL,
        "dataset": uploads["colors.jsonl"],
        "adapter": {"rank": 4},
        "hyperparameters": {"max_steps": 20, "learning_rate": 0.005, "batch_size": 8},
    }
    second = http.post("/v1/jobs", json=spec)
    assert second.status_code == 201, second.text
    second_id = second.json()["id"]

    # The job page: the loss curve grows while the job trains, streamed over its server-sent events.
    caption = page.locator("#chart-caption")
    expect(caption).not_to_have_attribute("data-train-points", "0", timeout=LONG)
    first_seen = int(caption.get_attribute("data-train-points"))
    assert first_seen < 120, "the first look at the curve came after training ended"
    # (Polled from here: the page's Content-Security-Policy forbids the eval Playwright's waits would use.)
    deadline = time.monotonic() + LONG / 1000
    while int(caption.get_attribute("data-train-points")) <= first_seen and time.monotonic() < deadline:
        time.sleep(0.2)
    assert int(caption.get_attribute("data-train-points")) > first_seen
    assert page.locator("#loss-chart canvas").count() == 1
    page.locator("#curves").scroll_into_view_if_needed()
    tab.shot("job-training", "#curves")

    tab.goto("#/jobs")
    expect(page.locator(f"tr[data-job='{second_id}'] .queue")).to_contain_text("#1", timeout=LONG)
    expect(page.locator(f"tr[data-job='{job_id}'] progress")).to_have_count(1)
    tab.shot("jobs")

    # The finished job: the full curve, its evaluation side by side, its artifacts with sha256.
    tab.goto(f"#/jobs/{job_id}")
    expect(page.locator(".job-header .badge")).to_have_text("succeeded", timeout=LONG)
    expect(caption).to_have_attribute("data-train-points", "120", timeout=60_000)
    rows = page.locator("#evaluation-table tbody tr")
    expect(rows).to_have_count(len(PROMPTS), timeout=60_000)
    assert rows.first.locator("td").first.inner_text().startswith(PROMPTS[0])
    expect(page.locator("#perplexity")).to_contain_text("with the adapter")
    page.locator("#evaluation").scroll_into_view_if_needed()
    tab.shot("job-evaluation", "#evaluation")
    page.locator("#curves").scroll_into_view_if_needed()
    tab.shot("job", "#curves")
    kinds = set(
        page.locator("#artifacts-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.kind)")
    )
    assert kinds == {"adapter", "tensorboard", "evaluation", "checkpoint"}
    expect(page.locator("#checkpoints-body tbody tr td").first).to_have_text("100")  # checkpoint_steps 100

    # Downloads go through the browser with the key in a header, and the browser checks the sha256 first.
    recorded = {
        a["name"]: a["sha256"]
        for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        if a["kind"] == "adapter"
    }
    row = page.locator("#artifacts-table tr[data-kind='adapter'][data-name='adapter_model.safetensors']")
    expect(row.locator(".sha")).to_have_text(recorded["adapter_model.safetensors"])
    weights = tab.download(lambda: row.locator("button").click())
    assert sha256(weights) == recorded["adapter_model.safetensors"]
    expect(page.locator("#download-note")).to_have_attribute("data-verified", "true")
    archive = tab.download(lambda: page.click("button[data-download='adapter.tar']"))
    with tarfile.open(archive) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    sums = dict(reversed(line.split("  ", 1)) for line in members.pop("SHA256SUMS").decode().splitlines())
    assert sums == recorded
    assert {name: hashlib.sha256(data).hexdigest() for name, data in members.items()} == recorded

    # The worker logged the job to MLflow: every step's loss and the adapter.
    client = MlflowClient(tracking_uri=console["settings"].mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("console-e2e")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`tuneforge.job_id` = '{job_id}'")
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 120
    assert "adapter/adapter_model.safetensors" in {
        a.path for a in client.list_artifacts(run.info.run_id, "adapter")
    }

    # Compare: both curves overlaid, the settings side by side with the differences marked.
    wait_status(http, second_id, {"succeeded"}, timeout=LONG / 1000)
    tab.goto(f"#/compare?ids={job_id},{second_id}")
    expect(page.locator("#compare-caption")).to_have_attribute("data-jobs", "2")
    expect(page.locator("#compare-chart canvas")).to_have_count(1)
    differs = page.locator("#compare-table tr.differs").evaluate_all("rows => rows.map(r => r.dataset.key)")
    assert {"hyperparameters.max_steps", "hyperparameters.learning_rate", "adapter.rank"} <= set(differs)
    assert "method" not in differs
    tab.shot("compare", full_page=True)

    # Another team's job is a 404 page, like a job that does not exist.
    _, other_key = make_team("console-other-team")
    other = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {other_key}"}, timeout=60)
    upload = other.post("/v1/files", files={"file": ("theirs.jsonl", to_jsonl(color_messages(8)))}).json()
    their_job = other.post("/v1/jobs", json={**spec, "dataset": upload["id"]}).json()["id"]
    other.post(f"/v1/jobs/{their_job}/cancel")
    tab.goto(f"#/jobs/{their_job}")
    expect(page.locator(".not-found h1")).to_contain_text("404")
    tab.shot("not-found")

    # The key never travels in a URL, and never reaches the API's log.
    assert not [u for u in tab.urls if key in u]
    assert key not in console["procs"].log("api")
    # Nothing left 127.0.0.1, and no page broke its Content-Security-Policy or threw (the browser's notes of
    # the error answers the walk asked for, a wrong key's 401 and the 404s and 422s, aside).
    assert tab.refused == []
    errors = [e for e in tab.errors if not e.startswith("Failed to load resource: the server responded")]
    assert errors == [], errors

    # A revoked key: the next request sends the console back to sign-in, saying why.
    with session_scope(console["settings"].database_url) as session:
        prefix = key.split("_")[1]
        record = session.query(ApiKey).filter(ApiKey.prefix == prefix).one()
        revoke_api_key(session=session, key_id=record.id)
    time.sleep(1.5)  # every API process trusts a verified key for at most api_key_cache_seconds
    tab.goto("#/jobs")
    page.wait_for_url("**/ui#/signin")
    expect(page.locator("#sign-in-reason")).to_contain_text("revoked or has expired")
    assert page.evaluate("sessionStorage.getItem('tuneforge.apiKey')") is None
    tab.close()


def test_the_api_docs_load_air_gapped(console, browser, tmp_path):
    tab = Page(browser, console["url"], tmp_path)
    page = tab.page
    page.goto(f"{console['url']}/docs")
    # Swagger UI rendered the operations from /openapi.json with its local bundle.
    playwright_api.expect(page.locator(".opblock").first).to_be_visible()
    assert page.locator(".opblock").count() > 20
    tab.shot("api-docs")
    page.goto(f"{console['url']}/redoc")
    playwright_api.expect(page.locator("h1").first).to_contain_text("Tuneforge")
    playwright_api.expect(page.get_by_text("/v1/jobs/{job_id}/evaluation").first).to_be_attached()
    assert tab.refused == [], tab.refused
    served = [u for u in tab.urls if "/docs-assets/" in u]
    assert {Path(urlsplit(u).path).name for u in served} >= {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "redoc.standalone.js",
    }
    tab.close()
    assert json.loads(httpx.get(f"{console['url']}/openapi.json").text)["info"]["title"] == "Tuneforge"
