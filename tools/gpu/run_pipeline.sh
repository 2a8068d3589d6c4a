#!/usr/bin/env bash
# On the GPU machine: assemble and install onnxruntime-gpu (+ pyzmq) from the carried pieces, then run
# bench/gpu_pipeline.py; the report and the daemons' logs go to $OUT.
#   tools/gpu/run_pipeline.sh [bench/gpu_pipeline.py options]
# Pieces: /tmp/asm/ortwhl.00..03 (moved there by earlier calls) and .ortgpu4/ (ortwhl.04 + the pyzmq wheel).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
WHL=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
if [[ ! -f /tmp/site/onnxruntime/__init__.py ]]; then
    cat /tmp/asm/ortwhl.0[0-3] .ortgpu4/ortwhl.04 > "$WHL" && sha256sum "$WHL"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHL" .ortgpu4/pyzmq-*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
python3 -c "import onnxruntime as o, zmq; print('onnxruntime', o.__version__, o.get_available_providers(), 'pyzmq', zmq.__version__)"
python3 bench/gpu_pipeline.py --out /tmp/gpp "$@" 2>&1 | tee "$OUT/gpu_pipeline.txt"
cp /tmp/gpp/report.json "$OUT/" 2>/dev/null
(cd /tmp/gpp && tar czf "$OUT/logs.tgz" */logs */pipeline.toml 2>/dev/null)
