"""Multi-process training: two local processes with 4 CPU devices each give the single-process 8-device run,
and a preemption notice that reaches one of them stops both at the same step.

The first end-to-end test runs ``dpojax train`` three times on the tiny SDXL pipeline: one process with 8
devices for 4 steps; then two processes (``--coordinator/--num-processes/--process-id``, gloo collectives) for
2 steps, which checkpoint, and again for 4 steps, which resume from that checkpoint. Losses and the exported
final UNet must equal the single-process run. The preemption test sends SIGTERM to process 1 alone, for
Diffusion-DPO, online D3PO and a D3PO round: both processes must save the same step and exit with 143, and
the resumed run must end with the parameters of an uninterrupted two-process run, bit for bit. The unit tests
check the per-process data split and the detection of the launch environment.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_env, dpojax_command, free_port, pairs_workdir, run_dpojax
from safetensors.numpy import load_file

from dpojax import distributed
from dpojax.config import DataConfig
from dpojax.data.pipeline import make_pair_loader
from dpojax.feedback.rounds import read_round
from dpojax.feedback.scorers import brightness

CONFIG = Path(__file__).parents[1] / "configs" / "tiny_sdxl_dpo.yaml"
D3PO_CONFIG = Path(__file__).parents[1] / "configs" / "tiny_d3po_brightness.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_sdxl):
    return pairs_workdir(tmp_path_factory.mktemp("multihost"), tiny_sdxl, 48, eval_rows=2)


# ------------------------------------------------------------------------------------------- the data split


def _batches(data_dir: Path, batch_size: int, process: tuple[int, int], count: int) -> list[dict]:
    data = DataConfig(data_dir=str(data_dir), resolution=16, caption_dropout=0.5, random_crop=True)
    iterator = iter(make_pair_loader(data, batch_size=batch_size, seed=3, process=process))
    return [next(iterator) for _ in range(count)]


def test_process_slices_put_together_are_the_single_process_batches(workdir):
    """Rows of process 0 then process 1 = the one-process batch, augmentation included, across epochs."""
    single = _batches(workdir / "pairs", 8, (0, 1), 9)  # ~43 pairs (ties dropped): 5 batches per epoch
    halves = [_batches(workdir / "pairs", 4, (p, 2), 9) for p in range(2)]
    for whole, first, second in zip(single, *halves, strict=True):
        for key in ("pixels", "captions", "time_ids"):
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])


# ------------------------------------------------------------------------------ launch environment detection


def test_detect_reads_explicit_options_then_slurm_then_tpu():
    explicit = distributed.detect("10.0.0.1:1234", 4, 2, env={})
    assert explicit == ("explicit", {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2})
    from_env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                "SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}
    assert distributed.detect(env=from_env) == ("explicit", {"coordinator_address": "h:1", "num_processes": 2,
                                                             "process_id": 1})
    assert distributed.detect(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"})[0] == "slurm"
    assert distributed.detect(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})[0] == "single"
    assert distributed.detect(env={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})[0] == "tpu"
    assert distributed.detect(env={"TPU_WORKER_HOSTNAMES": "localhost"})[0] == "single"
    assert distributed.detect(env={}) == ("single", {})


@pytest.mark.parametrize(("kwargs", "env", "message"), [
    ({"coordinator": "h:1"}, {}, "--num-processes (or JAX_NUM_PROCESSES), --process-id"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, "--process-id 2 must be in [0, 2)"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_detect_rejects_incomplete_settings_in_one_line(kwargs, env, message):
    with pytest.raises(ValueError, match="multi-process") as err:
        distributed.detect(**kwargs, env=env)
    assert message in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------- end to end


def _launch(workdir: Path, name: str, args: list, devices: int, process: tuple[int, int] | None = None,
            port: int = 0) -> subprocess.Popen:
    """``dpojax ARGS`` as process ``process = (index, count)`` of a local job (or alone), logging to NAME.log;
    the runs of the module share a compilation cache, so a resumed run reuses the first's programs."""
    if process is not None:
        args = [*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(process[1]),
                "--process-id", str(process[0])]
        name = f"{name}.{process[0]}"
    log = open(workdir / f"{name}.log", "a")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(dpojax_command(*args), stdout=log, stderr=subprocess.STDOUT,
                            env=cli_env(workdir, devices), cwd=workdir)


