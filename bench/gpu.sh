#!/usr/bin/env bash
# The GPU benchmark in one call (bench/gpu.py), under 8 minutes on one GPU; results in $OUT.
# On the device machine, after the wheels are installed (docs/benchmarks.md, "On a GPU"):
#   export PYTHONPATH=/tmp/site:$PWD ORT_DISABLE_TELEMETRY=1 && bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
exec timeout 470 python3 -m bench.gpu --out "${OUT:-bench/results}" --seconds "${GPU_BENCH_SECONDS:-3}" "$@"
