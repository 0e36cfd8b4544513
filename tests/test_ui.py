"""The web UI in real headless Chromium (Debian's package, driven by Playwright) against the live service:
enter the API key, upload a dataset, start a job, watch it succeed, open its model, drop an image.

Any browser console error, page error or request to a host other than the service fails the test.
Screenshots land in test-artifacts/ui/.
"""

import base64
from urllib.parse import urlsplit

import pytest

from tests.live import CLASSES
from tests.processes import REPO_ROOT, require_binary, require_module
from tests.synthetic import make_heldout, make_zip

ARTIFACTS = REPO_ROOT / "test-artifacts" / "ui"
API_KEY = "ui-test-key-7"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

DROP = """async ([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type: "image/jpeg" }));
  document.getElementById("predict-drop").dispatchEvent(
    new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
}"""


@pytest.fixture
def browser():
    sync_api = require_module("playwright.sync_api", "make install (it is a dev dependency)")
    chromium = require_binary("chromium", "apt-get install -y chromium (.ci/setup.sh does this)", "/usr/bin/chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def test_the_ui_uploads_trains_watches_and_predicts(migrated, start_service, browser, tmp_path):
    service = start_service({**migrated, "TUNESERVE_API_KEYS": API_KEY})
    archive = make_zip(tmp_path / "colours.zip", classes=CLASSES, per_class=12, size=32)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})

    def guard(route) -> None:
        url = urlsplit(route.request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.hostname not in LOCAL_HOSTS:
            problems.append(f"request to a non-local host: {route.request.url}")
            route.abort()
        else:
            route.continue_()

    context.route("**/*", guard)
    page = context.new_page()

    def console(message) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.set_default_timeout(30_000)

    page.goto(f"{service.url}/#/datasets")
    page.fill("#key-input", API_KEY)  # the service has keys, so the page asks before its first call
    page.click("#key-save")
    page.set_input_files("#dataset-drop-input", str(archive))
    page.wait_for_selector("h1 .badge[data-status=ready]", timeout=60_000)
    assert [t.strip() for t in page.locator(".hbars > span:not(.mono)").all_inner_texts()] == sorted(CLASSES)
    page.screenshot(path=str(ARTIFACTS / "dataset-page.png"), full_page=True)

    page.click("#train-this")
    page.select_option("select[name=base_model]", "resnet18")
    for name, value in (("weights", "none"), ("epochs", "2"), ("image_size", "32"), ("batch_size", "8")):
        page.fill(f"input[name={name}]", value)
    page.click("#start-job")
    page.wait_for_selector("#job-status .badge[data-status=succeeded]", timeout=120_000)
    page.wait_for_selector("svg.chart[data-metric=accuracy][data-points='2']")
    assert page.locator("#history tr").count() == 3  # header + two epochs, drawn from the live stream
    page.wait_for_selector("img[alt='training curves']", state="attached")
    page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)

    page.click("#job-model")
    page.wait_for_selector("#confusion img")
    page.wait_for_function("document.querySelector('#confusion img').naturalWidth > 0")
    assert page.locator("#per-class tr").count() == 1 + len(CLASSES)
    with service.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        shown_model = client.get(f"/v1/models/{page.url.rsplit('/', 1)[1]}").json()
    assert page.inner_text("#temperature") == f"{shown_model['temperature']:.2f}"
    assert page.inner_text("#ece-after") == f"{shown_model['metrics']['calibration']['ece_after']:.3f}"
    # 12 images per class hold out one each for test: far too few for the accuracy to mean much, and the page says so.
    assert shown_model["metrics"]["test"]["samples"] == len(CLASSES)
    assert page.inner_text("#test-warning") == shown_model["metrics"]["test"]["warning"]
    page.fill("#min-score", "0")  # abstain stays off, so the prediction below keeps its label
    page.click("#save-min-score")
    page.wait_for_selector("#toast:text('abstains under 0')")
    page.click("#promote")
    page.wait_for_selector("#promote:disabled:text('Pinned')")
    page.screenshot(path=str(ARTIFACTS / "model-page.png"), full_page=True)
    model_id = page.url.rsplit("/", 1)[1]

    label, image = make_heldout(["red"], 1)[0]
    with service.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        expected = client.post("/v1/predict", files={"file": ("red.jpg", image, "image/jpeg")}).json()
        pinned = client.get(f"/v1/models/{model_id}").json()["pinned"]
    page.click("a[data-nav=predict]")
    page.wait_for_selector("#predict-drop")
    page.evaluate(DROP, [base64.b64encode(image).decode(), "red.jpg"])
    shown = page.wait_for_selector(".prediction .top-label").inner_text()
    page.screenshot(path=str(ARTIFACTS / "predict-page.png"), full_page=True)

    assert expected["model_id"] == model_id
    assert pinned is True
    assert shown == expected["predictions"][0]["top"][0]["label"] == label
    assert page.locator(".prediction .hbars .bar").count() == len(CLASSES)

    page.goto(f"{service.url}/docs")  # self-hosted Swagger UI and ReDoc: the guard fails any CDN fetch
    page.wait_for_selector(".swagger-ui .info .title:has-text('tuneserve')")
    page.goto(f"{service.url}/redoc")
    page.wait_for_selector("h1:has-text('tuneserve')")
    assert problems == []