def _train(workdir: Path, run: str, steps: int, devices: int, process: tuple[int, int] | None = None,
           port: int = 0, **extra) -> subprocess.Popen:
    overrides = {"model.pretrained": workdir / "tiny-sdxl", "data.data_dir": workdir / "pairs",
                 "train.output_dir": workdir / run, "dpo.steps": steps, "train.checkpoint_every": 2,
                 "dpo.log_every": 1, "dpo.pairs_per_device": 1, "train.export": "unet",
                 "logging.tensorboard": False, "optim.warmup_steps": 1, "mesh.fsdp": 4, "mesh.data": 2,
                 # Adam with a tiny eps moves every weight by about ±lr whatever the size of its gradient, so
                 # last-bit differences of near-zero gradients (the processes' all-reduce sums in another
                 # order) would become lr-sized; eps 1e-3 keeps the update linear in such gradients.
                 "optim.eps": 1e-3, **extra}
    return _launch(workdir, run, ["train", CONFIG, *(f"{k}={v}" for k, v in overrides.items())], devices, process,
                   port)


def _wait(workdir: Path, procs: dict[str, subprocess.Popen]) -> None:
    for name, proc in procs.items():
        rc = proc.wait(timeout=900)  # compiling takes 1-3 minutes on 2 busy cores
        assert rc == 0, (workdir / f"{name}.log").read_text()[-4000:]


def _two_processes(workdir: Path, run: str, steps: int) -> None:
    port = free_port()
    _wait(workdir, {f"{run}.{i}": _train(workdir, run, steps, 4, (i, 2), port) for i in range(2)})


def _metrics(run_dir: Path, name: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[name]) for r in records]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_like_one(workdir):
    _wait(workdir, {"single": _train(workdir, "single", 4, 8)})
    _two_processes(workdir, "multi", 2)
    multi = workdir / "multi"
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    _two_processes(workdir, "multi", 4)  # resumes from the step-2 checkpoint written by both processes
    assert "resumed from" in (workdir / "multi.0.log").read_text()
    assert "resumed from" not in (workdir / "multi.1.log").read_text()  # only process 0 prints and logs
    single = workdir / "single"
    assert [s for s, _ in _metrics(multi, "loss")] == [1, 2, 3, 4]
    for name in ("model_mse_w", "model_mse_l", "ref_mse"):  # the forward passes agree to float rounding
        np.testing.assert_allclose(_metrics(multi, name), _metrics(single, name), rtol=1e-5, atol=0, err_msg=name)
    # The loss takes beta/2 (5000 here) times a difference of MSE differences (~3e-5 of MSEs ~1.4), so the
    # MSEs' last-bit rounding (the processes sum in another order) shows in it at ~1e-4 relative (measured 3.6e-4).
    np.testing.assert_allclose(_metrics(multi, "loss"), _metrics(single, "loss"), rtol=1e-3, atol=0)
    want = load_file(single / "final" / "diffusion_pytorch_model.safetensors")
    got = load_file(multi / "final" / "diffusion_pytorch_model.safetensors")
    assert got.keys() == want.keys()
    # lr 5e-5 for 4 steps moves a weight by up to ~2e-4; the processes' sums in another order leave the two
    # runs' weights up to ~1e-7 apart (measured 1.2e-7), far below what training moved them.
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert any(not np.array_equal(want[key], load_file(workdir / "tiny-sdxl" / "unet" /
                                                       "diffusion_pytorch_model.safetensors")[key])
               for key in want)  # training moved the weights


# ----------------------------------------------------------------- a preemption notice that reaches one host


