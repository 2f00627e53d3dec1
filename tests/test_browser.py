"""The clinicians' page (``GET /``) in a real browser: headless Chromium driven by Selenium.

Debian's ``chromium`` and ``chromium-driver`` packages, Selenium from PyPI pointed at them: nothing is
downloaded at run time. Skipped, with the reason, when either is absent (``.ci/run`` installs them).
One local Ray and one Serve application on 127.0.0.1 for the module, with bearer-token auth on and a
site-calibrated threshold; a handful of tests, run in order on one browser session. Screenshots go
to ``$PNEUMONET_SCREENSHOTS`` or a temporary folder (printed); ``pytest -m browser`` runs only these.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from pneumonet.artifact import build_metadata, save_artifact
from pneumonet.config import load_config
from pneumonet.data.images import load_image
from pneumonet.evaluation.metrics import compute_metrics
from pneumonet.scoring.cluster import SERVE_ENV
from pneumonet.training.finishing import VAL_METRIC_KEYS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SIZE = 64
MODEL_OVERRIDES = [f"model.image_size={SIZE}", "model.custom_filters=[8,16]", "model.custom_dense_units=8"]
MAX_BYTES = 300_000  # serve.max_request_bytes: the noise PNG below is over it
TOKEN_ENV = "PNEUMONET_TEST_PAGE_TOKEN"
TOKEN = "page-t0ken-never-in-a-url-8d2e"
WAIT = 60  # seconds for any one thing to appear; a 2-core machine under load is slow, not broken
# serve.queue_timeout_s is raised to 20 s in the app below for the same reason: real 503s are not what is tested.


def _skip_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return "Chromium or chromedriver not found: apt-get install chromium chromium-driver (Debian), as .ci/run does"
    return None


SKIP = _skip_reason()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(SKIP is not None, reason=f"browser tests: {SKIP}")]


# --- images -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real-looking chest X-rays (JPEG, a portrait PNG, a 16-bit DICOM) and files the endpoint refuses."""
    from pneumonet.data.synthetic import synthesize_dataset
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    root = synthesize_dataset(tmp_path_factory.mktemp("xrays"), n=8, size=320, seed=11)
    out = tmp_path_factory.mktemp("uploads")
    pneumonia = sorted((root / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    normal = sorted((root / "train" / "NORMAL").glob("*.jpeg"))[0]
    files = {"jpeg": out / "chest-pa.jpeg", "png": out / "portrait.png", "dicom": out / "study.dcm"}
    shutil.copy(pneumonia, files["jpeg"])
    gray = Image.open(normal).convert("L")
    gray.resize((280, 340), Image.Resampling.BILINEAR).save(files["png"])  # not square: the overlay must stretch
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID, "DX"
    ds.PatientName = "Anonymous"
    ds.set_pixel_data((np.asarray(gray, np.uint16) * 16), "MONOCHROME2", bits_stored=12)
    ds.save_as(files["dicom"], enforce_file_format=True)
    files["corrupt"] = out / "truncated.png"
    files["corrupt"].write_bytes(files["png"].read_bytes()[:200])
    files["gif"] = out / "animation.gif"
    gray.save(files["gif"], format="GIF")
    files["big"] = out / "huge-scan.png"
    noise = np.random.default_rng(3).integers(0, 256, (640, 640), dtype=np.uint8)
    Image.fromarray(noise).save(files["big"])
    assert files["big"].stat().st_size > MAX_BYTES
    return files


# --- the endpoint -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]) -> str:
    """A tiny model whose site threshold lies between the scores of the JPEG and the PNG, so the page
    shows both decisions; its validation and site figures (with intervals) are computed, not typed."""
    from pneumonet.models import build_model

    config = load_config(None, MODEL_OVERRIDES)
    model = build_model("custom", config.model, seed=4)
    pixels = np.stack([load_image(images[k].read_bytes(), images[k].name, SIZE) for k in ("jpeg", "png")])
    scores = model.predict(pixels, verbose=0)[:, 0]
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(30, int), np.zeros(20, int)]
    probs = np.clip(labels * 0.3 + rng.uniform(0.2, 0.7, labels.size), 0, 1)
    val = compute_metrics(labels, probs, 0.5, n_bootstrap=200)
    site_threshold = float(scores.mean())
    site = compute_metrics(labels, probs, site_threshold, n_bootstrap=200, groups=[f"p{i // 2}" for i in range(labels.size)])
    site_record = {
        "threshold": site_threshold, "policy": {"policy": "min_sensitivity", "min_sensitivity": 0.9, "fixed": 0.5},
        "training_threshold": 0.5, "calibrated_at": "2026-12-01T10:00:00+00:00",
        "sample": {"root": "s3://site/sample", "split": "test", "n": 50, "n_positive": 30, "n_negative": 20, "n_patients": 25},
        "at_site_threshold": {k: site[k] for k in ("n", "n_positive", "n_negative", "threshold", "accuracy", "roc_auc",
                                                   "sensitivity", "specificity", "ci95", "ci95_grouped_by")},
    }  # fmt: skip
    meta = build_metadata(
        variant="custom", config=config, threshold=0.5, manifest_digest="ab" * 32,
        val_metrics={k: val[k] for k in VAL_METRIC_KEYS if k in val}, extra={"site_calibration": site_record},
    )  # fmt: skip
    return save_artifact(model, meta, str(tmp_path_factory.mktemp("model") / "m"))


@pytest.fixture(scope="module")
def endpoint(model_uri: str) -> Iterator[str]:
    import ray
    from ray import serve

    from pneumonet.scoring.online import build_app

    mp = pytest.MonkeyPatch()
    mp.setenv(TOKEN_ENV, TOKEN)  # before Ray starts: the replica inherits it
    for key, value in SERVE_ENV.items():
        mp.setenv(key, value)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = load_config(None, [*MODEL_OVERRIDES, f"serve.auth_token_env={TOKEN_ENV}",
                                    f"serve.max_request_bytes={MAX_BYTES}", "serve.queue_timeout_s=20"])  # fmt: skip
        serve.run(build_app(model_uri, config, ray_actor_options={"num_cpus": 0.5}), name="page", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        mp.undo()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_predict(endpoint: str, path: Path, content_type: str, explain: bool = False) -> dict[str, Any]:
    response = requests.post(f"{endpoint}/v1/predict" + ("?explain=gradcam" if explain else ""), data=path.read_bytes(),
                             headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}, timeout=WAIT)  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()


# --- the browser --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("PNEUMONET_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(endpoint: str) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        driver.get(f"{endpoint}/")
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(condition, message=f"waited {WAIT} s for {what}")


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def result(driver: Any, filename: str) -> Any:
    """The result item of one uploaded file, once it is no longer pending."""
    from selenium.webdriver.common.by import By

    def found(d: Any) -> Any:
        for item in d.find_elements(By.CSS_SELECTOR, "#results > li"):
            if item.find_element(By.CSS_SELECTOR, ".file").text.startswith(filename):
                return item if item.get_attribute("data-state") != "pending" else False
        return False

    return wait_for(driver, found, f"the result of {filename}")


def part(item: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return item.find_element(By.CSS_SELECTOR, selector)


def upload(driver: Any, *paths: Path) -> None:
    by_id(driver, "file-input").send_keys("\n".join(str(p) for p in paths))


def console_errors(driver: Any) -> list[dict]:
    """Console errors other than the browser's own line for each refused request (its network log)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]


def no_horizontal_scroll(driver: Any) -> bool:
    return driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


# --- the tests, in order on one browser session ---------------------------------------------------------


def test_a_wrong_token_is_refused_and_the_right_one_is_kept_in_memory_only(browser: Any, shots: Path) -> None:
    wait_for(browser, lambda d: by_id(d, "token-view").is_displayed(), "the token form")
    assert not by_id(browser, "score-view").is_displayed()
    by_id(browser, "token-input").send_keys("not-the-token\n")
    message = wait_for(browser, lambda d: by_id(d, "token-message").is_displayed() and by_id(d, "token-message"), "refusal")
    assert "refused this token (401)" in message.text
    browser.save_screenshot(str(shots / "wrong-token.png"))

    by_id(browser, "token-input").send_keys(f"{TOKEN}\n")
    wait_for(browser, lambda d: by_id(d, "score-view").is_displayed(), "the upload view")
    assert not by_id(browser, "token-view").is_displayed()
    assert "decides at" in by_id(browser, "status").text
    stored = browser.execute_script(
        "return [document.cookie, localStorage.length, sessionStorage.length, location.href, document.documentElement.outerHTML]"
    )  # fmt: skip
    assert stored[:3] == ["", 0, 0], stored[:3]
    assert TOKEN not in stored[3] and TOKEN not in stored[4]
    assert not console_errors(browser), console_errors(browser)

    # Keyboard: Tab from the skip link (the first stop) reaches every control of the view, in reading order.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.execute_script("document.querySelector('.skip').focus()")
    reached = []
    for _ in range(4):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.append(browser.execute_script("return document.activeElement.id"))
    assert reached == ["nav-score", "nav-card", "forget-token", "choose"], reached


def test_each_upload_shows_the_apis_score_decision_threshold_and_model(browser: Any, endpoint: str,
                                                                       images: dict[str, Path], shots: Path) -> None:  # fmt: skip
    upload(browser, images["jpeg"], images["png"], images["dicom"])
    types = {"jpeg": "image/jpeg", "png": "image/png", "dicom": "application/dicom"}
    decisions = set()
    for key, content_type in types.items():
        item = result(browser, images[key].name)
        assert item.get_attribute("data-state") == "done", part(item, ".message").text
        api = api_predict(endpoint, images[key], content_type)
        shown = part(item, ".probability")
        assert float(shown.get_attribute("data-probability")) == pytest.approx(api["probability"], abs=1e-5)
        assert abs(float(shown.text.rstrip(" %")) - 100 * api["probability"]) <= 0.05 + 1e-9, shown.text
        assert item.get_attribute("data-prediction") == api["prediction"]
        assert part(item, ".decision").text.startswith(api["prediction"])
        threshold = part(item, ".threshold")
        assert float(threshold.get_attribute("data-threshold")) == pytest.approx(api["threshold"], abs=1e-9)
        assert api["threshold_source"] == "site" and "site-calibrated" in threshold.text
        assert part(item, ".model").text == f"{api['model']['name']}, version {api['model']['version']}"
        decisions.add(api["prediction"])
    assert decisions == {"PNEUMONIA", "NORMAL"}, "the site threshold lies between the JPEG's and the PNG's scores"
    dicom = result(browser, images["dicom"].name)
    xray = part(dicom, ".xray")  # the browser cannot show DICOM: the page shows the model's view from the API
    assert xray.is_displayed() and xray.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", xray) == SIZE
    browser.save_screenshot(str(shots / "results.png"))
    assert not console_errors(browser), console_errors(browser)


def test_gradcam_toggles_on_the_image_from_the_keyboard(browser: Any, endpoint: str, images: dict[str, Path],
                                                        shots: Path) -> None:  # fmt: skip
    from selenium.webdriver.common.keys import Keys

    item = result(browser, images["png"].name)
    button, overlay = part(item, ".gradcam"), part(item, ".overlay")
    assert button.get_attribute("aria-pressed") == "false" and not overlay.is_displayed()
    button.send_keys(Keys.SPACE)  # a keyboard press, on the focused button
    wait_for(browser, lambda d: button.get_attribute("aria-pressed") == "true" and overlay.is_displayed(), "the overlay")
    api = api_predict(endpoint, images["png"], "image/png", explain=True)
    assert overlay.get_attribute("src") == f"data:image/png;base64,{api['gradcam_png']}"
    image = part(item, ".xray")
    assert overlay.size == image.size, "the heat map covers the whole (portrait) image"
    assert image.size["height"] > image.size["width"]
    assert button.text == "Hide Grad-CAM"
    browser.execute_script("arguments[0].scrollIntoView()", item)
    item.screenshot(str(shots / "gradcam.png"))
    button.send_keys(Keys.ENTER)
    wait_for(browser, lambda d: button.get_attribute("aria-pressed") == "false" and not overlay.is_displayed(), "no overlay")
    assert not console_errors(browser), console_errors(browser)


STUB_FETCH = """
const [status, body, type] = arguments;  // status 0: the network fails (fetch rejects)
window.realFetch = window.realFetch || window.fetch;
window.fetch = (input, init) => !String(input).includes('/v1/predict') ? window.realFetch(input, init)
  : status === 0 ? Promise.reject(new TypeError('Failed to fetch'))
  : Promise.resolve(new Response(body, {status, headers: {'Content-Type': type, 'Retry-After': '1'}}));
"""
DROP = """
const [bytes, name, type] = arguments;
const data = new DataTransfer();
data.items.add(new File([new Uint8Array(bytes)], name, {type}));
document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
"""


def test_every_refusal_is_explained_next_to_its_file(browser: Any, endpoint: str, images: dict[str, Path],
                                                     shots: Path, tmp_path: Path) -> None:  # fmt: skip
    by_id(browser, "clear").click()
    upload(browser, images["gif"], images["big"])
    browser.execute_script(DROP, list(images["corrupt"].read_bytes()), images["corrupt"].name, "image/png")
    expected = {"gif": "(415)", "big": "(413, not sent)", "corrupt": "(422)"}
    for key, status in expected.items():
        item = result(browser, images[key].name)
        assert item.get_attribute("data-state") == "error"
        assert status in part(item, ".message").text, part(item, ".message").text
    assert "serve.max_request_bytes" in part(result(browser, images["big"].name), ".message").text
    assert "truncated or corrupt" in part(result(browser, images["corrupt"].name), ".message").text  # the API's reason

    # Answers this endpoint cannot be made to give here, stubbed in the page's fetch: its own 413 (a
    # limit lower than the page knows of), its 503 (JSON, Retry-After), Serve's own 503 (plain text),
    # a network failure, and last a token that stopped working (which asks for the token again).
    stubs = {"limit.jpeg": (413, '{"error": "request body is over the limit of 1000 bytes"}', "application/json"),
             "busy.jpeg": (503, '{"error": "overloaded: 40 images wait for the model"}', "application/json"),
             "queue-full.jpeg": (503, "Service Unavailable", "text/plain"),
             "slow.jpeg": (408, '{"error": "request not answered within 30 s (serve.request_timeout_s)"}', "application/json"),
             "offline.jpeg": (0, "", ""),
             "rotated.jpeg": (401, '{"error": "missing or invalid bearer token"}', "application/json")}  # fmt: skip
    shown = {"limit.jpeg": "Too large (413): request body is over the limit of 1000 bytes",
             "busy.jpeg": "(503): try again in 1 s. overloaded: 40 images", "queue-full.jpeg": "Service Unavailable",
             "slow.jpeg": "Not answered in time (408): the upload was too slow or the endpoint too busy; try again. request not",
             "offline.jpeg": "Could not reach the endpoint (network error)", "rotated.jpeg": "Not authorised (401)"}  # fmt: skip
    for name, (status, body, content_type) in stubs.items():
        browser.execute_script(STUB_FETCH, status, body, content_type)
        copy = tmp_path / name
        shutil.copy(images["jpeg"], copy)
        upload(browser, copy)
        item = result(browser, name)
        text = part(item, ".message").text
        assert shown[name] in text, text
        assert part(item, ".retry").is_displayed() == (status != 413), name  # a retry cannot make a file smaller
    assert by_id(browser, "token-view").is_displayed() and "(401)" in by_id(browser, "token-message").text
    browser.save_screenshot(str(shots / "refusals.png"))

    browser.execute_script("window.fetch = window.realFetch")
    by_id(browser, "token-input").send_keys(f"{TOKEN}\n")
    wait_for(browser, lambda d: not by_id(d, "token-view").is_displayed(), "the token accepted again")
    for name in ("busy.jpeg", "queue-full.jpeg", "slow.jpeg", "offline.jpeg", "rotated.jpeg"):
        part(result(browser, name), ".retry").click()
        wait_for(browser, lambda d, n=name: result(d, n).get_attribute("data-state") == "done", f"{name} scored on retry")
    assert not console_errors(browser), console_errors(browser)


def test_model_card_and_phone_width(browser: Any, endpoint: str, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    info = requests.get(f"{endpoint}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=WAIT).json()
    by_id(browser, "nav-card").click()
    card = by_id(browser, "card")
    wait_for(browser, lambda d: card.is_displayed(), "the model card")
    text = card.text
    assert "Research software, not a medical device." in text
    assert info["name"] in text and info["version"] in text and info["manifest_digest"] in text
    first, site_table = card.find_elements(By.CSS_SELECTOR, "table")
    for table, metrics in ((first, info["val_metrics"]), (site_table, info["site_calibration"]["at_site_threshold"])):
        row = table.find_element(By.CSS_SELECTOR, "tr[data-metric='roc_auc']")
        low, high = metrics["ci95"]["roc_auc"]
        assert row.text.split()[-4:] == [f"{metrics['roc_auc']:.3f}", f"{low:.3f}", "–", f"{high:.3f}"], row.text
    assert "resampling whole patients" in site_table.text and "resampling images" in first.text
    assert "Youden" not in text and "sensitivity is at least 0.95" in text  # the training policy (the default)
    assert f"decides at {info['operating_threshold']:.3f} ({100 * info['operating_threshold']:.1f} %)" in text and "site-calibrated" in text
    browser.save_screenshot(str(shots / "model-card.png"))

    browser.set_window_size(390, 844)  # a phone
    try:
        time.sleep(0.3)
        assert no_horizontal_scroll(browser)
        browser.save_screenshot(str(shots / "model-card-phone.png"))
        by_id(browser, "nav-score").click()
        wait_for(browser, lambda d: by_id(d, "score-view").is_displayed(), "the results")
        assert no_horizontal_scroll(browser)
        browser.save_screenshot(str(shots / "results-phone.png"))
    finally:
        browser.set_window_size(1280, 1000)
    assert not console_errors(browser), console_errors(browser)

