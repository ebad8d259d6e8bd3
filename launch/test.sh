#!/usr/bin/env bash
# The whole test suite on CPU with 8 fake devices (tests/conftest.py sets them up); extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
python -m pytest -q --durations=25 "$@"
