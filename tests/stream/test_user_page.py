"""The candidate view's user page (/users/{id}) over a live replay: the real worker (tests/workerkit.py)
on the session's Tansu, Valkey, tritonserver and milvus-lite, then `mind view` reading the same stores
and the checkpoint. Checked three ways: the gathered data against the model itself (the COUPLING
output of the real Triton tower equals the eager model's routing weights), the HTML, and the page in a
real headless Chromium driven by Selenium, which also saves a screenshot.

The browser test needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`;
`make install` does it when run as root) and selenium (the `dev` extra); without them it is skipped.
Screenshots go to $MIND_TEST_ARTIFACTS (default: the test's tmp dir).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from viewkit import View, running_view
from waiting import until
from workerkit import Reader, Running, covers, make_clicks, publish, setup_topics

from stream.inspect import Inspector
from stream.schemas import Click, dump_click
from stream.settings import Settings, redis_client
from stream.state import WindowState
from stream.window import load_catalog

try:  # the dev extra; without it the browser test is skipped, saying how to get it
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

USERS = [str(u) for u in range(6)]
PER_USER = 10  # more than the window (8): the window holds the last 8, K'_u = log2(8) = 3 interests


@dataclass
class Replay:
    view: View
    settings: Settings
    wm: Any  # conftest.WorkerModel
    uid: str
    clicks: list[Click]


@pytest.fixture(scope="module")
def replay(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replay]:
    """Clicks of USERS through the real worker until every user has a recall message, then the view on
    the same topics and stores (the worker keeps running, so new clicks keep refreshing)."""
    wm = worker_model
    uid = f"p{time.time_ns():x}"[-9:]
    s = wm.settings(kafka_bootstrap, redis_url, uid)
    setup_topics(s)
    clicks = make_clicks(wm, uid, USERS, per_user=PER_USER, seed=4)
    recall = Reader(kafka_bootstrap, s.recall_topic, s.partitions)
    worker = Running(s, wm).start()
    try:
        publish(kafka_bootstrap, s.clicks_topic, [(c.user_id, dump_click(c)) for c in clicks])
        last = {c.user_id: c.event_id for c in clicks}
        recall.until(covers(last), 120)
        env = {
            "MIND_PARTITIONS": str(s.partitions),
            "MIND_REDIS_URL": redis_url,
            "MIND_TRITON_URL": wm.triton_url,
            "MIND_TRITON_MODEL": wm.triton_model,
            "MIND_MILVUS_URI": wm.milvus_uri,
            "MIND_MILVUS_PREFIX": wm.milvus_prefix,
            "MIND_CHECKPOINT": str(wm.checkpoint),
            "MIND_WINDOW_LEN": str(wm.max_len),
        }
        work = tmp_path_factory.mktemp("pageview")
        with running_view(
            kafka_bootstrap, [], work, uid, lambda h: h.get("users", 0) >= len(USERS), env=env, timeout=120
        ) as v:
            yield Replay(v, s, wm, uid, clicks)
    finally:
        recall.close()
        worker.close()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def stored(replay: Replay, user: str) -> dict[str, Any]:
    status, _, body = get(f"{replay.view.url}/users/{user}/candidates")
    assert status == 200, body
    return json.loads(body)


def latest(replay: Replay, user: str) -> dict[str, Any]:
    status, _, body = get(f"{replay.view.url}/users/{user}/latest")
    assert status == 200, body
    return json.loads(body)


def expected_interests(replay: Replay, user: str) -> int:
    part = int(latest(replay, user)["click_partition"])
    client = redis_client(replay.settings)
    try:
        got = WindowState(client, replay.settings.clicks_topic, replay.settings.window_len).read_interests(
            part, user
        )
    finally:
        client.close()
    assert got is not None
    return int(got[0].shape[0])


def click_again(replay: Replay, user: str, n: int) -> Click:
    """One more click by `user` (an item of its own history): the worker refreshes, the view follows."""
    item = replay.wm.inter.items.raw_of(int(replay.wm.inter.sequences[int(user)][n % 3]))
    click = Click(f"{replay.uid}-again-{user}-{n}", user, item, time.time())
    publish(replay.settings.kafka_bootstrap or "", replay.settings.clicks_topic, [(user, dump_click(click))])
    return click


# ---- the data behind the page, against the model itself -----------------------------------------------


def test_inspector_reads_what_the_worker_wrote(replay: Replay) -> None:
    """Window, interests, per-interest top items and the tower's COUPLING output for one user, gathered
    in-process from the same stores: coupling equals the eager model's routing weights for the window."""
    user = USERS[0]
    msg = stored(replay, user)
    msg_full = {**msg, **latest(replay, user)}  # the API's answer + click_partition / click_offset
    wm = replay.wm
    s = replay.settings.model_copy(update={"checkpoint": wm.checkpoint})
    inspector = Inspector(s)
    try:
        look = inspector.look(msg_full)
    finally:
        inspector.close()
    assert not look.errors, look.notes
    history = [wm.inter.items.get(c.item_id) for c in replay.clicks if c.user_id == user]
    window = history[-wm.max_len :]
    assert [b.index for b in look.behaviours] == window
    catalog = load_catalog(wm.checkpoint)
    assert [b.item_id for b in look.behaviours] == [catalog.raw_item(i) for i in window]
    assert all(b.side for b in look.behaviours)  # synthetic items carry a category side id
    assert all(re.fullmatch(r"category=\d+", x) for b in look.behaviours for x in b.side)
    k = expected_interests(replay, user)
    assert len(look.interests) == k == 3
    assert all(len(it.top) == 10 for it in look.interests)
    assert sum(it.candidates for it in look.interests) == len(msg["candidates"])
    # the tower's COUPLING output is the model's own routing weights for this window
    items, side, prof = catalog.tower_inputs([window], [catalog.profile_row(user, [])], wm.max_len)
    with torch.inference_mode():
        _, active, w = wm.model.capsules(torch.from_numpy(items), torch.from_numpy(side))
    assert int(active.sum()) == k
    assert look.coupling is not None and look.coupling.shape == (len(window), k)
    np.testing.assert_allclose(look.coupling, w[0, : len(window), :k].numpy(), atol=1e-5)
    np.testing.assert_allclose(look.coupling.sum(1), 1.0, atol=1e-5)  # softmax over interests per behaviour
    assert look.coupling_version == wm.model_version
    gathered = sorted(p for it in look.interests for p, _ in it.gathered)
    assert gathered == list(range(len(window)))  # every behaviour goes to exactly one interest


