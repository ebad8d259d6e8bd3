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
export PATH="$venv/bin:$PATH"