def _steps_saved(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _two(workdir: Path, name: str, args: list) -> list[subprocess.Popen]:
    port = free_port()
    return [_launch(workdir, name, args, 4, (i, 2), port) for i in range(2)]


def _finish(workdir: Path, name: str, procs: list[subprocess.Popen], expected: int) -> None:
    for i, proc in enumerate(procs):
        rc = proc.wait(timeout=900)
        assert rc == expected, (workdir / f"{name}.{i}.log").read_text()[-4000:]


def _sigterm_process_1_once_a_step_is_saved(workdir: Path, name: str, run_dir: Path,
                                            procs: list[subprocess.Popen]) -> int:
    """Wait for the first checkpoint, SIGTERM process 1 only; both must stop with 143 at the same saved step."""
    deadline = time.monotonic() + 900
    while not _steps_saved(run_dir):
        assert all(p.poll() is None for p in procs), "a process ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    _finish(workdir, name, procs, 128 + signal.SIGTERM)
    logs = [(workdir / f"{name}.{i}.log").read_text() for i in range(2)]
    stopped = [int(log.split("stopped by SIGTERM at step ")[1].split(";")[0]) for log in logs]
    assert stopped[0] == stopped[1] == _steps_saved(run_dir)[-1], stopped  # both saved the step both name
    return stopped[0]


def _round(workdir: Path) -> Path:
    """A labeled round of the tiny pipeline: 8 prompts x 4 images, the brighter half of each prompt good."""
    round_dir = workdir / "round"
    if not round_dir.exists():
        done = run_dpojax(workdir, "d3po", "sample", D3PO_CONFIG, f"model.pretrained={workdir / 'tiny-sdxl'}",
                          "d3po.seed=3", "d3po.round_prompts=8", "d3po.images_per_prompt=4", "d3po.num_steps=2",
                          "--out", round_dir)
        assert done.returncode == 0, done.stderr
        images = read_round(round_dir, arrays=False).images
        scores = brightness(images.reshape(-1, *images.shape[2:])).reshape(images.shape[:2])
        labels = np.where(scores > np.median(scores, axis=1, keepdims=True), 1, -1)
        (round_dir / "labels" / "alice.json").write_text(json.dumps(labels.tolist()))
    return round_dir


COMMON = {"logging.tensorboard": False, "train.checkpoint_every": 1, "train.keep_checkpoints": 100}
# 4 steps per epoch, so a stop lands inside one; 2 denoising steps keep the compiles short (the update unrolls them)
D3PO_RUN = {**COMMON, "d3po.num_epochs": 2, "d3po.num_batches_per_epoch": 1, "d3po.sample_batch_size": 4,
            "d3po.num_steps": 2, "d3po.eval_every": 0, "train.export": "lora"}


def _preemption_args(workdir: Path, objective: str, run_dir: Path) -> list:
    """The ``dpojax`` arguments of one run of each kind, writing to ``run_dir``."""
    if objective == "dpo":
        values = {**COMMON, "model.pretrained": workdir / "tiny-sdxl", "data.data_dir": workdir / "pairs",
                  "dpo.steps": 8, "dpo.pairs_per_device": 1, "train.export": "unet", "optim.warmup_steps": 1,
                  "mesh.data": 2, "mesh.fsdp": 4}
        return ["train", CONFIG, *(f"{k}={v}" for k, v in {**values, "train.output_dir": run_dir}.items())]
    if objective == "d3po":
        values = {**D3PO_RUN, "model.pretrained": workdir / "tiny-sdxl", "d3po.train_batch_size": 1}
        return ["train", D3PO_CONFIG, *(f"{k}={v}" for k, v in {**values, "train.output_dir": run_dir}.items())]
    values = {**COMMON, "d3po.num_epochs": 2, "d3po.train_batch_size": 1, "train.export": "lora"}
    return ["d3po", "train", _round(workdir), *(f"{k}={v}" for k, v in {**values, "train.output_dir": run_dir}.items())]


FINAL_FILE = {"dpo": "diffusion_pytorch_model.safetensors", "d3po": "pytorch_lora_weights.safetensors",
              "rounds": "pytorch_lora_weights.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "d3po", "rounds"])
def test_sigterm_to_one_process_stops_both_and_the_resumed_run_is_exact(workdir, objective):
    """SIGTERM reaches process 1 of two: both save the same step and exit with 143 (the stop is agreed across
    processes after every optimizer step), and the resumed run ends with the final parameters of an
    uninterrupted two-process run bit for bit: same programs on the same devices, same data position (D3PO:
    the samples of the epoch in progress travel in the checkpoint), so no arithmetic differs."""
    uninterrupted, interrupted = workdir / f"{objective}_whole", workdir / f"{objective}_stopped"
    _finish(workdir, f"{objective}_whole", _two(workdir, f"{objective}_whole",
                                                _preemption_args(workdir, objective, uninterrupted)), 0)
    args = _preemption_args(workdir, objective, interrupted)
    stopped = _sigterm_process_1_once_a_step_is_saved(workdir, f"{objective}_stopped", interrupted,
                                                     _two(workdir, f"{objective}_stopped", args))
    _finish(workdir, f"{objective}_resumed", _two(workdir, f"{objective}_resumed", args), 0)
    assert f"resumed from {interrupted / 'checkpoints' / str(stopped)}" in (
        workdir / f"{objective}_resumed.0.log").read_text()
    want = load_file(uninterrupted / "final" / FINAL_FILE[objective])
    got = load_file(interrupted / "final" / FINAL_FILE[objective])
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one record per logged step, no replays
