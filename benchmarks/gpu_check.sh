#!/usr/bin/env bash
# One device call proving shardline's CUDA path (issue 16, item 7): at most 8 minutes on one GPU,
# nothing downloaded. From the repository root, through the device tool:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# .whl (ignored by git) holds the wheels the device image lacks, downloaded here beforehand as
# /work/.library/device/README.md says (python 3.12, manylinux x86_64, --no-deps): structlog,
# and protobuf 7.35.x / grpcio 1.85.x if the image's are older than the generated code needs.
# Results: $OUT/results.json and $OUT/results.md (the rows for BENCHMARKS.md); the log in
# $OUT/gpu_check.log. GPU_CHECK_ARGS adds arguments, e.g. "--big 1b" when 8B does not fit the time.
# A CPU test of the script itself: benchmarks/gpu_check.sh --tiny --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The repository's folders as the `shardline` package, without installing it.
shim=$(mktemp -d)
mkdir -p "$shim/shardline"
touch "$shim/shardline/__init__.py"
for part in proto router shard client demo; do ln -s "$PWD/$part" "$shim/shardline/$part"; done
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
set -o pipefail
python3 benchmarks/gpu_check.py --out "$out" ${GPU_CHECK_ARGS:-} "$@" 2>&1 | tee "$out/gpu_check.log"
