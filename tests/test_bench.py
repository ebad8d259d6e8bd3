"""`dpojax bench` runs end to end through the CLI on the tiny SDXL config and reports both sides and the ratio.

No timing is asserted: speed claims live in the benchmark's output, not in tests.
"""

import json
import re
import sys

import pytest

from dpojax.cli import main

pytestmark = pytest.mark.slow
NUMBER = r"[0-9.]+"


@pytest.fixture(scope="module")
def tiny(tiny_sdxl):
    return tiny_sdxl


def bench_args(tiny, *extra):
    return ["bench", "configs/tiny_sdxl_dpo.yaml", f"model.pretrained={tiny}", "dpo.pairs_per_device=1",
            "mesh.fsdp=1", "--iters", "1", "--rounds", "1", "--warmup", "0", *extra]


def torch_unet_forward_flops(tiny, latent: int) -> int:
    """PyTorch's FLOP counter on diffusers' UNet of the pipeline (plain attention: see test_flops.py), one image."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(tiny / "unet").eval()
    unet.set_attn_processor(AttnProcessor())
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(torch.randn(1, 4, latent, latent), torch.tensor([10]), torch.randn(1, 77, config.cross_attention_dim),
             added_cond_kwargs={"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)})
    return counter.get_total_flops()


def test_bench_times_dpo_and_d3po_against_pytorch(tiny, capsys, monkeypatch):
    """Both steps on both sides; MFU is the model FLOPs (8 UNet forwards per DPO pair, 2 x 2 x 4 per D3PO pair and
    denoising step under guidance) over the median time and the peak, the forward counted as PyTorch counts it."""
    monkeypatch.setattr("dpojax.bench.device_peak_flops", lambda kind: 1e10)  # an assumed peak, 10 GFLOP/s
    assert main(bench_args(tiny, "--d3po-k", "1")) == 0
    out = capsys.readouterr().out
    vae_scale = 2 ** (len(json.loads((tiny / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    image_gflop = torch_unet_forward_flops(tiny, 32 // vae_scale) / 1e9
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


def test_bench_without_diffusers_still_times_jax_and_says_why(tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    monkeypatch.delitem(sys.modules, "dpojax.bench_torch", raising=False)
    assert main(bench_args(tiny, "--d3po-k", "0")) == 0
    out = capsys.readouterr().out
    assert re.search(rf"DPO step .*\[jax\] +compile {NUMBER} s; step median {NUMBER} ms", out), out
    assert re.search(rf"model {NUMBER} GFLOP/step/device .*; MFU: peak unknown \(cpu: cpu\)", out), out
    assert re.search(r"\[torch\] skipped: PyTorch side not timed \(diffusers is not installed", out), out
    assert "ratio" not in out and "D3PO" not in out


def test_bench_refuses_bad_arguments_in_one_line(tiny, capsys):
    assert main(bench_args(tiny, "--d3po-k", "30", "--no-torch")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dpojax bench: error: bench: --d3po-k 30 is more than d3po.num_steps=20"
