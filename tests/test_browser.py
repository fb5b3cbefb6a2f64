"""The docs site in a real browser: headless Chromium opens the index and a model page, and they render."""
import shutil, tempfile
from pathlib import Path

import pytest

from conftest import ROOT
from tools.docs import build_site
from test_docs import docs_cache

ARTIFACTS = ROOT/"tests"/"artifacts"/"browser"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromium-driver are not installed: run `make sysdeps`")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The pages the browser opens (executed notebooks come from the docs tests' cache when they ran first)."
    out = tmp_path_factory.mktemp("browser")/"_site"
    build_site(out, names=["index", "21_model.nets", "32_train.trainer"], cache=docs_cache(tmp_path_factory), log=print)
    return out


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="ncf-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1600"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS/f"{name}.png"
    assert driver.save_screenshot(str(path))
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
    return path


def test_index_renders_and_navigates_to_the_model_page(site, browser):
    from selenium.webdriver.common.by import By
    browser.get((site/"index.html").as_uri())
    assert browser.title == "ncf"
    assert browser.execute_script("return document.readyState") == "complete"
    h1 = browser.find_element(By.TAG_NAME, "h1")
    assert h1.is_displayed() and h1.text.startswith("ncf")
    nav = browser.find_element(By.CSS_SELECTOR, "nav.ncf-nav")
    assert nav.is_displayed() and nav.size["width"] > 100
    main = browser.find_element(By.TAG_NAME, "main")
    assert main.location["x"] >= nav.size["width"] - 1               # the sidebar does not cover the content
    screenshot(browser, "index")

    nav.find_element(By.LINK_TEXT, "21_model.nets").click()
    assert browser.current_url.endswith("/21_model.nets.html")
    assert browser.title.startswith("model")
    current = browser.find_element(By.CSS_SELECTOR, 'nav.ncf-nav a[aria-current="page"]')
    assert current.text == "21_model.nets"
    code = browser.find_elements(By.CSS_SELECTOR, ".jp-CodeCell")
    assert code and any("class NCF" in c.text for c in code)
    assert browser.execute_script("return document.body.scrollHeight") > 1600    # the whole notebook, not an empty shell
    screenshot(browser, "21_model.nets")


def test_training_plot_is_decoded_by_the_browser(site, browser):
    from selenium.webdriver.common.by import By
    browser.get((site/"32_train.trainer.html").as_uri())
    imgs = [i for i in browser.find_elements(By.TAG_NAME, "img") if i.get_attribute("src").startswith("data:image/png")]
    assert imgs
    browser.execute_script("arguments[0].scrollIntoView()", imgs[0])
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", imgs[0]) > 300
    screenshot(browser, "32_train.trainer-plot")