# ---- the page as HTML ---------------------------------------------------------------------------------


def test_page_html(replay: Replay) -> None:
    user = USERS[1]
    pages: list[tuple[int, dict[str, str], bytes]] = []

    def settled() -> bool:
        """The view consumes the recall topic on its own; until it holds the user's newest list, the page
        rightly notes that the stored interests are newer than the list it shows."""
        pages.append(get(f"{replay.view.url}/users/{user}"))
        return 'id="notes"' not in pages[-1][2].decode()

    until(
        settled,
        what=lambda: f"the page without notes: {re.findall(r'<li>(.*?)</li>', pages[-1][2].decode())}",
    )
    status, headers, body = pages[-1]
    msg = stored(replay, user)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    page = body.decode()
    k = expected_interests(replay, user)
    assert page.count('class="interest-panel') == k
    assert page.count('class="candidate"') == len(msg["candidates"]) > 0
    assert page.count('class="behaviour"') == replay.wm.max_len
    png = re.search(r'id="heatmap"[^>]* src="data:image/png;base64,([^"]+)"', page)
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert f">{msg['model_version']}<" in page and msg["candidates"][0]["item_id"] in page
    assert 'id="notes"' not in page, re.findall(r"<li>(.*?)</li>", page)  # nothing missing
    # the best n only, and the same errors as the API
    assert get(f"{replay.view.url}/users/{user}?n=3")[2].decode().count('class="candidate"') == 3
    assert get(f"{replay.view.url}/users/nobody")[0] == 404
    for name, ctype in (("user.js", "text/javascript"), ("user.css", "text/css")):
        status, headers, _ = get(f"{replay.view.url}/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(ctype)


def test_latest_follows_new_clicks(replay: Replay) -> None:
    user = USERS[2]
    before = latest(replay, user)
    click = click_again(replay, user, 1)
    after = until(
        lambda: (got := latest(replay, user))["event_id"] == click.event_id and got,
        what=f"the view's latest message for {user} to be {click.event_id}",
        timeout=60,
    )
    assert after["click_offset"] > before["click_offset"] and after["version"] != before["version"]


# ---- the page in a real browser ---------------------------------------------------------------------------


def chromium() -> tuple[str, str]:
    """(browser, driver) paths, or skip saying how to get them."""
    if webdriver is None:
        pytest.skip("needs selenium: pip install -e '.[dev]'")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip(
            "needs Chromium and chromedriver: `apt-get install chromium chromium-driver` on Debian "
            "(`make install` does it when run as root)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path, driver_path = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1400,1000")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def test_page_in_chromium(replay: Replay, browser: Any, tmp_path: Path) -> None:
    user = USERS[3]
    msg = stored(replay, user)
    k = expected_interests(replay, user)
    browser.get(f"{replay.view.url}/users/{user}")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "live").text.startswith("live: up to date"))
    panels = browser.find_elements(By.CSS_SELECTOR, "article.interest-panel")
    assert len(panels) == k
    assert all(p.find_elements(By.CSS_SELECTOR, "ol.top li") for p in panels)  # each its own top items
    rows = browser.find_elements(By.CSS_SELECTOR, "#candidate-table tr.candidate")
    assert len(rows) == len(msg["candidates"])
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [
        c["item_id"] for c in msg["candidates"]
    ]
    heatmap = browser.find_element(By.ID, "heatmap")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap) > 200
    assert heatmap.is_displayed() and heatmap.size["width"] > 200
    assert browser.find_element(By.ID, "model-version").text == msg["model_version"]
    assert browser.find_element(By.ID, "freshness").text.endswith("ago")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no script error, no blocked resource (the page's CSP)

    artifacts = Path(os.environ.get("MIND_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, int(height) + 140)  # the whole page in one screenshot
    shot = artifacts / "user_page.png"
    assert browser.save_screenshot(str(shot))
    print(f"\nscreenshot of /users/{user}: {shot}")

    # a new click: the page notices the new recall message and reloads itself
    click = click_again(replay, user, 2)
    wait.until(lambda d: d.find_element(By.ID, "event-id").text == click.event_id)
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.interest-panel")) == expected_interests(
        replay, user
    )
