"""D3PO through the ``dpojax`` command on the tiny SDXL pipeline (CPU, 1 device in subprocesses).

- Bad input: a missing round folder, a label file with the wrong number of prompts or images, a scorer that
  raises, an existing round folder: each is a one-line error naming the culprit, and nothing already written
  (round files, labels, checkpoints) changes.
- The human-feedback path with simulated annotators: sample a round, label it from a thresholded brightness
  proxy as a person would (JSON files in ROUND/labels/), train, and sample the next round from the result with
  the same seed (same prompts, x_T and step noise): its images are brighter.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import D3PO_CONFIG, paired_change, run_dpojax

from dpojax import cli
from dpojax.feedback.labels import read_labels
from dpojax.feedback.rounds import read_round
from dpojax.scorers.proxies import brightness

pytestmark = pytest.mark.slow


def failing_scorer(images, prompts):  # imported by the scorer spec "test_d3po_rounds:failing_scorer"
    raise RuntimeError("the scoring service is down")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_sdxl):
    root = tmp_path_factory.mktemp("d3po_rounds")
    (root / "tiny-sdxl").symlink_to(tiny_sdxl)
    return root


ROUND_SIZE = {"d3po.round_prompts": 24}


def common(workdir: Path, **extra) -> list[str]:
    values = {"model.pretrained": workdir / "tiny-sdxl", "logging.tensorboard": False, "d3po.seed": 7,
              "d3po.round_prompts": 6, "d3po.images_per_prompt": 4, **extra}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def round1(workdir) -> Path:
    """A round sampled from the tiny pipeline: 24 prompts x 4 images (the tests copy it or label it)."""
    round_dir = workdir / "round1"
    done = run_dpojax(workdir, "d3po", "sample", D3PO_CONFIG, *common(workdir, **ROUND_SIZE), "--out", round_dir)
    assert done.returncode == 0, done.stderr
    return round_dir


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def simulated_labels(round_dir: Path, annotator: str) -> Path:
    """What a person marking the brighter half of each prompt's images good writes: +1 above the prompt's
    median brightness, −1 below (the labeling page's format: a list over prompts of k scores)."""
    scores = round_brightness(round_dir)
    labels = np.where(scores > np.median(scores, axis=1, keepdims=True), 1, -1).tolist()
    path = round_dir / "labels" / f"{annotator}.json"
    path.write_text(json.dumps(labels))
    return path


def round_brightness(round_dir: Path) -> np.ndarray:
    """(prompts, k) brightness of a round's images."""
    images = read_round(round_dir, arrays=False).images
    return brightness(images.reshape(-1, *images.shape[2:])).reshape(images.shape[:2])


def _error_line(capsys, *args) -> str:
    """``dpojax ARGS`` in this process (the errors come before any device work): its one stderr line."""
    assert cli.main([str(a) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_round_errors_name_the_culprit_and_keep_files(workdir, round1, capsys):
    missing = _error_line(capsys, "d3po", "train", workdir / "no-such-round")
    assert "no-such-round" in missing and "does not exist" in missing

    r1 = workdir / "bad_round"
    shutil.copytree(round1, r1, ignore=shutil.ignore_patterns("labels", "train"))
    (r1 / "labels").mkdir()
    (r1 / "labels" / "alice.json").write_text(json.dumps([[1, -1, 0, 0]] * 23))  # 23 prompts, the round has 24
    before = digest(r1)
    wrong_prompts = _error_line(capsys, "d3po", "train", r1)
    assert "alice.json" in wrong_prompts and "24 prompts" in wrong_prompts
    (r1 / "labels" / "alice.json").write_text(json.dumps([[1, -1, 0]] * 24))  # 3 scores, the round has 4 images
    before = digest(r1)
    wrong_images = _error_line(capsys, "d3po", "train", r1)
    assert "alice.json" in wrong_images and "4 images" in wrong_images
    assert digest(r1) == before and not (r1 / "train").exists()

    again = _error_line(capsys, "d3po", "sample", D3PO_CONFIG, *common(workdir), "--out", r1)
    assert "already exists" in again and digest(r1) == before


def test_scorer_that_raises_is_one_line_and_keeps_checkpoints(workdir):
    run = workdir / "scorer_run"
    # 2 denoising steps, one of them trained, and one batch per epoch: the programs are small, the failure path
    # is the same
    args = common(workdir, **{"train.output_dir": run, "d3po.num_epochs": 1, "d3po.eval_every": 0,
                              "train.export": "none", "d3po.num_steps": 2, "d3po.timestep_fraction": 0.5,
                              "d3po.num_batches_per_epoch": 1})
    ok = run_dpojax(workdir, "train", D3PO_CONFIG, *args)
    assert ok.returncode == 0, ok.stderr
    before = digest(run / "checkpoints")
    failed = run_dpojax(workdir, "train", D3PO_CONFIG, *args, "d3po.num_epochs=2",
                        "d3po.reward=test_d3po_rounds:failing_scorer")
    assert failed.returncode == 2, failed.stderr
    assert "failing_scorer" in failed.stderr and "the scoring service is down" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert digest(run / "checkpoints") == before


def test_simulated_annotators_make_the_next_round_brighter(workdir, round1):
    """Round 2 is sampled with round 1's prompts and noise by the model trained on round 1's labels, so the
    per-image differences are the training's effect; their mean must exceed their standard error 3 times over."""
    r1, r2 = round1, workdir / "round2"
    simulated_labels(r1, "alice")
    simulated_labels(r1, "bob")
    labels = read_labels(r1)
    assert labels.labeled.all() and labels.annotators == ["alice", "bob"]
    trained = run_dpojax(workdir, "d3po", "train", r1, "d3po.num_epochs=2", "logging.tensorboard=false")
    assert trained.returncode == 0, trained.stderr
    final = r1 / "train" / "final"
    assert (final / "model_index.json").is_file()
    nxt = run_dpojax(workdir, "d3po", "sample", D3PO_CONFIG,
                     *common(workdir, **ROUND_SIZE, **{"model.pretrained": final}), "--out", r2)
    assert nxt.returncode == 0, nxt.stderr
    assert read_round(r2, arrays=False).prompts == read_round(r1, arrays=False).prompts
    first, second = round_brightness(r1), round_brightness(r2)
    change, standard_error = paired_change(second, first)
    print(f"round 1 mean brightness {first.mean():.5f}, preferred images {first[labels.scores > 0].mean():.5f}, "
          f"round 2 {second.mean():.5f} (change {change:+.5f}, standard error {standard_error:.5f})")
    assert change > 3 * standard_error
