#!/usr/bin/env bash
# Sourced by the other scripts: makes .venv with dpojax and its test extras, reinstalling only when
# pyproject.toml changed. torch==2.13.0 (test extra only) resolves to the local CPU wheel.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.dpojax-pyproject.sha256"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "${root}[test]"
  echo "$want" > "$stamp"
fi
# The HPSv2 and ImageReward originals (parity tests only) go beside the venv, without their dependencies:
# tests/torch_oracles.py says why they cannot share it.
oracles="$venv/oracles"
want_oracles="$(sha256sum "$root/tests/oracles.txt" | cut -d' ' -f1)"
if [ "$(cat "$oracles/.stamp" 2>/dev/null)" != "$want_oracles" ]; then
  rm -rf "$oracles"
  "$venv/bin/python" -m pip install -q --no-deps --target "$oracles" -r "$root/tests/oracles.txt"
  echo "$want_oracles" > "$oracles/.stamp"
fi
export PATH="$venv/bin:$PATH"
