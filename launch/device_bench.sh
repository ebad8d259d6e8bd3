#!/usr/bin/env bash
# The accelerator benchmark in one call: `dpojax bench` on random weights of the true SDXL-base and SD1.5
# architectures (dpojax/arch), each case against diffusers' PyTorch step on the same device where torch sees it.
#   bash launch/device_bench.sh [--dry-run] [--tiny] [extra dpojax bench options, e.g. --peak-tflops 989]
# --tiny runs the same benchmark on CPU with a tiny random SDXL-shaped pipeline (what the tests run).
# Every case prints step time, pairs/s, model-FLOP MFU against the peak it names, and peak device memory.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh
TINY=0
if [[ "${ARGS[0]:-}" == "--tiny" ]]; then
  TINY=1
  ARGS=("${ARGS[@]:1}")
fi
# One process holds both sides: JAX must not take most of the GPU's memory up front, or torch gets none.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

bench() {
  run "$PYTHON" -m dpojax.cli bench "$@" --random-weights "${ARGS[@]}"
}

if [[ "$TINY" == 1 ]]; then
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  tiny="$scratch/tiny-sdxl"
  run "$PYTHON" -m dpojax.cli init-tiny "$tiny"
  bench configs/tiny_sdxl_dpo.yaml "model.pretrained=$tiny" dpo.pairs_per_device=1 \
    --iters 1 --rounds 1 --warmup 0 --d3po-k 1
  exit 0
fi

SDXL=(configs/sdxl_dpo.yaml model.pretrained=dpojax/arch/sdxl-base-1.0 data.resolution=1024 dpo.grad_accum=1
      mesh.data=1 mesh.fsdp=1)
SD15=(configs/sd15_dpo.yaml model.pretrained=dpojax/arch/sd-v1-5 data.resolution=512 dpo.grad_accum=1
      mesh.data=1 mesh.fsdp=1)
TIMING=(--iters 5 --rounds 3 --warmup 2)
# SDXL at 1024 px: the DPO step without remat against diffusers, and the D3PO update (K=1); then more pairs per
# device with per-block remat, JAX only. SD1.5 at 512 px: 8 pairs per device against diffusers.
bench "${SDXL[@]}" dpo.pairs_per_device=2 model.remat=none "${TIMING[@]}" --d3po-k 1
bench "${SDXL[@]}" dpo.pairs_per_device=4 model.remat=block "${TIMING[@]}" --d3po-k 0 --no-torch
bench "${SD15[@]}" dpo.pairs_per_device=8 model.remat=none "${TIMING[@]}" --d3po-k 0
