"""Multi-process training: two local processes with 4 CPU devices each give the single-process 8-device run.

The end-to-end test runs ``dpojax train`` three times on the tiny SDXL pipeline: one process with 8 devices
for 4 steps; then two processes (``--coordinator/--num-processes/--process-id``, gloo collectives) for 2
steps, which checkpoint, and again for 4 steps, which resume from that checkpoint. Losses and the exported
final UNet must equal the single-process run. The unit tests check the per-process data split and the
detection of the launch environment.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from dpojax import distributed
from dpojax.data.pickapic import prepare_pickapic
from dpojax.data.pipeline import PairLoaderConfig, make_pair_loader
from dpojax.data.synth import write_synthetic_pickapic
from dpojax.tiny import write_tiny_pipeline

CONFIG = Path(__file__).parents[1] / "configs" / "tiny_sdxl_dpo.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    write_tiny_pipeline(root / "tiny-sdxl", arch="sdxl", seed=0)
    write_synthetic_pickapic(root / "synth", 48, seed=0, image_size=32, eval_rows=2)
    prepare_pickapic(root / "synth", root / "pairs")
    return root


# ------------------------------------------------------------------------------------------- the data split


def _batches(data_dir: Path, batch_size: int, process: tuple[int, int], count: int) -> list[dict]:
    config = PairLoaderConfig(data_dir=str(data_dir), batch_size=batch_size, resolution=16, seed=3,
                              caption_dropout=0.5, random_crop=True)
    iterator = iter(make_pair_loader(config, process=process))
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir: Path, run: str, steps: int, devices: int, process: tuple[int, int] | None = None,
           port: int = 0) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),  # the resumed run reuses the first's programs
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    overrides = {"model.pretrained": workdir / "tiny-sdxl", "data.data_dir": workdir / "pairs",
                 "train.output_dir": workdir / run, "train.steps": steps, "train.checkpoint_every": 2,
                 "train.log_every": 1, "train.pairs_per_device": 1, "train.export": "unet",
                 "logging.tensorboard": False, "optim.warmup_steps": 1, "mesh.fsdp": 4, "mesh.data": 2,
                 # Adam with a tiny eps moves every weight by about ±lr whatever the size of its gradient, so
                 # last-bit differences of near-zero gradients (the processes' all-reduce sums in another
                 # order) would become lr-sized; eps 1e-3 keeps the update linear in such gradients.
                 "optim.eps": 1e-3}
    cmd = [sys.executable, "-m", "dpojax.cli", "train", str(CONFIG), *(f"{k}={v}" for k, v in overrides.items())]
    name = run
    if process is not None:
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(process[1]),
                "--process-id", str(process[0])]
        name = f"{run}.{process[0]}"
    log = open(workdir / f"{name}.log", "a")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)


def _wait(workdir: Path, procs: dict[str, subprocess.Popen]) -> None:
    for name, proc in procs.items():
        rc = proc.wait(timeout=900)  # compiling takes 1-3 minutes on 2 busy cores
        assert rc == 0, (workdir / f"{name}.log").read_text()[-4000:]


def _two_processes(workdir: Path, run: str, steps: int) -> None:
    port = _free_port()
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
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert any(not np.array_equal(want[key], load_file(workdir / "tiny-sdxl" / "unet" /
                                                       "diffusion_pytorch_model.safetensors")[key])
               for key in want)  # training moved the weights
