"""The web UI in a real browser: Debian's chromium driven by Playwright, against a live server on loopback.

Needs `pip install playwright` and `apt-get install chromium` (Playwright's own browser download is not
used); skipped with the reason when either is missing. Set SDLAB_SCREENSHOT=path.png to keep a screenshot.
"""

import os
import shutil
from pathlib import Path

import pytest

from sdlab.server import ServerSettings, serve_in_thread

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def server_url():
    with serve_in_thread(ServerSettings(model="random:tiny", port=0)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url):
    page = browser.new_page(viewport={"width": 1100, "height": 850})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server_url)
    page.wait_for_function("document.getElementById('sampler').options.length > 0")
    yield page
    page.close()
    assert errors == [], f"JavaScript errors: {errors}"


def set_fields(page, **values):
    for field, value in values.items():
        page.fill(f"#{field}", str(value))


def test_generate_shows_progress_image_parameters_and_steps(page, tmp_path):
    assert page.input_value("#sampler") == "DPM++ 2M" and page.input_value("#width") == "64"
    assert page.input_value("#schedule") == "karras"  # random:tiny's defaults (the model's, from /options)
    assert page.input_value("#cfg") == "7"
    assert "random:tiny" in page.inner_text("#model-name")
    page.fill("#prompt", "a red circle above a blue square")
    set_fields(page, steps=40, width=32, height=32, seed=1234)
    page.select_option("#sampler", "Euler")
    page.click("#generate")
    # live progress: a preview image while the job still runs
    page.wait_for_function("document.getElementById('generate').disabled && "
                           "!document.getElementById('current').hidden", timeout=60_000)
    assert "step" in page.inner_text("#progress-text") or "queued" in page.inner_text("#progress-text")
    page.wait_for_selector("#gallery figure", timeout=120_000)
    page.wait_for_function("!document.getElementById('generate').disabled")
    info = page.inner_text("#infotext")
    assert info.startswith("a red circle above a blue square\nSteps: 40, Sampler: Euler")
    assert "Seed: 1234" in info and "Size: 32x32" in info
    assert page.get_attribute("#current", "src").startswith("data:image/png;base64,")
    # the step player: one frame per step, the slider shows any of them
    assert not page.is_visible("#progress")  # hidden again once the job is done
    assert page.is_visible("#player") and page.get_attribute("#step-slider", "max") == "39"
    page.fill("#step-slider", "0")
    page.dispatch_event("#step-slider", "input")
    assert page.inner_text("#step-label") == "step 1/40"
    page.click("#play")
    page.wait_for_function("document.getElementById('step-label').textContent === 'step 40/40'", timeout=30_000)
    shot = Path(os.environ.get("SDLAB_SCREENSHOT", tmp_path / "webui.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_random_seed_batch_gallery_and_errors(page):
    page.click("#random-seed")
    assert int(page.input_value("#seed")) >= 0
    page.fill("#prompt", "a green star")
    set_fields(page, steps=2, width=32, height=32, batch=2, seed=7)
    page.click("#speedups summary")  # the opt-in speed-ups reach the server and its infotext
    set_fields(page, **{"token-merging": 0.3, "deepcache": 2})
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length === 2", timeout=120_000)
    captions = page.locator("#gallery figcaption").all_inner_texts()
    assert sorted(captions) == ["seed 7", "seed 8"]
    page.locator("#gallery figure").nth(0).click()
    info = page.inner_text("#infotext")
    assert "Seed: 8" in info and "Token merging ratio: 0.3" in info and "DeepCache: 2" in info
    page.click("#reuse-seed")
    assert page.input_value("#seed") == "8"
    page.fill("#prompt", "x" * 2001)  # the server's limit is 2000 characters
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == "422: prompt is 2001 characters; the limit is 2000"


@pytest.fixture(scope="module")
def sdxl_server_url(tmp_path_factory):
    """A server offering a tiny SDXL base and refiner from its models folder."""
    import torch

    from sdlab import Model
    from sdlab.families.sdxl import TINY_SDXL, TINY_SDXL_REFINER

    models = tmp_path_factory.mktemp("models")
    for config, name in ((TINY_SDXL, "xl-base"), (TINY_SDXL_REFINER, "xl-refiner")):
        torch.manual_seed(0)
        Model.build(config).save(models / name)
    with serve_in_thread(ServerSettings(model=str(models / "xl-base"), models_dir=models, port=0)) as url:
        yield url


def test_sdxl_model_with_a_refiner(browser, sdxl_server_url):
    page = browser.new_page(viewport={"width": 1100, "height": 850})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(sdxl_server_url)
    page.wait_for_function("document.getElementById('refiner').options.length > 1")
    assert page.input_value("#model") == "xl-base" and page.input_value("#width") == "64"
    assert page.input_value("#cfg") == "5"  # SDXL's default guidance
    page.fill("#prompt", "a red circle")
    set_fields(page, steps=4, seed=3)
    page.click("#refiner-section summary")
    page.select_option("#refiner", "xl-refiner")
    set_fields(page, **{"refiner-switch": 0.5})
    page.click("#generate")
    page.wait_for_selector("#gallery figure", timeout=120_000)
    info = page.inner_text("#infotext")
    assert "Model: xl-base" in info and "Refiner: xl-refiner [" in info and "Refiner switch at: 0.5" in info
    page.close()
    assert errors == [], f"JavaScript errors: {errors}"
