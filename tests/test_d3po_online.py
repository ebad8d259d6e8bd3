"""Online D3PO learns: ``dpojax train configs/tiny_d3po_brightness.yaml`` on the tiny SDXL pipeline (CPU).

The run's evaluations score fresh single samples of the same prompts and the same noise before training and
after it, so their difference is the model's change, not sampling noise; it must exceed the standard error of
the initial evaluation several times over. Measured over seeds (issue 4's note): seed 0, the one tested,
+0.0046 on a brightness of ~0.40 (standard error 0.0009); seeds 1-3 moved -0.0020, -0.0002, +0.0002, so the
margin is not yet robust across seeds on the tiny random pipeline.
"""

import json

import pytest
from test_d3po_rounds import CONFIG, dpojax, workdir  # noqa: F401  (the shared tiny pipeline and runner)

pytestmark = pytest.mark.slow


def test_brightness_rises_and_the_run_exports(workdir):  # noqa: F811
    run = workdir / "online"
    done = dpojax(workdir, "train", CONFIG, f"model.pretrained={workdir / 'tiny-sdxl'}", f"train.output_dir={run}",
                  "logging.tensorboard=false")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_reward_mean" in r]
    first, last = evals[0], evals[-1]
    assert first["epoch"] == 0 and last["epoch"] == 12
    standard_error = first["eval_reward_std"] / 8 ** 0.5
    print(f"eval brightness {first['eval_reward_mean']:.4f} -> {last['eval_reward_mean']:.4f} "
          f"(initial standard error {standard_error:.5f})")
    assert last["eval_reward_mean"] - first["eval_reward_mean"] > 3 * standard_error
    train = [r for r in records if "loss" in r]
    assert abs(train[0]["loss_minus_ln2"]) < 1e-3 and 0 < train[-1]["inside_fraction"] <= 1
    assert (run / "final" / "model_index.json").is_file()
