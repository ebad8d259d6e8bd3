"""Evaluation during training (``train.eval_every``) on the tiny SDXL pipeline: every evaluated step is scored
and checkpointed, the checkpoint of the best median score outlives ``train.keep_checkpoints`` (across a resume
too), and ``dpojax export RUN OUT --step best`` writes it as a pipeline that diffusers loads."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, pairs_workdir, run_dpojax
from safetensors.numpy import load_file

from dpojax import cli

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs" / "tiny_sdxl_dpo.yaml"


def countdown(images, prompts):  # the scorer "test_train_eval:countdown"
    """Every call scores lower than the one before (a counter file in the run's working folder), so the first
    evaluation is the best and later ones are not."""
    path = Path("eval_calls")
    calls = int(path.read_text()) if path.exists() else 0
    path.write_text(str(calls + 1))
    return np.full(len(images), 100.0 - calls, np.float32)


def _train(workdir: Path, steps: int):
    done = run_dpojax(workdir, "train", CONFIG, f"model.pretrained={workdir / 'tiny-sdxl'}",
                      f"data.data_dir={workdir / 'pairs'}", f"train.output_dir={workdir / 'run'}",
                      f"dpo.steps={steps}", "dpo.pairs_per_device=1", "train.checkpoint_every=0",
                      "train.keep_checkpoints=1", "train.eval_every=2", "train.eval_scorer=test_train_eval:countdown",
                      "train.eval_images_per_prompt=1", "train.sample_steps=2", "train.export=none",
                      "optim.warmup_steps=1")
    assert done.returncode == 0, done.stderr
    return done


def test_the_best_scored_checkpoint_is_kept_and_exported(tmp_path, tiny_sdxl, capsys):
    workdir = pairs_workdir(tmp_path, tiny_sdxl, 24, eval_rows=2)
    run = workdir / "run"
    _train(workdir, 4)  # evaluations at steps 2 (score 100) and 4 (99)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    _train(workdir, 6)  # resumed: step 6 scores 98; keep_checkpoints=1 drops 4, the best (2) stays
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 6]
    assert json.loads((run / "checkpoints" / "best.json").read_text()) == {"step": 2, "score": 100.0}
    evals = [(r["step"], r["eval_median"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval_median" in r]
    assert evals == [(2, 100.0), (4, 99.0), (6, 98.0)]

    best, step_2 = workdir / "best", workdir / "step_2"
    assert cli.main(["export", str(run), str(best), "--step", "best"]) == 0
    assert cli.main(["export", str(run), str(step_2), "--step", "2", "--kind", "unet"]) == 0
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(best)
    want = load_file(step_2 / "diffusion_pytorch_model.safetensors")
    got = {k: v.numpy() for k, v in pipe.unet.state_dict().items()}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert cli.main(["export", str(run), str(workdir / "latest"), "--kind", "unet"]) == 0
    moved = load_file(workdir / "latest" / "diffusion_pytorch_model.safetensors")
    assert any(not np.array_equal(moved[k], want[k]) for k in want)  # best is not simply the latest

    capsys.readouterr()
    assert cli.main(["export", str(run), str(workdir / "nope"), "--step", "4"]) == 2
    missing = capsys.readouterr().err
    assert "has no checkpoint '4'" in missing and len(missing.strip().splitlines()) == 1


def countup(images, prompts):  # the scorer "test_train_eval:countup"
    """Every call scores higher than the one before: each evaluation is a new best."""
    path = Path("eval_calls")
    calls = int(path.read_text()) if path.exists() else 0
    path.write_text(str(calls + 1))
    return np.full(len(images), float(calls), np.float32)


def test_a_kill_during_the_save_of_a_new_best_leaves_the_previous_best_on_disk_and_named(tmp_path, tiny_sdxl):
    """SIGKILL while the checkpoint of a better evaluation is written: best.json still names the previous best,
    which is on disk and exports; the resumed run evaluates again and names its own best once saved."""
    workdir = pairs_workdir(tmp_path, tiny_sdxl, 24, eval_rows=2)
    run = workdir / "run"
    args = ["train", CONFIG, f"model.pretrained={workdir / 'tiny-sdxl'}", f"data.data_dir={workdir / 'pairs'}",
            f"train.output_dir={run}", "dpo.steps=2", "dpo.pairs_per_device=1", "train.checkpoint_every=0",
            "train.keep_checkpoints=1", "train.eval_every=1", "train.eval_scorer=test_train_eval:countup",
            "train.eval_images_per_prompt=1", "train.sample_steps=2", "train.export=none", "optim.warmup_steps=1"]
    killed = run_dpojax(workdir, *args, fault="sigkill-in-save:2")
    assert killed.returncode == -9, killed.stderr
    assert not (run / "checkpoints" / "2").exists()  # the save was cut short: orbax never committed it
    assert json.loads((run / "checkpoints" / "best.json").read_text()) == {"step": 1, "score": 0.0}
    assert cli.main(["export", str(run), str(workdir / "best_1"), "--step", "best", "--kind", "unet"]) == 0
    assert run_dpojax(workdir, *args).returncode == 0  # resumed from step 1: evaluates step 2 again
    assert json.loads((run / "checkpoints" / "best.json").read_text()) == {"step": 2, "score": 2.0}
    assert cli.main(["export", str(run), str(workdir / "best_2"), "--step", "best", "--kind", "unet"]) == 0
