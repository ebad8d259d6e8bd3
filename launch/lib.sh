# shellcheck shell=bash
# Sourced by the launch scripts: dry-run handling and the training command they all run.

# Leading --dry-run (or DRY_RUN=1): print the commands instead of running them.
DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
ARGS=("$@")
PYTHON="${PYTHON:-python3}"

usage_if_no_config() {
  if [[ ${#ARGS[@]} -eq 0 ]]; then
    echo "usage: $1 [--dry-run] CONFIG.yaml [key=value ...] [dpojax train options]" >&2
    exit 2
  fi
}

# Run a command, or print it shell-quoted (one line, copy-pastable) under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# The command every process runs: `dpojax train CONFIG overrides... options...` (used by the sourcing script).
# shellcheck disable=SC2034
TRAIN=("$PYTHON" -m dpojax.cli train "${ARGS[@]}")
