"""Multi-process training: two local processes with 4 CPU devices each give the single-process 8-device run,
and a preemption notice that reaches one of them stops both at the same step.

For Diffusion-DPO, online D3PO and a D3PO round, two processes (``--coordinator/--num-processes/--process-id``,
gloo collectives) train the tiny SDXL pipeline with SIGTERM sent to process 1 alone, after which both processes
must save the same step and exit with 143, and a resumed run must end like an uninterrupted run. For D3PO and
rounds the uninterrupted run is two processes too, and the parameters are equal bit for bit. For DPO it is one
process with 8 devices, so the check also covers one process against two: losses and the exported final UNet
agree to float rounding (the processes sum in another order). The unit tests check the per-process data split
and the detection of the launch environment.
"""

import dataclasses
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import D3PO_CONFIG, cli_env, dpojax_command, free_port, pairs_workdir, run_dpojax
from safetensors.numpy import load_file

from dpojax import distributed
from dpojax.config import DataConfig
from dpojax.data.pipeline import make_pair_loader
from dpojax.feedback.rounds import read_round
from dpojax.scorers.proxies import brightness

CONFIG = Path(__file__).parents[1] / "configs" / "tiny_sdxl_dpo.yaml"
XDIST_SPLIT = True  # each end-to-end test makes its own runs, so the tests may go to different workers (conftest)


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
            port: int = 0, fault: str | None = None) -> subprocess.Popen:
    """``dpojax ARGS`` as process ``process = (index, count)`` of a local job (or alone), logging to NAME.log,
    with ``fault`` injected (``tests/fault_injection.py``); the runs of the module share a compilation cache,
    so a resumed run reuses the first's programs."""
    if process is not None:
        args = [*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(process[1]),
                "--process-id", str(process[0])]
    log = open(workdir / f"{name}.log", "a")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(dpojax_command(*args, fault=fault), stdout=log, stderr=subprocess.STDOUT,
                            env=cli_env(workdir, devices), cwd=workdir)


def _two(workdir: Path, name: str, args: list, fault_in_1: str | None = None) -> dict[str, subprocess.Popen]:
    """``dpojax ARGS`` as a job of two processes with 4 devices each, logging to NAME.0.log and NAME.1.log;
    ``fault_in_1`` is injected in process 1."""
    port = free_port()
    return {f"{name}.{i}": _launch(workdir, f"{name}.{i}", args, 4, (i, 2), port, fault_in_1 if i else None)
            for i in range(2)}


def _finish(workdir: Path, procs: dict[str, subprocess.Popen], expected: int = 0, timeout: float = 900) -> None:
    try:
        for name, proc in procs.items():
            rc = proc.wait(timeout=timeout)  # compiling takes 1-3 minutes on 2 busy cores
            assert rc == expected, (workdir / f"{name}.log").read_text()[-4000:]
    finally:
        for proc in procs.values():  # a process left waiting for its peer's collective
            if proc.poll() is None:
                proc.kill()


