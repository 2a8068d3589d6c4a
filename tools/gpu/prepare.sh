#!/usr/bin/env bash
# Prepare, on a CPU machine, everything the GPU pipeline measurement needs (tools/gpu/run_pipeline.sh):
#   runs/gpu/stages      DeiT-Tiny --split 4,8 (ONNX, ~22 MB)
#   runs/gpu/table.json  clip table (rot_mse_pc, mse_pc; 2/4/8/16 bits) calibrated on image 0 of each class
#   runs/gpu/images      image 1 of each class (never calibrated on), for the GPU-vs-CPU logits check
#   .ortgpu0..4/         the onnxruntime-gpu 1.31.1 wheel in 58 MiB pieces (+ the pyzmq wheel), for
#                        machines reachable only through a 64 MiB working-tree copy
#   tools/gpu/prepare.sh            (from the repository root; QUANTPIPE_SHARED defaults to ../shared)
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED="${QUANTPIPE_SHARED:-../shared}"
W="$SHARED/data/deit-tiny/deit_tiny_patch16_224.safetensors"
IMG="$SHARED/data/imagenet-dev"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
[[ -f runs/gpu/stages/manifest.json ]] || quantpipe export --model deit_tiny_patch16_224 --checkpoint "$W" \
    --split 4,8 --out runs/gpu/stages --verify-data "$IMG" --verify-samples 4 --threads 1
[[ -f runs/gpu/table.json ]] || quantpipe calibrate --stages runs/gpu/stages --dataset imagenet --data-dir "$IMG" \
    --per-class 1 --bits 2,4,8,16 --methods rot_mse_pc,mse_pc --threads 1 --out runs/gpu/table.json
for d in "$IMG"/*/; do
    w=$(basename "$d"); f=$(ls "$d" | sort | sed -n 2p)
    [[ -n "$f" ]] && mkdir -p "runs/gpu/images/$w" && cp "$d/$f" "runs/gpu/images/$w/"
done
if [[ ! -f .ortgpu4/ortwhl.04 ]]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d "$tmp" onnxruntime-gpu==1.31.1 pyzmq
    split -b 58M -d "$tmp"/onnxruntime_gpu-*.whl "$tmp/ortwhl."
    for i in 0 1 2 3 4; do mkdir -p ".ortgpu$i"; mv "$tmp/ortwhl.0$i" ".ortgpu$i/"; done
    mv "$tmp"/pyzmq-*.whl .ortgpu4/
fi
echo "ready: runs/gpu/{stages,table.json,images}, .ortgpu0..4"
