#!/usr/bin/env bash
# Set up (if needed), build the CI fixture pair (cached), run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export VLLM_CAST_CACHE="$PWD/.cache"
.venv/bin/python -m vllm_cast.fixtures.build --size ci
exec .venv/bin/python -m pytest -q "$@"
