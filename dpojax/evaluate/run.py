"""``dpojax eval MODEL [--against REF]``: sample both models on the same prompts and seeds, score the images, and
report each model's mean score and the model's win rate over the reference, with 95% intervals over prompts (the
images of one prompt are correlated; ``dpojax/evaluate/stats.py``).

Writes ``OUT/results.json`` (summary and one row per image pair) and ``OUT/report.html``, each atomically. The
images are cached (``dpojax/evaluate/images.py``), so a rerun, or a run after a kill, samples only what is
missing; the scores are recomputed from the cached PNGs at every run (cheap next to sampling, and a new scorer
needs no new images).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dpojax.diffusers_folder import read_pipeline_folder
from dpojax.evaluate.images import ImageCache, Row, Sampling, sample_rows
from dpojax.evaluate.report import render_report
from dpojax.evaluate.stats import (
    MEAN_INTERVAL,
    WIN_RATE_INTERVAL,
    WIN_RATE_PROMPT_FALLBACK,
    WIN_RATE_PROMPT_INTERVAL,
    mean_interval,
    win_rate,
)
from dpojax.pipeline import Pipeline
from dpojax.scorers.base import Scorer, score_per_image
from dpojax.scorers.registry import make_scorer, options_taken
from dpojax.weights.atomic import atomic_file


def check_model_folder(folder: str | Path) -> Path:
    """``folder`` as a Path once it is known to be a diffusers pipeline folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder} does not exist")
    read_pipeline_folder(folder)  # a one-line error when it is not a diffusers pipeline
    return folder


def sample_missing(caches: dict[str, ImageCache], rows: list[Row]) -> tuple[int, int]:
    """Sample the rows each model lacks (a progress bar on stderr); returns (sampled, already cached) counts."""
    todo = {role: cache.missing_batches(rows) for role, cache in caches.items()}
    sampled = sum(len(batch) for batches in todo.values() for batch in batches)
    with tqdm(total=sampled, desc="sampling", unit="image", file=sys.stderr) as progress:
        for role, batches in todo.items():
            if not batches:
                continue
            cache = caches[role]
            progress.set_postfix_str(role)
            pipe = Pipeline.from_pretrained(cache.model)  # loaded only when something is missing
            for batch in batches:
                cache.add(batch, sample_rows(pipe, batch, cache.sampling))
                progress.update(len(batch))
    return sampled, len(rows) * len(caches) - sampled


def score_all(scorer: Scorer, cache: ImageCache, rows: list[Row]) -> np.ndarray:
    """One score per row, from the cached images, in batches of the sampling batch size."""
    size = cache.sampling.batch_size
    return np.concatenate([score_per_image(scorer, cache.load(rows[i:i + size]), [r.prompt for r in rows[i:i + size]])
                           for i in range(0, len(rows), size)])


def methods(seeds: int) -> dict:
    """The ``methods`` entry of ``results.json``: how the intervals are made at ``seeds`` images per prompt (each
    statistic also names the method it used)."""
    win = (f"{WIN_RATE_INTERVAL} on the image pairs (one per prompt)" if seeds == 1 else
           f"{WIN_RATE_PROMPT_INTERVAL} (each prompt's wins plus half its ties, over its {seeds} seeds), clipped to "
           f"[0, 1]; {WIN_RATE_PROMPT_FALLBACK} with n = prompts where every prompt's fraction is equal or there "
           f"is one prompt")
    return {"unit": "the prompt: the images of one prompt are correlated, so each interval is over per-prompt values "
                    "(n = prompts, df = prompts - 1)",
            "mean": f"{MEAN_INTERVAL} (each prompt's mean over its {seeds} seed{'s' * (seeds > 1)}); none with one "
                    f"prompt",
            "win_rate": win, "ties": "a tie counts as half a win"}


def scorer_summary(by_role: dict[str, np.ndarray], prompts: list[str]) -> dict:
    """Each role's mean with its interval and, with a reference, the model's win rate, over the ``prompts`` (the
    prompt of each score)."""
    summary = {role: dataclasses.asdict(mean_interval(values, prompts=prompts)) for role, values in by_role.items()}
    if "reference" in by_role:
        summary["win_rate"] = dataclasses.asdict(win_rate(by_role["model"], by_role["reference"], prompts=prompts))
    return summary


