"""What ``dpojax eval`` writes and prints about its intervals, on cached images made here (no sampling): each
statistic of ``results.json`` names its method and holds its numbers of prompts and images, and equals SciPy's
interval over the per-prompt values of the rows it wrote; the terminal line and ``report.html`` say the same. With
one seed the numbers are the per-image ones (Student t, Wilson score); a degenerate case (all wins, one prompt)
prints an interval or says there is none."""

import dataclasses
import json

import numpy as np
import pytest
import scipy.stats

from dpojax.evaluate.images import ImageCache, Row, Sampling
from dpojax.evaluate.report import render_report
from dpojax.evaluate.run import describe, summarize
from dpojax.evaluate.stats import mean_interval, win_rate
from dpojax.scorers.registry import make_scorer

PROMPTS = ["a cat", "a dog", "a red barn", "a lighthouse at night", "a bowl of fruit", "a forest path"]


def run_summary(tmp_path, prompts, seeds, model_pixels, reference_pixels):
    """``summarize`` over uniform 8 px images of the given pixel values (one per row, prompt-major), so the
    brightness of each is its value / 255."""
    out = tmp_path / "out"
    sampling = Sampling(num_steps=1, guidance=1.0, resolution=8, batch_size=4)
    rows = [Row(i, prompt, seed) for i, prompt in enumerate(prompts) for seed in range(seeds)]
    caches = {}
    for role, pixels in (("model", model_pixels), ("reference", reference_pixels)):
        folder = tmp_path / role
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        caches[role] = ImageCache(out, role, folder, sampling)
        pixels = np.asarray(pixels, np.uint8).reshape(len(rows), 1, 1, 1)
        caches[role].add(rows, np.broadcast_to(pixels, (len(rows), 8, 8, 3)))
    results = summarize(caches, rows, [make_scorer("brightness")], out, seeds)
    assert json.loads(json.dumps(results)) == results  # what results.json holds
    return results


