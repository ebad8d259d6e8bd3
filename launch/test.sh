#!/usr/bin/env bash
# The whole test suite on CPU with 8 fake devices (tests/conftest.py sets them up), one pytest-xdist worker per
# core (at most 4: each holds a few GB); extra args go to pytest.
# The labeling page's test drives Debian's headless Chromium: installed here when it can be (root with apt).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
  else
    echo "launch/test.sh: the browser test needs Chromium and its driver: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
source launch/venv.sh
# glibc reads its tunables at start: malloc on huge pages, as the dpojax command runs itself (dpojax/host.py).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
python -m pytest -q -n auto --maxprocesses=4 --dist loadgroup --durations=25 "$@"