def summarize(caches: dict[str, ImageCache], rows: list[Row], scorers: list[Scorer], out_dir: Path,
              seeds: int) -> dict:
    """The content of ``results.json``: settings, per-scorer statistics and per-row scores and winners."""
    scores = {s.name: {role: score_all(s, cache, rows) for role, cache in caches.items()} for s in scorers}
    prompts = [row.prompt for row in rows]  # the unit; a prompt listed twice is one (its images are the same)
    summary = {name: scorer_summary(by_role, prompts) for name, by_role in scores.items()}
    table = []
    for i, row in enumerate(rows):
        row_scores = {}
        for name, by_role in scores.items():
            row_scores[name] = {role: float(values[i]) for role, values in by_role.items()}
            if "reference" in by_role:
                model, reference = by_role["model"][i], by_role["reference"][i]
                row_scores[name]["winner"] = ("model" if model > reference else "reference" if reference > model
                                              else "tie")
        table.append({"index": row.index, "prompt": row.prompt, "seed": row.seed, "scores": row_scores,
                      "images": {role: cache.path(row).relative_to(out_dir).as_posix()
                                 for role, cache in caches.items()}})
    return {"models": {role: str(cache.model) for role, cache in caches.items()},
            "sampling": dataclasses.asdict(next(iter(caches.values())).sampling), "seeds": seeds,
            "n_prompts": len(set(prompts)), "n_images": len(rows), "methods": methods(seeds),
            "scorers": summary, "rows": table}


def interval_note(stats: dict, images: str = "images") -> str:
    """How a statistic's interval was made, e.g. "95% CI: Student t over per-prompt means, 6 prompts, 48 images"."""
    n = stats["n_prompts"]
    return f"{stats['level']:.0%} CI: {stats['method']}, {n} prompt{'s' * (n != 1)}, {stats['n_images']} {images}"


def describe(name: str, summary: dict) -> str:
    """One line per scorer for the terminal."""
    means = {role: s for role, s in summary.items() if role != "win_rate"}
    parts = [f"{role} {s['mean']:.4g}" + (f" [{s['low']:.4g}, {s['high']:.4g}]" if s["low"] is not None
                                          else " (no interval from one prompt)") for role, s in means.items()]
    line = f"{name}: mean ({interval_note(next(iter(means.values())))}) " + ", ".join(parts)
    if "win_rate" in summary:
        w = summary["win_rate"]
        line += (f"; win rate of model {w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] ({interval_note(w, 'pairs')}; "
                 f"{w['wins']} wins, {w['losses']} losses, {w['ties']} ties, each tie half a win)")
    return line


def evaluate(model: str | Path, reference: str | Path | None, prompts: list[str], scorer_specs: list[str],
             out_dir: str | Path, *, sampling: Sampling, seeds: int = 1, scorer_options: dict | None = None) -> dict:
    """Run an evaluation into ``out_dir`` (resuming from its image cache); returns the results. Each scorer gets
    the ``scorer_options`` (model files) its built-in parts take."""
    if seeds < 1 or sampling.batch_size < 1 or sampling.num_steps < 1:
        raise ValueError("--seeds, --batch-size and --num-steps must be at least 1")
    scorers = [make_scorer(spec, **options_taken(spec, scorer_options or {})) for spec in scorer_specs]
    folders = {"model": check_model_folder(model)}
    if reference is not None:
        folders["reference"] = check_model_folder(reference)
    out_dir = Path(out_dir)
    caches = {role: ImageCache(out_dir, role, folder, sampling) for role, folder in folders.items()}
    rows = [Row(i, prompt, seed) for i, prompt in enumerate(prompts) for seed in range(seeds)]
    sampled, cached = sample_missing(caches, rows)
    print(f"sampled {sampled} images, {cached} from the cache")
    results = summarize(caches, rows, scorers, out_dir, seeds)
    for name, text in (("results.json", json.dumps(results, indent=1)), ("report.html", render_report(results))):
        with atomic_file(out_dir / name) as f:
            f.write(text)
    for name, summary in results["scorers"].items():
        print(describe(name, summary))
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.html'}")
    return results