def correlated_pixels(seeds, seed=0):
    """Pixel values with a per-prompt effect shared by both models and a per-prompt gain of the model."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(120, 30, (len(PROMPTS), 1))
    gain = rng.normal(6, 12, (len(PROMPTS), 1))
    reference = effect + rng.normal(0, 20, (len(PROMPTS), seeds))
    model = reference + gain + rng.normal(0, 8, (len(PROMPTS), seeds))
    return np.clip(np.rint(model), 0, 255).ravel(), np.clip(np.rint(reference), 0, 255).ravel()


def row_scores(results, role):
    return np.array([row["scores"]["brightness"][role] for row in results["rows"]])


def test_results_describe_and_report_name_the_prompt_as_unit(tmp_path):
    seeds = 4
    results = run_summary(tmp_path, PROMPTS, seeds, *correlated_pixels(seeds))
    n_prompts, n_images = len(PROMPTS), len(PROMPTS) * seeds
    assert (results["n_prompts"], results["n_images"], results["seeds"]) == (n_prompts, n_images, seeds)
    methods = results["methods"]
    assert methods["unit"].startswith("the prompt")
    assert methods["mean"].startswith("Student t over per-prompt means")
    assert methods["win_rate"].startswith("Student t over per-prompt win fractions")
    stats = results["scorers"]["brightness"]
    for role in ("model", "reference"):
        per_prompt = row_scores(results, role).reshape(n_prompts, seeds).mean(axis=1)
        low, high = scipy.stats.t.interval(0.95, n_prompts - 1, loc=per_prompt.mean(),
                                           scale=scipy.stats.sem(per_prompt))
        s = stats[role]
        assert (s["method"], s["n_prompts"], s["n_images"]) == ("Student t over per-prompt means", n_prompts, n_images)
        assert (s["mean"], s["low"], s["high"]) == pytest.approx((per_prompt.mean(), low, high), rel=1e-6)
    model, reference = row_scores(results, "model"), row_scores(results, "reference")
    fractions = ((model > reference) + 0.5 * (model == reference)).reshape(n_prompts, seeds).mean(axis=1)
    assert fractions.min() < fractions.max()
    low, high = scipy.stats.t.interval(0.95, n_prompts - 1, loc=fractions.mean(), scale=scipy.stats.sem(fractions))
    w = stats["win_rate"]
    assert (w["method"], w["n_prompts"], w["n_images"]) == ("Student t over per-prompt win fractions", n_prompts,
                                                            n_images)
    assert (w["rate"], w["low"], w["high"]) == pytest.approx((fractions.mean(), max(low, 0), min(high, 1)), rel=1e-9)
    assert w["wins"] + w["losses"] + w["ties"] == n_images
    assert [row["seed"] for row in results["rows"][:seeds + 1]] == [0, 1, 2, 3, 0]

    line = describe("brightness", stats)
    assert "mean (95% CI: Student t over per-prompt means, 6 prompts, 24 images)" in line
    assert "(95% CI: Student t over per-prompt win fractions, 6 prompts, 24 pairs;" in line
    assert "Wilson" not in line
    page = render_report(results)
    assert "Student t over per-prompt means (6 prompts, 24 images)" in page
    assert "Student t over per-prompt win fractions (6 prompts, 24 images)" in page
    assert "6 prompts, 4 seeds per prompt" in page and "The unit of every interval is the prompt" in page


def test_one_seed_is_todays_numbers(tmp_path):
    results = run_summary(tmp_path, PROMPTS, 1, *correlated_pixels(1))
    stats = results["scorers"]["brightness"]
    model, reference = row_scores(results, "model"), row_scores(results, "reference")
    assert stats["win_rate"] == {**dataclasses.asdict(win_rate(model, reference)), "n_prompts": 6, "n_images": 6}
    assert stats["win_rate"]["method"] == "Wilson score"
    for role, values in (("model", model), ("reference", reference)):
        assert stats[role] == dataclasses.asdict(mean_interval(values))  # exactly today's
        assert (stats[role]["n_prompts"], stats[role]["n_images"]) == (6, 6)
    assert results["methods"]["win_rate"].startswith("Wilson score on the image pairs")
    line = describe("brightness", stats)
    assert "(95% CI: Wilson score, 6 prompts, 6 pairs;" in line
    assert "mean (95% CI: Student t over per-prompt means, 6 prompts, 6 images)" in line


def test_degenerate_cases_print_an_interval_or_none(tmp_path):
    # every image of the model brighter: each prompt's fraction is 1, so the Wilson interval over prompts
    seeds = 8
    reference = np.tile(np.arange(40, 40 + seeds), len(PROMPTS))
    results = run_summary(tmp_path / "wins", PROMPTS, seeds, reference + 50, reference)
    w = results["scorers"]["brightness"]["win_rate"]
    expected = scipy.stats.binomtest(6, 6).proportion_ci(0.95, method="wilson")
    assert (w["rate"], w["low"], w["high"]) == pytest.approx((1.0, expected.low, expected.high), rel=1e-12)
    assert w["method"] == "Wilson score over per-prompt win fractions" and w["low"] > 0.5
    line = describe("brightness", results["scorers"]["brightness"])
    assert "win rate of model 1.000 [0.610, 1.000] (95% CI: Wilson score over per-prompt win fractions, 6 prompts, " \
           "48 pairs; 48 wins, 0 losses, 0 ties" in line
    assert "Wilson score over per-prompt win fractions (6 prompts, 48 images)" in render_report(results)

    # one prompt (listed twice: the same prompt, so one unit): no mean interval; a Wilson interval over it
    results = run_summary(tmp_path / "one", ["a cat", "a cat"], 2, [100, 90, 100, 90], [95, 95, 95, 95])
    stats = results["scorers"]["brightness"]
    assert results["n_prompts"] == 1 and results["n_images"] == 4
    assert stats["model"]["low"] is None and stats["model"]["n_prompts"] == 1
    assert stats["win_rate"]["rate"] == 0.5 and stats["win_rate"]["low"] is not None
    line = describe("brightness", stats)
    assert "model 0.3725 (no interval from one prompt)" in line and "1 prompt, 4 images" in line
    assert "(one prompt: no interval)" in render_report(results)
