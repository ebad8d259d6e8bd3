"""Online D3PO learns: ``dpojax train configs/tiny_d3po_brightness.yaml`` on the tiny SDXL pipeline (CPU).

The run's evaluations score fresh single samples of the same prompts and the same noise before training and
after it (kept in ``eval/epoch_*/rewards.json``), so the per-image differences are the model's change, not
sampling noise; their mean must exceed their standard error several times over. Measured over training seeds
0-3 (issue 4's note; 24 steps of 4 pairs, rank-4 LoRA, 32 evaluation images): mean brightness change +0.0057,
+0.0034, +0.0021, +0.0018, each 5.3-10.3 standard errors.
"""

import json

import pytest
from helpers import paired_change

pytestmark = pytest.mark.slow


def test_brightness_rises_and_the_run_exports(d3po_brightness_run):
    run, done = d3po_brightness_run  # the session's run (tests/conftest.py), which test_eval.py evaluates too
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["epoch"] for r in records if "eval_reward_mean" in r]
    assert evals[0] == 0 and evals[-1] == 12
    before, after = (json.loads((run / "eval" / f"epoch_{e:04d}" / "rewards.json").read_text()) for e in (0, 12))
    assert [s["prompt"] for s in before] == [s["prompt"] for s in after]
    change, standard_error = paired_change([s["reward"] for s in after], [s["reward"] for s in before])
    print(f"eval brightness change {change:+.5f} (standard error {standard_error:.5f}, {len(after)} images)")
    assert change > 3 * standard_error
    assert (run / "eval" / "epoch_0012" / "31.png").is_file()
    train = [r for r in records if "loss" in r]
    assert abs(train[0]["loss_minus_ln2"]) < 1e-3 and 0 < train[-1]["inside_fraction"] <= 1
    assert (run / "final" / "model_index.json").is_file()
