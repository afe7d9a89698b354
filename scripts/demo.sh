#!/usr/bin/env bash
# Set up everything, then run the main job on bundled defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m benchmarks.run_all "$@"
