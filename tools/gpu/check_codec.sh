#!/usr/bin/env bash
# On a CUDA machine: the GPU codec's semantics tests and its benchmark, output under $OUT (or ./out).
#   tools/gpu/check_codec.sh            (from the repository root; needs cupy, numba, numpy, pytest)
# Wheels in .gpuwheels/ (e.g. pyzmq) are installed into /tmp/site first when present.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
if ls .gpuwheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwheels/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import cupy, numpy, numba; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest tests/quant/test_gpu_codec.py -q -s -p no:cacheprovider -m "gpu or not gpu" 2>&1 | tee "$OUT/test_gpu_codec.txt"
python3 -c "import sys; from quantpipe.cli import main; sys.exit(main(['bench', 'codec', '--device', 'cuda', '--repeat', '${REPEAT:-15}', *sys.argv[1:]]))" --json > "$OUT/bench_codec_cuda.json"
python3 -c "import json, sys; from quantpipe.benchmarks.codec import format_cuda_table; print(format_cuda_table(json.load(open(sys.argv[1]))))" "$OUT/bench_codec_cuda.json" | tee "$OUT/bench_codec_cuda.txt"
