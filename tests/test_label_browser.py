"""A real browser (headless Debian chromium through selenium) labels a small round through `dpojax label`.

The JSON on disk must match the clicks and key presses after each acknowledged answer; the server is killed
with SIGKILL mid-round and started again, and nothing clicked is lost and the page resumes where labeling
stopped. Skips only where chromium is absent and CI is not set; in CI it must run.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import free_port

from dpojax.feedback.labels import read_labels
from dpojax.feedback.rounds import Round, write_round

pytestmark = pytest.mark.slow
PROMPTS = ["a red cube", "a blue ball", "a green tree", "a yellow star"]
K = 3


class LabelServer:
    """`dpojax label` in its own process, as a user runs it."""

    def __init__(self, round_dir, port, *extra):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen([sys.executable, "-m", "dpojax.cli", "label", str(round_dir), "--port",
                                      str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 90)
        line = self.proc.stdout.readline() if ready else ""
        assert f"127.0.0.1:{port}/" in line, f"server did not start: {line!r}"
        self.url = f"http://127.0.0.1:{port}/"

    def kill(self, sig=signal.SIGKILL):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def _until(driver, condition, what, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition(driver)
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; status: {_text(driver, 'status')!r}")


def _text(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _saved(driver, count):
    """Wait until the page has ``count`` acknowledged answers since it loaded and none is in flight."""
    from selenium.webdriver.common.by import By

    def done(d):
        status = d.find_element(By.ID, "status")
        return status.get_attribute("data-saved") == str(count) and status.get_attribute("data-pending") == "0"

    _until(driver, done, f"{count} saved answers")
    assert _text(driver, "status") == "saved \u2713"


def _on_prompt(driver, index):
    _until(driver, lambda d: _text(d, "progress").startswith(f"prompt {index + 1} of {len(PROMPTS)}"),
           f"prompt {index + 1}")
    assert _text(driver, "prompt-text") == PROMPTS[index]


def _cards(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#grid .card")


def _shown_marks(driver):
    return [int(card.get_attribute("data-mark")) for card in _cards(driver)]


def _press(driver, *keys):
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def _on_disk(round_dir, annotator):
    return json.loads((round_dir / "labels" / f"{annotator}.json").read_text())


def test_label_a_round_in_a_browser_and_survive_sigkill(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    images = np.random.RandomState(0).randint(0, 256, (len(PROMPTS), K, 24, 24, 3)).astype(np.uint8)
    round_dir = write_round(tmp_path / "round", Round(PROMPTS, images, {"x": np.zeros((len(PROMPTS), 1))}))
    port = free_port()
    server = LabelServer(round_dir, port)

    # the page asks who labels; the images it shows are the round's files for this prompt
    browser.get(server.url)
    _until(browser, lambda d: d.find_element(By.ID, "who").is_displayed(), "the annotator form")
    browser.find_element(By.ID, "annotator-input").send_keys("alice")
    browser.find_element(By.ID, "start").click()
    _on_prompt(browser, 0)
    sources = [card.find_element(By.TAG_NAME, "img").get_attribute("src") for card in _cards(browser)]
    assert [s.rsplit("/", 1)[1] for s in sources] == ["00000.png", "00001.png", "00002.png"]

    # prompt 0 by mouse: image 1 good (click), image 3 bad (two clicks cycle good -> bad)
    _cards(browser)[0].find_element(By.TAG_NAME, "img").click()
    _saved(browser, 1)
    assert _on_disk(round_dir, "alice") == [[1, 0, 0], None, None, None]
    _cards(browser)[2].find_element(By.TAG_NAME, "img").click()
    _cards(browser)[2].find_element(By.TAG_NAME, "img").click()
    _saved(browser, 3)
    assert _on_disk(round_dir, "alice") == [[1, 0, -1], None, None, None]
    assert _shown_marks(browser) == [1, 0, -1]

    # prompt 1 by keyboard: Enter moves on; "2" good; "1" "1" bad; then the bad button of image 3, on and off
    _press(browser, Keys.ENTER)
    _on_prompt(browser, 1)
    _press(browser, "2", "1", "1")
    _saved(browser, 6)
    _cards(browser)[2].find_element(By.CSS_SELECTOR, "button.bad").click()
    _saved(browser, 7)
    assert _on_disk(round_dir, "alice")[1] == [-1, 1, -1]
    _cards(browser)[2].find_element(By.CSS_SELECTOR, "button.bad").click()
    _saved(browser, 8)
    assert _on_disk(round_dir, "alice") == [[1, 0, -1], [-1, 1, 0], None, None]

    # SIGKILL mid-round: everything acknowledged is on disk, nothing else
    server.kill(signal.SIGKILL)
    assert _on_disk(round_dir, "alice") == [[1, 0, -1], [-1, 1, 0], None, None]
    assert sorted(p.name for p in (round_dir / "labels").iterdir()) == ["alice.json"]

    # restarted, the page resumes at the first unlabeled prompt and shows earlier answers
    server = LabelServer(round_dir, port)
    browser.get(server.url)
    _until(browser, lambda d: d.find_element(By.ID, "who").is_displayed(), "the annotator form")
    assert browser.find_element(By.ID, "annotator-input").get_attribute("value") == "alice"  # remembered
    browser.find_element(By.ID, "start").click()
    _on_prompt(browser, 2)
    assert "2 of 4 prompts labeled" in _text(browser, "status")
    _press(browser, Keys.ARROW_LEFT)
    _on_prompt(browser, 1)
    assert _shown_marks(browser) == [-1, 1, 0]
    browser.find_element(By.ID, "next").click()
    _on_prompt(browser, 2)

    # "done" with nothing marked labels the prompt as all ties; the last prompt finishes the round
    browser.find_element(By.ID, "done").click()
    _saved(browser, 1)
    _on_prompt(browser, 3)
    _press(browser, "2")
    _saved(browser, 2)
    _press(browser, Keys.ENTER)
    _until(browser, lambda d: d.find_element(By.ID, "complete").is_displayed(), "the round-complete note")
    expected_alice = [[1, 0, -1], [-1, 1, 0], [0, 0, 0], [0, 1, 0]]
    assert _on_disk(round_dir, "alice") == expected_alice
    server.kill(signal.SIGTERM)

    # a second annotator named on the command line; the labels of both are averaged per prompt
    server = LabelServer(round_dir, port, "--annotator", "bob")
    browser.get(server.url)
    _on_prompt(browser, 0)
    assert _text(browser, "annotator-name") == "bob" and not browser.find_element(By.ID, "who").is_displayed()
    _press(browser, "1", "1")  # bad
    _saved(browser, 2)
    server.kill(signal.SIGKILL)
    assert _on_disk(round_dir, "bob") == [[-1, 0, 0], None, None, None]
    labels = read_labels(round_dir)
    assert labels.annotators == ["alice", "bob"]
    np.testing.assert_array_equal(labels.labeled, [True] * 4)
    np.testing.assert_allclose(labels.scores, [[0, 0, -0.5], *expected_alice[1:]])
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []  # no script or request error
