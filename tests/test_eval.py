"""``dpojax eval`` on the tiny SDXL pipeline (CPU, subprocesses with 1 device).

- Bad input (a missing model folder, an unknown scorer, an empty prompt file, a scorer option no scorer takes, a
  scorer without its model files) is a one-line error naming it.
- A policy trained by the brightness D3PO demo (the settings ``test_d3po_online.py`` shows to brighten images)
  beats the initial model: its brightness win rate is above 0.5 with a 95% interval that excludes 0.5.
- Its report renders in headless Chromium (every image loads; the screenshot is not blank).
- An eval killed with SIGKILL once its first images are cached resumes: the restarted run samples only the
  missing images, leaves the cached files untouched and writes the same results.json as the uninterrupted run.
"""

import json
import re
import signal
import subprocess
import time
from io import BytesIO

import numpy as np
import pytest
from helpers import cli_env, dpojax_command, run_dpojax
from PIL import Image

from dpojax.cli import main

PROMPTS = ["a cat", "a dog", "a red barn", "a lighthouse at night", "a bowl of fruit", "a forest path"]
SEEDS = 8  # 48 image pairs
SAMPLER = ["--num-steps", "6", "--guidance", "5", "--resolution", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_sdxl):
    root = tmp_path_factory.mktemp("eval")
    (root / "tiny-sdxl").symlink_to(tiny_sdxl)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(d3po_brightness_run):
    """The brightness D3PO demo's policy (the session's run, tests/conftest.py)."""
    run, done = d3po_brightness_run
    assert done.returncode == 0, done.stderr
    return run / "final"


def eval_args(workdir, trained, out):
    return ["eval", trained, "--against", workdir / "tiny-sdxl", "--prompts", workdir / "prompts.txt", "--scorers",
            "brightness", "--out", out, "--seeds", SEEDS, *SAMPLER]


@pytest.fixture(scope="module")
def evaluated(workdir, trained):
    out = workdir / "eval"
    done = run_dpojax(workdir, *eval_args(workdir, trained, out))
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    return out, done


def test_bad_input_is_one_line_naming_it(tmp_path, tiny_sdxl, capsys):
    prompts, empty = tmp_path / "prompts.txt", tmp_path / "empty.txt"
    prompts.write_text("a cat\n")
    empty.write_text("\n  \n")
    base = ["--prompts", str(prompts), "--out", str(tmp_path / "out")]
    cases = [([str(tmp_path / "nowhere"), *base], "nowhere"),
             ([str(tiny_sdxl), "--against", str(tmp_path / "missing-ref"), *base], "missing-ref"),
             ([str(tiny_sdxl), *base, "--scorers", "brightness,sharpness"], "'sharpness'"),
             ([str(tiny_sdxl), "--prompts", str(empty), "--out", str(tmp_path / "out")], "empty.txt"),
             ([str(tiny_sdxl), *base, "--scorer-option", "pickscore_model=/models/pickscore"], "pickscore_model"),
             ([str(tiny_sdxl), *base, "--scorers", "pickscore"], "pickscore_model=")]
    for args, culprit in cases:
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dpojax eval: error:") and culprit in err, err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
def test_trained_policy_beats_the_initial_model(evaluated):
    out, done = evaluated
    results = json.loads((out / "results.json").read_text())
    win = results["scorers"]["brightness"]["win_rate"]
    print(f"brightness win rate {win['rate']:.3f} [{win['low']:.3f}, {win['high']:.3f}] ({win['wins']} wins, "
          f"{win['losses']} losses, {win['ties']} ties)")
    assert win["wins"] + win["losses"] + win["ties"] == len(PROMPTS) * SEEDS == len(results["rows"])
    assert win["rate"] > 0.5 and win["low"] > 0.5
    assert "win rate of model" in done.stdout and "Wilson" in done.stdout
    model, reference = (results["scorers"]["brightness"][role] for role in ("model", "reference"))
    assert model["mean"] > reference["mean"] and model["low"] < model["mean"] < model["high"]
    row = results["rows"][0]
    assert set(row["scores"]["brightness"]) == {"model", "reference", "winner"}
    assert all((out / path).is_file() for path in row["images"].values())


@pytest.mark.slow
def test_report_renders_in_chromium(evaluated, browser):
    out, _ = evaluated
    browser.get((out / "report.html").as_uri())
    images = browser.find_elements("css selector", "img")
    assert len(images) == 2 * len(PROMPTS) * SEEDS
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
               for img in images)
    assert browser.find_elements("css selector", "svg rect")  # the histograms
    shot = np.asarray(Image.open(BytesIO(browser.get_screenshot_as_png())).convert("L"), np.float64)
    assert shot.var() > 100, "the report's screenshot is blank"


@pytest.mark.slow
def test_killed_eval_resumes_from_its_cache(workdir, trained, evaluated):
    out = workdir / "eval_killed"
    proc = subprocess.Popen(dpojax_command(*eval_args(workdir, trained, out)), env=cli_env(workdir), cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("images/model-*/manifest.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the eval ended before it could be killed"
    assert not (out / "results.json").exists()
    manifests = {m.parent: json.loads(m.read_text())["images"] for m in out.glob("images/*/manifest.json")}
    cached = {png: png.stat().st_mtime_ns for folder, names in manifests.items()
              for png in (folder / f"{name}.png" for name in names)}
    assert 0 < len(cached) < 2 * len(PROMPTS) * SEEDS

    done = run_dpojax(workdir, *eval_args(workdir, trained, out))
    assert done.returncode == 0, done.stderr
    sampled, from_cache = map(int, re.search(r"sampled (\d+) images, (\d+) from the cache", done.stdout).groups())
    assert from_cache > 0 and sampled + from_cache == 2 * len(PROMPTS) * SEEDS
    assert from_cache == len(cached) and all(p.stat().st_mtime_ns == mtime for p, mtime in cached.items())
    assert (out / "results.json").read_text() == (evaluated[0] / "results.json").read_text()
