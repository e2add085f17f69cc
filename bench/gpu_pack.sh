#!/usr/bin/env bash
# The wheels bench/gpu.sh needs beyond ../shared/gpu/pack.sh's serving stack: httpx for the load
# generator, onnx and onnxconverter-common for fp16 copies of a model that predates them.
# usage (project root): bash bench/gpu_pack.sh  -> .gpu-carry/extra (a few MiB: one more carry)
set -euo pipefail
out=.gpu-carry/extra
grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
rm -rf "$out" && mkdir -p "$out"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out" httpx onnx onnxconverter-common
rm -f "$out"/numpy-* "$out"/protobuf-*  # on the GPU machine already
du -sh "$out"