def _steps_saved(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _sigterm_process_1_once_a_step_is_saved(workdir: Path, run_dir: Path, procs: dict[str, subprocess.Popen]) -> int:
    """Wait for the first checkpoint, SIGTERM process 1 only; both must stop with 143 at the same saved step."""
    deadline = time.monotonic() + 900
    while not _steps_saved(run_dir):
        assert all(p.poll() is None for p in procs.values()), "a process ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    list(procs.values())[1].send_signal(signal.SIGTERM)
    return _both_stopped_at_the_saved_step(workdir, run_dir, procs)


def _both_stopped_at_the_saved_step(workdir: Path, run_dir: Path, procs: dict[str, subprocess.Popen]) -> int:
    _finish(workdir, procs, 128 + signal.SIGTERM)
    logs = [(workdir / f"{name}.log").read_text() for name in procs]
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
# DPO shards the weights over 4 devices inside each process (fsdp) and the batch across the processes too.
DPO_RUN = {**COMMON, "dpo.steps": 4, "dpo.pairs_per_device": 1, "dpo.log_every": 1, "train.export": "unet",
           "optim.warmup_steps": 1, "mesh.data": 2, "mesh.fsdp": 4,
           # Adam with a tiny eps moves every weight by about ±lr whatever the size of its gradient, so last-bit
           # differences of near-zero gradients (one process sums in another order than two) would become
           # lr-sized; eps 1e-3 keeps the update linear in such gradients.
           "optim.eps": 1e-3}
# The two-process DPO runs also sample grids and evaluate, with the weights spread over both processes.
DPO_SAMPLED = {"train.sample_every": 2, "train.eval_every": 2, "train.eval_scorer": "brightness",
               "train.eval_images_per_prompt": 1, "train.sample_steps": 2}
# D3PO: 4 steps per epoch, so a stop lands inside one; 2 denoising steps, one of them trained, keep the compiles
# short (the update unrolls the trained steps). Data parallel over all 8 devices: the processes' collectives go
# through gloo over TCP, where the per-layer weight gathers of fsdp would cost more than the rest of the run.
D3PO_TRAINING = {"d3po.num_epochs": 2, "d3po.train_batch_size": 1, "d3po.timestep_fraction": 0.5,
                 "train.export": "lora", "mesh.data": 8, "mesh.fsdp": 1}
D3PO_RUN = {**COMMON, **D3PO_TRAINING, "d3po.num_batches_per_epoch": 1, "d3po.sample_batch_size": 4,
            "d3po.num_steps": 2, "d3po.eval_every": 0}
ROUNDS_RUN = {**COMMON, **D3PO_TRAINING}


def _args(workdir: Path, objective: str, run_dir: Path, **extra) -> list:
    """The ``dpojax`` arguments of one run of each kind, writing to ``run_dir``, with ``extra`` settings."""
    pretrained = workdir / "tiny-sdxl"
    if objective == "dpo":
        values = {**DPO_RUN, "model.pretrained": pretrained, "data.data_dir": workdir / "pairs"}
        command = ["train", CONFIG]
    elif objective == "d3po":
        values, command = {**D3PO_RUN, "model.pretrained": pretrained}, ["train", D3PO_CONFIG]
    else:
        values, command = ROUNDS_RUN, ["d3po", "train", _round(workdir)]
    return [*command, *(f"{k}={v}" for k, v in {**values, "train.output_dir": run_dir, **extra}.items())]


@dataclasses.dataclass(frozen=True)
class Preempted:
    """The runs of one objective: ``uninterrupted``, and ``interrupted``: two processes, SIGTERM to process 1 once
    a step was saved (both stopped at ``stopped``), then resumed to the end (logs ``resumed_logs``)."""

    uninterrupted: Path
    interrupted: Path
    stopped: int
    resumed_logs: list[str]


@pytest.fixture(scope="module")
def preempted(workdir):
    """``preempted(objective)``: the objective's runs, made once for the module's tests (DPO's uninterrupted run
    is one process with 8 devices, the others' two processes)."""
    made = {}

    def runs(objective: str) -> Preempted:
        if objective not in made:
            uninterrupted, interrupted = workdir / f"{objective}_whole", workdir / f"{objective}_stopped"
            args = _args(workdir, objective, uninterrupted, **{"train.checkpoint_every": 0})  # saves only at its end
            whole = ({"dpo_whole": _launch(workdir, "dpo_whole", args, 8)} if objective == "dpo"
                     else _two(workdir, f"{objective}_whole", args))
            _finish(workdir, whole)
            args = _args(workdir, objective, interrupted, **(DPO_SAMPLED if objective == "dpo" else {}))
            if objective == "dpo":  # the notice lands while the first agreement gathers the flags
                procs = _two(workdir, "dpo_stopped", args, fault_in_1="sigterm-in-agreement:1")
                stopped = _both_stopped_at_the_saved_step(workdir, interrupted, procs)
            else:
                stopped = _sigterm_process_1_once_a_step_is_saved(workdir, interrupted,
                                                                 _two(workdir, f"{objective}_stopped", args))
            late = f"sigterm-in-save:{DPO_RUN['dpo.steps']}" if objective == "dpo" else None  # after the last agreement
            _finish(workdir, _two(workdir, f"{objective}_resumed", args, fault_in_1=late))
            logs = [(workdir / f"{objective}_resumed.{i}.log").read_text() for i in range(2)]
            made[objective] = Preempted(uninterrupted, interrupted, stopped, logs)
        return made[objective]

    return runs


def _records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl without its wall-clock fields."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "pairs_per_second")} for r in records]


def _metrics(run_dir: Path, name: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[name]) for r in records]


