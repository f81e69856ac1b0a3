"""The review page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): a person's clicks become a verdict file that ``review import`` accepts."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catalog_enrichment.catalog.reviews import import_verdicts
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.review.page import write_page
from catalog_enrichment.review.sample import draw_sample, write_annotator_files
from tests.review.conftest import WrittenCatalog, written_catalog

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("needs chromium and chromedriver (make test installs them: apt chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
    finally:
        driver.quit()


def _downloaded(folder: Path, timeout: float = 20) -> Path:
    """The file the page saved into ``folder``, once Chromium has finished it. Chromium reserves a
    download's name with an empty file, writes into ``<name>.crdownload`` beside it and renames that
    over the reservation at the end: a ``.csv`` is done only once it has content and no
    ``.crdownload`` is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list(folder.iterdir())
        done = [p for p in files if p.suffix == ".csv" and p.stat().st_size > 0]
        if done and not any(p.suffix == ".crdownload" for p in files):
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"nothing downloaded into {folder}: {list(folder.iterdir())}")


def _verdicts_after_reload(driver: Any, expected: list[str], timeout: float = 10) -> list[str]:
    """The verdict each card shows after a reload. Chromium hands a page's ``localStorage`` writes to
    its storage service asynchronously, and a reload within milliseconds of a click (only a script
    is that fast) can read the store before they arrive: reload until the page shows ``expected``,
    up to ``timeout``; a page that never keeps them still fails."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        driver.refresh()
        shown = [
            "".join(b.text for b in card.find_elements(By.CSS_SELECTOR, "button.on"))
            for card in driver.find_elements(By.CSS_SELECTOR, ".item")
        ]
        if shown == expected or time.monotonic() > deadline:
            return shown
        time.sleep(0.2)


def test_clicks_on_the_review_page_become_verdicts_that_import(
    browser: tuple[Any, Path], written: WrittenCatalog, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    driver, downloads = browser
    drawn = draw_sample(written.catalog, model_version="3", size=6, seed=0)
    table, _ = write_annotator_files(
        written.catalog, drawn, tmp_path / "review" / "sample.csv", ImagePolicy()
    )
    page = write_page(table, tmp_path / "review" / "sample.html", drawn.sample_id)
    driver.get(page.as_uri())
    cards = driver.find_elements(By.CSS_SELECTOR, ".item")
    assert len(cards) == 6
    # product text is shown as text, never as markup; each card shows its image
    assert "<b>description</b>" in cards[0].find_element(By.CSS_SELECTOR, ".desc").text
    assert driver.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    driver.find_element(By.ID, "reviewer").send_keys("ana")
    cards[0].find_element(By.CSS_SELECTOR, "button[data-verdict=yes]").click()
    cards[1].find_element(By.CSS_SELECTOR, "button[data-verdict=no]").click()
    cards[2].find_element(By.CSS_SELECTOR, "button[data-verdict=unsure]").click()
    cards[2].find_element(By.CSS_SELECTOR, "button[data-verdict=yes]").click()  # changed their mind
    assert driver.find_element(By.ID, "progress").text == "3 / 6 judged"
    # a reload keeps the verdicts (local storage)
    expected = ["yes", "no", "yes", "", "", ""]
    assert _verdicts_after_reload(driver, expected) == expected
    driver.find_element(By.ID, "save").click()
    saved = _downloaded(downloads)

    result = import_verdicts(written.catalog, saved)
    assert (result.rows_read, result.inserted) == (3, 3)
    stored = {
        (r["product_id"], r["attribute"], r["value"]): r
        for r in written.catalog.keyed_rows("reviews").to_pylist()
    }
    rows = drawn.rows.to_pylist()
    for i, verdict in enumerate(["yes", "no", "yes"]):
        got = stored[(rows[i]["product_id"], rows[i]["attribute"], rows[i]["value"])]
        assert got["verdict"] == verdict and got["reviewer"] == "ana" and got["source_file"] == saved.name
    assert import_verdicts(written.catalog, saved).unchanged == 3
    # bea opens the page later on the same browser (ana's file handed in and gone from the
    # downloads): she sees none of ana's verdicts, and her "no" on a value ana said yes to is hers
    # beside ana's, not in its place
    saved.rename(tmp_path / "ana.csv")
    driver.refresh()
    name = driver.find_element(By.ID, "reviewer")
    name.clear()
    name.send_keys("bea")
    assert driver.find_element(By.ID, "progress").text == "0 / 6 judged"
    assert not driver.find_elements(By.CSS_SELECTOR, "button.on")
    for i in (0, 3):
        button = driver.find_elements(By.CSS_SELECTOR, ".item")[i].find_element(
            By.CSS_SELECTOR, "button[data-verdict=no]"
        )
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)  # below the header
        button.click()
    driver.find_element(By.ID, "save").click()
    again = _downloaded(downloads)
    assert import_verdicts(written.catalog, again).inserted == 2
    item = ("product_id", "attribute", "value")
    said = {
        (tuple(r[k] for k in item), r["reviewer"]): r["verdict"]
        for r in written.catalog.keyed_rows("reviews").to_pylist()
    }
    key = [tuple(rows[i][k] for k in item) for i in range(4)]
    assert said == {
        (key[0], "ana"): "yes", (key[1], "ana"): "no", (key[2], "ana"): "yes",
        (key[0], "bea"): "no", (key[3], "bea"): "no",
    }  # fmt: skip


def test_merchant_text_that_looks_like_markup_is_shown_as_text(
    browser: tuple[Any, Path], tmp_path: Path
) -> None:
    """A title with ``<!--<script>`` once blanked the page (the embedded JSON escaped only ``</``)."""
    from selenium.webdriver.common.by import By

    from tests.review.test_sample import HOSTILE_IDS, HOSTILE_TITLES

    driver, downloads = browser
    hostile = written_catalog(tmp_path / "lakehouse", ids=HOSTILE_IDS, titles=HOSTILE_TITLES)
    drawn = draw_sample(hostile.catalog, model_version="3", size=100, seed=0)
    table, _ = write_annotator_files(
        hostile.catalog, drawn, tmp_path / "review" / "sample.csv", ImagePolicy()
    )
    driver.get(write_page(table, tmp_path / "review" / "sample.html", drawn.sample_id).as_uri())
    cards = driver.find_elements(By.CSS_SELECTOR, ".item")
    assert len(cards) == table.num_rows > 0
    shown = "\n".join(c.text for c in cards)
    assert "<!--<script>document.body.innerHTML=''</script>" in shown and "</script><script>" in shown
    # the verdict file the page saves holds no live formula, and imports the texts as they were
    driver.find_element(By.ID, "reviewer").send_keys("=ana")
    for card in cards:
        card.find_element(By.CSS_SELECTOR, "button[data-verdict=yes]").click()
    driver.find_element(By.ID, "save").click()
    saved = _downloaded(downloads)
    with saved.open(newline="") as f:
        cells = [c for row in csv.reader(f) for c in row]
    assert not [c for c in cells if re.match(r"[=+\-@\t\r]", c)]
    assert import_verdicts(hostile.catalog, saved).inserted == len(cards)
    stored = hostile.catalog.keyed_rows("reviews").to_pylist()
    assert {r["product_id"] for r in stored} == set(table["product_id"].to_pylist())
    assert {r["reviewer"] for r in stored} == {"=ana"}


def test_verdicts_a_page_kept_before_reviewers_were_kept_apart_are_saved_under_their_names(
    browser: tuple[Any, Path], written: WrittenCatalog, tmp_path: Path
) -> None:
    """The browser holds verdicts an older page stored by value alone: one with the name it was
    clicked under, two older still without a name (none typed any more). Saved under that name and,
    the nameless ones, under the name typed now - but not where that reviewer judged the value
    themselves (the file would give one reviewer two verdicts, which import refuses)."""
    from selenium.webdriver.common.by import By

    driver, downloads = browser
    drawn = draw_sample(written.catalog, model_version="3", size=6, seed=0)
    table, _ = write_annotator_files(
        written.catalog, drawn, tmp_path / "review" / "sample.csv", ImagePolicy()
    )
    page = write_page(table, tmp_path / "review" / "sample.html", drawn.sample_id)
    rows = drawn.rows.to_pylist()
    ids = ["\u001f".join(rows[i][k] for k in ("product_id", "attribute", "value")) for i in range(3)]
    old = {
        "reviewer": "",
        "verdicts": {
            ids[0]: {"verdict": "no", "reviewed_at": "2026-11-03T08:00:00Z", "reviewer": "cy"},
            ids[1]: {"verdict": "yes", "reviewed_at": "2026-11-03T08:01:00Z"},
            ids[2]: {"verdict": "no", "reviewed_at": "2026-11-03T08:02:00Z"},
        },
    }
    driver.get(page.as_uri())
    driver.execute_script(
        "localStorage.setItem(arguments[0], arguments[1])",
        f"catalog-enrich-review:{drawn.sample_id}",
        json.dumps(old),
    )
    # the write reaches Chromium's storage service asynchronously (see _verdicts_after_reload):
    # reload until the page has read it
    deadline = time.monotonic() + 10
    while True:
        driver.refresh()
        read = driver.execute_script("return Object.keys(state.verdicts).length")
        if read == len(old["verdicts"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    driver.find_element(By.ID, "reviewer").send_keys("bo")
    driver.find_elements(By.CSS_SELECTOR, ".item")[2].find_element(
        By.CSS_SELECTOR, "button[data-verdict=yes]"
    ).click()
    driver.find_element(By.ID, "save").click()
    saved = _downloaded(downloads)
    with saved.open(newline="") as f:
        got = sorted((r["product_id"], r["reviewer"], r["verdict"]) for r in csv.DictReader(f))
    assert got == sorted(
        [
            (rows[0]["product_id"], "cy", "no"),
            (rows[1]["product_id"], "bo", "yes"),
            (rows[2]["product_id"], "bo", "yes"),
        ]
    )
    assert import_verdicts(written.catalog, saved).inserted == 3
