"""`dpojax bench` runs end to end on the tiny SDXL config and reports both sides and the ratio: through the
accelerator benchmark's script in its CPU mode (random weights), and through the CLI on the pipeline's weights.

No timing is asserted: speed claims live in the benchmark's output, not in tests.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, cli_env, pairs_workdir, torch_unet_flops

from dpojax.cli import main

pytestmark = pytest.mark.slow
NUMBER = r"[0-9.]+"


@pytest.fixture(scope="module")
def tiny(tiny_sdxl):
    return tiny_sdxl


def bench_args(tiny, *extra):
    return ["bench", "configs/tiny_sdxl_dpo.yaml", f"model.pretrained={tiny}", "dpo.pairs_per_device=1",
            "mesh.data=1", "mesh.fsdp=1", "--iters", "1", "--rounds", "1", "--warmup", "0", *extra]


def test_device_bench_script_runs_its_tiny_cpu_mode(tiny, tmp_path):
    """`launch/device_bench.sh --tiny`: both steps on both sides with random weights; MFU is the model FLOPs (8 UNet
    forwards per DPO pair, 2 x 2 x 4 per D3PO pair and denoising step under guidance) over the median time and the
    peak given, the forward counted as PyTorch's FLOP counter counts it."""
    done = subprocess.run(["bash", "launch/device_bench.sh", "--tiny", "--peak-tflops", "0.01"], cwd=REPO,
                          env={**cli_env(tmp_path), "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "random weights" in out and "peak memory unknown (not reported on this device)" in out
    vae_scale = 2 ** (len(json.loads((tiny / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    from diffusers import UNet2DConditionModel

    image_gflop = torch_unet_flops(UNet2DConditionModel.from_pretrained(tiny / "unet"), 32 // vae_scale) / 1e9
    for step, forwards in ((r"DPO step \(UNets only[^)]*\)", 8), (r"D3PO step, K=1 of 20 steps", 16)):
        jax_line = re.search(step + rf" \[jax\] +compile {NUMBER} s; step median ({NUMBER}) ms .*pairs/s; "
                                    rf"XLA counts {NUMBER} GFLOP/step/device; model ({NUMBER}) GFLOP/step/device "
                                    rf"\({forwards} UNet forwards per pair x ({NUMBER}) GFLOP\); "
                                    rf"MFU ({NUMBER})% of 0.01 TFLOP/s \(assumed dense bf16 peak\)", out)
        assert jax_line, out
        median_ms, model_gflop, forward_gflop, mfu = map(float, jax_line.groups())
        assert forward_gflop == pytest.approx(image_gflop, rel=5e-3)  # printed to 3 digits
        assert model_gflop == pytest.approx(forwards * image_gflop, rel=5e-3)  # 1 pair per device
        assert mfu == pytest.approx(100 * model_gflop / (median_ms / 1e3) / 10, rel=0.02)
        assert re.search(step + rf" \[torch\] step median {NUMBER} ms .*diffusers UNet2DConditionModel", out), out
        assert re.search(step + rf" ratio jax/torch = {NUMBER}", out), out
    assert "attention kernel: xla (requested auto; on cpu)" in out


def test_torch_side_loads_the_pipeline_weights_and_steps(tiny):
    """The PyTorch side on the pipeline's own weights (as `dpojax bench` without --random-weights): the UNets hold
    the folder's tensors and a DPO step moves the policy only."""
    import torch
    from safetensors.numpy import load_file

    from dpojax.bench import bench_config, dpo_inputs
    from dpojax.bench_torch import TorchRunner
    from dpojax.config import load_config
    from dpojax.train.harness import Setup

    config = bench_config(load_config(REPO / "configs" / "tiny_sdxl_dpo.yaml", [f"model.pretrained={tiny}"]), 1)
    runner = TorchRunner(config, threads=1)
    weights = load_file(tiny / "unet" / "diffusion_pytorch_model.safetensors")
    for unet in (runner.unet, runner.reference):
        state = unet.state_dict()
        assert all(np.array_equal(state[k].numpy(), v) for k, v in weights.items())
    components = Setup.build(config, weights="none", mesh=None).components
    runner.dpo_step(dpo_inputs(components, config, 2, encode=False))()
    moved = runner.unet.state_dict()
    assert any(not torch.equal(moved[k], torch.from_numpy(v)) for k, v in weights.items())
    assert all(np.array_equal(runner.reference.state_dict()[k].numpy(), v) for k, v in weights.items())


def test_bench_without_diffusers_still_times_jax_and_says_why(tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    monkeypatch.delitem(sys.modules, "dpojax.bench_torch", raising=False)
    assert main(bench_args(tiny, "--d3po-k", "0")) == 0
    out = capsys.readouterr().out
    assert re.search(rf"DPO step .*\[jax\] +compile {NUMBER} s; step median {NUMBER} ms", out), out
    assert re.search(rf"model {NUMBER} GFLOP/step/device .*; MFU: peak unknown \(cpu: cpu\)", out), out
    assert re.search(r"\[torch\] skipped: PyTorch side not timed \(diffusers is not installed", out), out
    assert "ratio" not in out and "D3PO" not in out


def test_bench_times_the_input_pipeline_beside_the_step(tiny, tmp_path, capsys):
    """`--loader N`: the loader `dpojax train` reads (JPEG decode and crop of prepared pairs), timed alone, its
    pairs/s set against the DPO step's; `--loader-only` times it without the steps."""
    root = pairs_workdir(tmp_path, tiny, 16, eval_rows=2, image_size=64)
    assert main(bench_args(tiny, f"data.data_dir={root / 'pairs'}", "--d3po-k", "0", "--no-torch",
                           "--loader", "4")) == 0
    out = capsys.readouterr().out
    step = re.search(rf"DPO step .*\[jax\] .*; ({NUMBER}) pairs/s", out)
    source = re.escape(f"{root / 'pairs'}: JPEG decode, resize and centre crop to 32 px, ")
    line = re.search(rf"input pipeline \[{source}flip per_image, 0 grain workers\] ({NUMBER}) pairs/s "
                     rf"\(4 batches of 1 pairs per process, "
                     rf"({NUMBER}) s\); the DPO step takes ({NUMBER}) pairs/s: the loader (keeps up|starves it) "
                     rf"\(({NUMBER})x\)", out)
    assert step and line, out
    rate, seconds, needed, verdict, factor = (float(line[1]), float(line[2]), float(line[3]), line[4],
                                              float(line[5]))
    assert rate == pytest.approx(4 / seconds, rel=max(0.02, 0.001 / seconds))  # 4 batches of 1 pair, rounded
    assert needed == pytest.approx(float(step[1]), rel=0.01)
    assert factor == pytest.approx(rate / needed, rel=0.02, abs=0.06) and (verdict == "keeps up") == (rate >= needed)
    assert main(bench_args(tiny, f"data.data_dir={root / 'pairs'}", "--loader", "2", "--loader-only")) == 0
    out = capsys.readouterr().out
    assert "DPO step" not in out and re.search(rf"\(2 batches of 1 pairs per process, {NUMBER} s\)\n$", out), out
    assert main(bench_args(tiny, "--loader-only")) == 2
    assert capsys.readouterr().err.strip() == "dpojax bench: error: bench: --loader-only needs --loader BATCHES"
    assert main(bench_args(tiny, "--loader", "-1")) == 2  # refused before any step runs
    assert capsys.readouterr().err.strip() == ("dpojax bench: error: bench: --loader must be >= 0 batches "
                                               "(0: not timed), got -1")


def test_bench_refuses_bad_arguments_in_one_line(tiny, capsys):
    assert main(bench_args(tiny, "--d3po-k", "30", "--no-torch")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dpojax bench: error: bench: --d3po-k 30 is more than d3po.num_steps=20"
    assert main(bench_args(tiny, "--peak-tflops", "0", "--no-torch")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dpojax bench: error: bench: --peak-tflops must be > 0, got 0.0"