def _page(context, problems: list[str]):
    page = context.new_page()

    def console(message) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.set_default_timeout(30_000)
    return page


def _rows(page, selector: str, attribute: str) -> list[str]:
    return page.eval_on_selector_all(selector, f"(rows) => rows.map((r) => r.getAttribute('{attribute}'))")


def test_the_project_switcher_filters_every_page_and_a_member_lands_on_its_project(
        migrated, start_service, browser, tmp_path):
    from tests.model_rows import publish_model
    from tests.project_rows import move_to_project

    service = start_service({**migrated, "TUNESERVE_API_KEYS": API_KEY})
    admin = {"Authorization": f"Bearer {API_KEY}"}
    with service.client(headers=admin) as client:
        for name, quota in (("team-a", None), ("team-b", 50)):
            assert client.post("/v1/projects", json={"name": name, "description": f"{name} images",
                                                     "quota_mb": quota}).status_code == 201
        member = client.post("/v1/keys", json={"name": "bea", "role": "member", "projects": ["team-b"]}).json()["key"]
    model_a, model_b = publish_model(seed=1), publish_model(seed=2)
    move_to_project(model_a, "team-a")
    job_b, dataset_b = move_to_project(model_b, "team-b")
    archive = make_zip(tmp_path / "bees.zip", classes=CLASSES, per_class=6, size=32)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = _page(context, problems)

    page.goto(f"{service.url}/#/models")
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    page.wait_for_selector("#project-serving")
    assert page.eval_on_selector_all("#project-select option", "(o) => o.map((x) => x.value)") == [
        "default", "team-a", "team-b"]
    assert page.input_value("#project-select") == "default"  # nothing remembered yet
    assert page.locator("#models-list").count() == 0 and page.get_attribute("#project-serving", "data-serving") == ""

    page.select_option("#project-select", "team-a")
    page.wait_for_selector(f"#project-serving[data-serving='{model_a}']")
    assert _rows(page, "#models-list tr[data-model]", "data-model") == [model_a]
    page.select_option("#project-select", "team-b")
    page.wait_for_selector(f"#project-serving[data-serving='{model_b}']")
    assert _rows(page, "#models-list tr[data-model]", "data-model") == [model_b]
    page.click("a[data-nav=jobs]")
    page.wait_for_selector(f"#jobs-list tr[data-job='{job_b}']")
    assert _rows(page, "#jobs-list tr[data-job]", "data-job") == [job_b]
    assert page.eval_on_selector_all("#job-dataset option", "(o) => o.map((x) => x.value)") == [dataset_b]
    page.click("a[data-nav=datasets]")
    page.wait_for_selector(f"#datasets-list tr[data-dataset='{dataset_b}']")
    assert _rows(page, "#datasets-list tr[data-dataset]", "data-dataset") == [dataset_b]

    page.reload()  # the choice is remembered in this browser
    page.wait_for_selector(f"#datasets-list tr[data-dataset='{dataset_b}']")
    assert page.input_value("#project-select") == "team-b"
    page.set_input_files("#dataset-drop-input", str(archive))  # uploads into the chosen project
    page.wait_for_selector("h1 .badge")
    with service.client(headers=admin) as client:
        uploaded = client.get(f"/v1/datasets/{page.url.rsplit('/', 1)[1]}").json()
    assert uploaded["project"] == "team-b"

    page.select_option("#project-select", "team-a")
    page.click("a[data-nav=predict]")
    page.wait_for_selector("#predict-drop")
    label, image = make_heldout(["red"], 1)[0]
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        page.evaluate(DROP, [base64.b64encode(image).decode(), "red.jpg"])
    assert answer.value.url == f"{service.url}/v1/projects/team-a/predict"
    assert answer.value.json()["model_id"] == model_a
    page.wait_for_selector(".prediction .top-label")

    page.click("a[data-nav=projects]")
    page.wait_for_selector("#projects-list tr[data-project='team-b'] .bar")
    assert _rows(page, "#projects-list tr[data-project]", "data-project") == ["default", "team-a", "team-b"]
    assert page.get_attribute("#projects-list tr.current", "data-project") == "team-a"
    assert "of 50 MiB" in page.inner_text("#projects-list tr[data-project='team-b']")
    page.screenshot(path=str(ARTIFACTS / "projects-page.png"), full_page=True)

    # A member key of team-b alone, in a fresh browser: it lands on team-b, not on 'default' (a 404 for it).
    other = _page(browser.new_context(viewport={"width": 1280, "height": 800}), problems)
    other.goto(f"{service.url}/#/datasets")
    other.fill("#key-input", member)
    other.click("#key-save")
    other.wait_for_selector(f"#datasets-list tr[data-dataset='{dataset_b}']")
    assert other.input_value("#project-select") == "team-b"
    assert other.eval_on_selector_all("#project-select option", "(o) => o.map((x) => x.value)") == ["team-b"]
    assert sorted(_rows(other, "#datasets-list tr[data-dataset]", "data-dataset")) == sorted(
        [dataset_b, uploaded["id"]])
    assert problems == []