@pytest.mark.slow
def test_two_processes_stopped_by_one_sigterm_and_resumed_train_like_one(workdir, preempted):
    """SIGTERM reaches process 1 of two: both save the same step and exit with 143, and the run resumed from
    there makes the steps of one process with 8 devices: losses and the exported final UNet agree to float
    rounding. The two-process runs also show that one agreed decision governs the loop, the save and the
    export, and that they sample and evaluate (``_assert_one_agreed_decision``)."""
    runs = preempted("dpo")
    single = runs.uninterrupted
    assert f"resumed from {runs.interrupted / 'checkpoints' / str(runs.stopped)}" in runs.resumed_logs[0]
    assert "resumed from" not in runs.resumed_logs[1]  # only process 0 prints and logs
    multi = runs.interrupted
    assert [s for s, _ in _metrics(multi, "loss")] == [1, 2, 3, 4]  # one record per step, no replays
    for name in ("model_mse_w", "model_mse_l", "ref_mse"):  # the forward passes agree to float rounding
        np.testing.assert_allclose(_metrics(multi, name), _metrics(single, name), rtol=1e-5, atol=0, err_msg=name)
    # The loss takes beta/2 (5000 here) times a difference of MSE differences (~3e-5 of MSEs ~1.4), so the
    # MSEs' last-bit rounding (the processes sum in another order) shows in it at ~1e-4 relative (measured 6.4e-4).
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
    _assert_one_agreed_decision(runs)


def _assert_one_agreed_decision(runs: Preempted) -> None:
    """One agreed decision governs the loop, the save and the export (the DPO runs' injected notices). A SIGTERM
    handled by process 1 while the first agreement gathers the flags is not that agreement's: both processes
    train step 2 and stop after it (exit 143, the same step). A SIGTERM to process 1 while the last step's
    checkpoint is written comes after the last agreement: both processes finish the run as agreed, with its
    evaluation, sample grid and export, and exit with 0 (``_finish``). The sample grids and evaluations ran with
    the policy's weights spread over both processes."""
    assert runs.stopped == 2
    last = DPO_RUN["dpo.steps"]
    assert f"SIGTERM arrived after the last step was agreed; the run completed at step {last}" in runs.resumed_logs[1]
    multi = runs.interrupted
    assert (multi / "final" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (multi / "samples").iterdir()) == [f"step_{s:06d}.png" for s in (0, 2, 4)]
    evaluated = [(r["step"], r["eval_median"]) for r in map(json.loads, (multi / "metrics.jsonl").read_text()
                                                              .splitlines()) if "eval_median" in r]
    assert [step for step, _ in evaluated] == [2, 4]
    best = max(evaluated, key=lambda e: (e[1], -e[0]))
    assert json.loads((multi / "checkpoints" / "best.json").read_text()) == {"step": best[0], "score": best[1]}


# ----------------------------------------------------------------- a preemption notice that reaches one host


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["d3po", "rounds"])
def test_sigterm_to_one_process_stops_both_and_the_resumed_run_is_exact(preempted, objective):
    """SIGTERM reaches process 1 of two: both save the same step and exit with 143 (the stop is agreed across
    processes after every optimizer step), and the resumed run ends with the final parameters of an
    uninterrupted two-process run bit for bit: same programs on the same devices, same data position (D3PO:
    the samples of the epoch in progress travel in the checkpoint), so no arithmetic differs."""
    runs = preempted(objective)
    assert f"resumed from {runs.interrupted / 'checkpoints' / str(runs.stopped)}" in runs.resumed_logs[0]
    want = load_file(runs.uninterrupted / "final" / "pytorch_lora_weights.safetensors")
    got = load_file(runs.interrupted / "final" / "pytorch_lora_weights.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    steps = [json.loads(line)["step"] for line in (runs.interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one record per logged step, no replays
    # and the same records as the uninterrupted run (a D3PO epoch cut by the stop is summarized whole)
    assert _records(runs.interrupted) == _records(runs.uninterrupted)


