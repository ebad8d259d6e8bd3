"""The training loop through its command line, on the tiny SDXL pipeline and synthetic pairs (CPU).

Runs are subprocesses (``python -m dpojax.cli train``) so they can be killed; they share a persistent
compilation cache, so only the first run of each program compiles.
"""

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from helpers import cli_env, dpojax_command, implicit_accuracy, pairs_workdir, preference_score
from PIL import Image
from safetensors.numpy import load_file

from dpojax import cli, parallel
from dpojax.components import load_components, split_params
from dpojax.config import DataConfig, load_config
from dpojax.data.pipeline import make_pair_loader
from dpojax.models import UNet2DConditionModel
from dpojax.train.samples import policy_pipeline

CONFIG = Path(__file__).parents[1] / "configs" / "tiny_sdxl_dpo.yaml"
STEPS = 6
PAIRS = 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_sdxl):
    return pairs_workdir(tmp_path_factory.mktemp("train_loop"), tiny_sdxl, 64, eval_rows=72)


def overrides(workdir: Path, run: str, **extra) -> list[str]:
    values = {"model.pretrained": workdir / "tiny-sdxl", "data.data_dir": workdir / "pairs",
              "train.output_dir": workdir / run, "dpo.steps": STEPS, "train.checkpoint_every": 1,
              "train.keep_checkpoints": 10, "dpo.log_every": 1, "dpo.pairs_per_device": PAIRS,
              "train.export": "unet", "logging.tensorboard": False, "train.sample_every": 0,
              "optim.warmup_steps": 2, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def start(workdir: Path, run: str, devices: int = 1, **extra) -> subprocess.Popen:
    log = open(workdir / f"{run}.log", "a")  # noqa: SIM115  (closed when the process is waited for)
    return subprocess.Popen(dpojax_command("train", CONFIG, *overrides(workdir, run, **extra)), stdout=log,
                            stderr=subprocess.STDOUT, env=cli_env(workdir, devices), cwd=workdir)


def finish(proc: subprocess.Popen, workdir: Path, run: str, timeout: float = 240) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, (workdir / f"{run}.log").read_text()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the awaited state"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def steps_saved(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_unet(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(run_dir / "final" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    proc = start(workdir, "uninterrupted", **{"logging.tensorboard": True, "train.sample_every": STEPS // 2})
    rc, log = finish(proc, workdir, "uninterrupted")
    assert rc == 0, log
    return workdir / "uninterrupted"


def assert_same_params(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert np.array_equal(actual[key], value), key


def test_uninterrupted_run_logs_and_exports(uninterrupted):
    records = logged(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)  # policy = reference at step 0
    assert records[0]["lr"] == 0.0  # warmup starts at 0, as torch's constant_with_warmup
    for key in ("loss", "implicit_acc", "model_mse", "ref_mse", "margin", "grad_norm", "lr"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[-1]["loss"] != records[0]["loss"]
    assert steps_saved(uninterrupted)[-1] == STEPS
    grids = sorted(p.name for p in (uninterrupted / "samples").iterdir())
    assert grids == [f"step_{s:06d}.png" for s in (0, STEPS // 2, STEPS)]
    assert Image.open(uninterrupted / "samples" / grids[0]).size == (32 * 4, 32)  # 4 prompts of 32 px
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    progress = [line for line in (uninterrupted.parent / "uninterrupted.log").read_text().splitlines()
                if line.startswith("step ")]
    times = [re.search(r"\| elapsed (\d+:\d\d:\d\d), ETA (\d+:\d\d:\d\d)$", line) for line in progress]
    assert len(progress) == STEPS and all(times), progress  # every step's line (dpo.log_every=1) ends with both
    seconds = [[sum(int(x) * 60 ** i for i, x in enumerate(reversed(t.split(":")))) for t in m.groups()]
               for m in times]
    assert [e for e, _ in seconds] == sorted(e for e, _ in seconds) and seconds[-1][1] == 0  # nothing left
    from diffusers import UNet2DConditionModel as TorchUNet  # the export loads in diffusers

    TorchUNet.from_pretrained(uninterrupted / "final")


def test_sigkill_then_sigterm_then_resume_is_bitwise_equal(workdir, uninterrupted):
    run = workdir / "interrupted"
    kill_after = random.randint(1, STEPS - 2)
    proc = start(workdir, "interrupted")
    wait_for(lambda: steps_saved(run) and steps_saved(run)[-1] >= kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = steps_saved(run)[-1]

    # Resume, then stop it with SIGTERM between checkpoints: it must save where it stopped.
    proc = start(workdir, "interrupted", **{"train.checkpoint_every": 1000})
    resumed_line = f"resumed from {run / 'checkpoints' / str(killed_at)}"

    def resumed_and_stepped():
        log = (workdir / "interrupted.log").read_text()
        return resumed_line in log and f"step {killed_at + 1}/" in log.split(resumed_line)[-1]

    wait_for(resumed_and_stepped, proc)
    proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc, workdir, "interrupted")
    assert rc == 128 + signal.SIGTERM, log
    stopped_at = max(r["step"] for r in logged(run))
    assert f"stopped by SIGTERM at step {stopped_at}" in log
    assert steps_saved(run)[-1] == stopped_at

    rc, log = finish(start(workdir, "interrupted"), workdir, "interrupted")
    assert rc == 0, log
    assert [r["step"] for r in logged(run)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in logged(run)] == [r["loss"] for r in logged(uninterrupted)]
    assert_same_params(final_unet(run), final_unet(uninterrupted))


@pytest.fixture(scope="module")
def sharded_run_with_nan(workdir):
    """8 devices (data=2, fsdp=4) on the same global batch; step 3's loss is poisoned with NaN."""
    proc = start(workdir, "sharded", devices=8, **{"mesh.data": 2, "mesh.fsdp": 4,
                                                   "dpo.pairs_per_device": PAIRS // 8,
                                                   "train.debug_nan_at_step": 3})
    rc, log = finish(proc, workdir, "sharded")
    return rc, log, workdir / "sharded"


def test_sharded_losses_equal_unsharded(uninterrupted, sharded_run_with_nan):
    _, log, run = sharded_run_with_nan
    sharded = [r["loss"] for r in logged(run)]
    assert len(sharded) == 2, log
    np.testing.assert_allclose(sharded, [r["loss"] for r in logged(uninterrupted)][:2], rtol=1e-4)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(sharded_run_with_nan):
    rc, log, run = sharded_run_with_nan
    assert rc == 2, log
    message = f"error: non-finite loss (nan) at step 3; training stopped, last good checkpoint: {run}"
    assert message in log
    assert steps_saved(run) == [1, 2]
    assert not (run / "final").exists()


def test_unknown_config_key_is_one_line_error(capsys, workdir):
    assert cli.main(["train", str(CONFIG), "dpo.stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dpojax train: error: config: unknown key 'dpo.stepz' (did you mean 'dpo.steps'?)"


def test_dpo_learns_the_preference(workdir):
    """Synthetic pairs (the brighter image wins), 60 DPO steps.

    Held out: the policy ranks unseen validation pairs like the labels far above chance (u averaged over 4
    noise/timestep draws per pair), while the reference against itself gives u = 0 exactly on every pair.
    Samples: from the same fresh noise, the policy's images are brighter than the reference's for clearly more
    than half of 128 prompts (one-sided sign test, p < 0.01).
    """
    run = "learning"
    rc, log = finish(start(workdir, run, **{"dpo.steps": 60, "train.checkpoint_every": 0}), workdir, run)
    assert rc == 0, log
    import jax
    from scipy.stats import binomtest

    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    config = load_config(CONFIG, overrides(workdir, run))
    components, reference_params, frozen = load_components(config, mesh)
    trained_unet = UNet2DConditionModel.from_pretrained(workdir / run / "final", mesh=mesh)
    _, trained = split_params(trained_unet)
    validation = DataConfig(data_dir=str(workdir / "pairs"), split="validation", resolution=32, shuffle=False,
                            caption_dropout=0.0, flip="none")
    batches = list(make_pair_loader(validation, batch_size=8, seed=0, num_epochs=1))
    kw = dict(beta=config.loss.beta, mesh=mesh, draws=4)
    policy = implicit_accuracy(components, trained, frozen, batches, **kw)
    reference = implicit_accuracy(components, reference_params, frozen, batches, **kw)
    assert policy["pairs"] >= 56
    assert policy["implicit_acc"] > 0.75, policy  # chance is 0.5 ± 0.07 at 56 pairs
    assert reference["ties"] == reference["pairs"] and reference["implicit_acc"] == 0.0

    prompts = [f"a photo, number {i}" for i in range(128)]
    brightness = {}
    for name, unet in (("reference", nnx.merge(components.reference, frozen["reference"])),
                       ("policy", trained_unet)):
        pipe = policy_pipeline(components, unet, frozen)
        brightness[name] = preference_score(pipe.sample(prompts, num_steps=10, seed=7, height=32, width=32))
    brighter = int(np.sum(brightness["policy"] > brightness["reference"]))
    assert binomtest(brighter, len(prompts), alternative="greater").pvalue < 0.01, brighter
