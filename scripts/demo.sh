#!/usr/bin/env bash
# Main job: set up (if needed), build the local target + EAGLE-3 pair (cached), then serve the
# target with CAST on http://127.0.0.1:${PORT:-8000} (OpenAI API). Extra args go to `vllm-cast serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export VLLM_CAST_CACHE="$PWD/.cache" VLLM_CACHE_ROOT="$PWD/.cache/vllm"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
FIXTURE=$(.venv/bin/python -m vllm_cast.fixtures.build --size "${FIXTURE_SIZE:-ci}" | tail -n 1)
# Trees of up to 16 nodes; CAST_KEYS adds CAST keys, e.g. CAST_KEYS='"breadth_threshold": 0.5,'
SPEC="{${CAST_KEYS:-} \"method\": \"cast\", \"model\": \"$FIXTURE/eagle3\", \"num_speculative_tokens\": 16}"
echo "serving $FIXTURE/target with speculative config $SPEC"
exec .venv/bin/vllm-cast serve "$FIXTURE/target" --host 127.0.0.1 --port "${PORT:-8000}" \
  --max-model-len 4096 --enforce-eager --speculative-config "$SPEC" "$@"
