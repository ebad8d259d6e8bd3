#!/usr/bin/env bash
# Diffusion-DPO on one multi-GPU node.
#
#   launch/gpu_node.sh [--dry-run] configs/sd15_dpo.yaml key=value ...
# runs one process that drives every visible GPU (the usual JAX set-up). With PROCESSES=N (N dividing
# the GPU count, GPUS=8 by default) it runs N processes instead, each on GPUS/N GPUs, joined through a
# coordinator on 127.0.0.1:PORT (PORT=29500 by default): the layout of a multi-node job, on one node.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/lib.sh
source launch/lib.sh
usage_if_no_config "$0"
processes="${PROCESSES:-1}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
if [[ "$processes" == 1 ]]; then
  run "${TRAIN[@]}" --distributed off
  exit 0
fi
gpus="${GPUS:-8}"
port="${PORT:-29500}"
if (( gpus % processes != 0 )); then
  echo "gpu_node.sh: PROCESSES=$processes does not divide GPUS=$gpus" >&2
  exit 2
fi
per=$(( gpus / processes ))
pids=()
for (( i = 0; i < processes; i++ )); do
  devices="$(seq -s, $(( i * per )) $(( (i + 1) * per - 1 )))"
  if [[ "$DRY_RUN" == 1 ]]; then
    run env CUDA_VISIBLE_DEVICES="$devices" "${TRAIN[@]}" --coordinator "127.0.0.1:$port" \
      --num-processes "$processes" --process-id "$i"
  else
    run env CUDA_VISIBLE_DEVICES="$devices" "${TRAIN[@]}" --coordinator "127.0.0.1:$port" \
      --num-processes "$processes" --process-id "$i" &
    pids+=("$!")
  fi
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
