#!/usr/bin/env bash
# Diffusion-DPO on a Cloud TPU pod slice: the same command on every worker, one process per host.
#
#   On your workstation (the repo and its venv already on every worker at $REMOTE_DIR):
#     TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh [--dry-run] configs/sdxl_dpo.yaml key=value ...
#   runs, through `gcloud compute tpus tpu-vm ssh --worker=all`, this script on each worker, which starts
#     python3 -m dpojax.cli train CONFIG key=value ... --distributed on
#   JAX finds the other workers itself (TPU metadata); output_dir must be storage all workers share.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/lib.sh
source launch/lib.sh
usage_if_no_config "$0"
if [[ -n "${TPU_NAME:-}" ]]; then
  : "${ZONE:?set ZONE to the zone of the TPU}"
  remote_dir="${REMOTE_DIR:-dpojax}"
  inner="$(printf '%q ' "${ARGS[@]}")"
  venv="${REMOTE_VENV:-.venv}"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
    --command "cd $remote_dir && source $venv/bin/activate && launch/tpu_pod.sh $inner"
else
  run "${TRAIN[@]}" --distributed on
fi
