"""End to end in headless Chromium: the page at / uploads an image and shows its boxes.

Needs Debian's chromium and chromium-driver (.ci/run installs them) and selenium; skipped, with the
reason, where they are absent.
"""

from __future__ import annotations

import shutil

import pytest
from serve_helpers import cell_square, make_image

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_an_image_and_see_the_boxes(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "shapes.png"
    image.write_bytes(make_image((320, 320), [cell_square(0, 1, 1), cell_square(1, 5, 6)]))
    browser.get(f"{live_server.url}/")
    wait = WebDriverWait(browser, 30)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "classes: circle, triangle"))
    browser.find_element(By.ID, "file").send_keys(str(image))
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("data-state") == "done", status.text
    assert status.text.startswith("2 detections") and "320x320 PNG" in status.text
    rows = browser.find_elements(By.CSS_SELECTOR, "#detections tr.detection")
    cells = sorted(tuple(td.text for td in row.find_elements(By.TAG_NAME, "td"))[1:] for row in rows)
    assert cells == [
        ("circle", "1.000", "32.0, 32.0, 64.0, 64.0"),
        ("triangle", "1.000", "192.0, 160.0, 224.0, 192.0"),
    ]
    # the canvas shows the image with the boxes: a pixel of the circle box outline has the box colour
    canvas = browser.find_element(By.ID, "canvas")
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("320", "320")
    pixel = browser.execute_script(
        "return Array.from(arguments[0].getContext('2d').getImageData(32, 48, 1, 1).data)", canvas
    )
    assert pixel[:3] == [230, 25, 75]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_the_page_reports_errors(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bogus = tmp_path / "notes.png"
    bogus.write_text("this is text, not an image")
    browser.get(f"{live_server.url}/")
    browser.find_element(By.ID, "file").send_keys(str(bogus))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "error")
    assert (
        "415" in browser.find_element(By.ID, "status").text
        and "not an image" in browser.find_element(By.ID, "status").text
    )
