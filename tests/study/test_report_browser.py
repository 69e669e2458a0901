"""The study report in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium. The page loads without console errors, every image
decodes and renders, the statistics tables have one row per setting; a full-page screenshot is
saved as a test artefact (in $RATIORL_ARTEFACTS, else the test's tmp_path; the path is printed).

Skipped, with the reason, when selenium, chromium or chromedriver is missing:
``apt-get install chromium chromium-driver`` and ``pip install selenium``. Selenium is pointed at
/usr/bin/chromedriver and the Debian chromium, so Selenium Manager never downloads anything.
"""

import os
import shutil

import pytest

try:  # the synthetic study of test_report.py (a package or a rootdir-less test folder)
    from .test_report import LABELS, METRICS, build_study, small_png
except ImportError:
    from test_report import LABELS, METRICS, build_study, small_png

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

DRIVER = "/usr/bin/chromedriver"
BROWSER = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)),
               shutil.which("chromium"))


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(DRIVER):
        pytest.skip(f"{DRIVER} not found (apt-get install chromium-driver)")
    if not BROWSER:
        pytest.skip("chromium not found (apt-get install chromium)")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never reach the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def loaded(browser, tmp_path_factory):
    from ratiorl.study.report import write_study_report

    d = build_study(str(tmp_path_factory.mktemp("study")), small_png())
    path = write_study_report(d)
    browser.get("file://" + os.path.abspath(path))
    assert browser.execute_script("return document.readyState") == "complete"
    return browser


def test_the_page_loads_without_console_errors(loaded):
    logs = loaded.get_log("browser")
    errors = [e for e in logs if e.get("level") in ("SEVERE", "ERROR")]
    assert errors == [], errors
    assert loaded.title == "Study report: synthetic"


def test_every_image_renders(loaded):
    images = loaded.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) == 2 + 3 * (len(LABELS) * 3 - 1)
    bad = [im for im in images if not (im[1] and im[2] > 0 and im[3] > 0)]
    assert bad == []
    # the two study figures are laid out on the page, not just decoded
    widths = loaded.execute_script("return Array.from(document.images).slice(0, 2)"
                                   ".map(i => i.getBoundingClientRect().width)")
    assert all(w > 100 for w in widths), widths


def test_the_tables_have_the_expected_rows(loaded):
    from selenium.webdriver.common.by import By

    for metric in METRICS:
        rows = loaded.find_elements(By.CSS_SELECTOR, f"table.stats[data-metric='{metric}'] tr[data-setting]")
        assert [r.get_attribute("data-setting") for r in rows] == LABELS
        assert all(r.is_displayed() for r in rows)
    diffs = loaded.find_elements(By.CSS_SELECTOR, "table.differences tr[data-setting]")
    assert len(diffs) == (len(LABELS) - 1) * len(METRICS) * 2
    verdicts = {r.find_elements(By.TAG_NAME, "td")[5].text for r in diffs}  # next to the difference
    assert verdicts == {"resolved", "within noise"}


def test_screenshot_artefact(loaded, tmp_path, capsys):
    out_dir = os.environ.get("RATIORL_ARTEFACTS") or str(tmp_path)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "study_report.png")
    height = loaded.execute_script("return document.documentElement.scrollHeight")
    loaded.set_window_size(1280, min(int(height) + 50, 16000))
    assert loaded.save_screenshot(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with capsys.disabled():
        print(f"\nstudy report screenshot: {path}")
