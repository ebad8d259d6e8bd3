"""`dpojax bench` runs end to end through the CLI on the tiny SDXL config and reports both sides and the ratio.

No timing is asserted: speed claims live in the benchmark's output, not in tests.
"""

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


def test_bench_times_dpo_and_d3po_against_pytorch(tiny, capsys):
    assert main(bench_args(tiny, "--d3po-k", "1")) == 0
    out = capsys.readouterr().out
    for step in (r"DPO step \(UNets only[^)]*\)", r"D3PO step, K=1 of 20 steps"):
        assert re.search(step + rf" \[jax\] +compile {NUMBER} s; step median {NUMBER} ms .*pairs/s; "
                                rf"{NUMBER} GFLOP/step/device; MFU: peak unknown", out), out
        assert re.search(step + rf" \[torch\] step median {NUMBER} ms .*diffusers UNet2DConditionModel", out), out
        assert re.search(step + rf" ratio jax/torch = {NUMBER}", out), out
    assert "attention kernel: xla (requested auto; on cpu)" in out


def test_bench_without_diffusers_still_times_jax_and_says_why(tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    monkeypatch.delitem(sys.modules, "dpojax.bench_torch", raising=False)
    assert main(bench_args(tiny, "--d3po-k", "0")) == 0
    out = capsys.readouterr().out
    assert re.search(rf"DPO step .*\[jax\] +compile {NUMBER} s; step median {NUMBER} ms", out), out
    assert re.search(r"\[torch\] skipped: PyTorch side not timed \(diffusers is not installed", out), out
    assert "ratio" not in out and "D3PO" not in out


def test_bench_refuses_bad_arguments_in_one_line(tiny, capsys):
    assert main(bench_args(tiny, "--d3po-k", "30", "--no-torch")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dpojax bench: error: bench: --d3po-k 30 is more than d3po.num_steps=20"
