#!/usr/bin/env bash
# The whole product end to end on one machine: export DeiT-Tiny into three stages, calibrate clip tables
# on one image per class, then stream held-out images through a pipeline of three stage daemons while the
# stage-to-stage links step through the paper's bandwidth schedule (scaled to a small CPU), and print the
# summary and the path of the adaptation plot.
#
#   tools/demo.sh [OUT_DIR]            (default runs/demo; run from the repository root)
#
# Inputs: ../shared/data/deit-tiny (weights) and ../shared/data/imagenet-dev (images); override with
# QP_WEIGHTS and QP_IMAGES. Without the weights it falls back to timm's tiny random 'test_vit' (said
# plainly below: its accuracy is meaningless, the pipeline mechanics are the same) on synthetic images.
# Set QP_SHAPING=netns (as root) to shape real veth links with tc tbf instead of the in-process emulation.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-runs/demo}"
SHARED="${QUANTPIPE_SHARED:-../shared}"
WEIGHTS="${QP_WEIGHTS:-$SHARED/data/deit-tiny/deit_tiny_patch16_224.safetensors}"
IMAGES="${QP_IMAGES:-$SHARED/data/imagenet-dev}"
SHAPING="${QP_SHAPING:-emulate}"
mkdir -p "$OUT"

if [[ -f "$WEIGHTS" ]]; then
    MODEL=(--model deit_tiny_patch16_224 --checkpoint "$WEIGHTS")
    SPLIT=4,8  # 12 blocks -> stages of 4
    CONFIG=tools/pipelines/deit-tiny.toml
else
    echo "demo: $WEIGHTS not found: using timm's random 'test_vit' instead of DeiT-Tiny (accuracy is meaningless)" >&2
    MODEL=(--model test_vit)
    SPLIT=2,4  # test_vit has 6 blocks -> stages of 2
    CONFIG=tools/pipelines/deit-tiny.toml
fi
if [[ -d "$IMAGES" ]]; then
    CALIB_DATA=(--dataset imagenet --data-dir "$IMAGES" --per-class 1)  # image 0 of every class
    RUN_DATA=(--images "$IMAGES" --offset 1)                            # never evaluated on those
    VERIFY=(--verify-data "$IMAGES" --verify-samples 16)
else
    echo "demo: $IMAGES not found: calibrating and streaming synthetic images (no accuracy figure)" >&2
    CALIB_DATA=(--dataset synthetic --num-images 64)
    RUN_DATA=()
    VERIFY=(--verify-samples 4)
fi

echo "== 1/3 export ($OUT/stages)"
[[ -f "$OUT/stages/manifest.json" ]] || quantpipe export "${MODEL[@]}" --split "$SPLIT" --out "$OUT/stages" "${VERIFY[@]}" --threads 1
echo "== 2/3 calibrate ($OUT/table.json)"
[[ -f "$OUT/table.json" ]] || quantpipe calibrate --stages "$OUT/stages" "${CALIB_DATA[@]}" \
    --bits 2,4,6,8,16 --methods rot_mse_pc --threads 1 --out "$OUT/table.json"
echo "== 3/3 run: bandwidth $(grep bandwidth_schedule "$CONFIG" | cut -d'"' -f2) (s:Mbit/s), $SHAPING links"
quantpipe run --config "$CONFIG" --stages-dir "$OUT/stages" --clip-table "$OUT/table.json" "${RUN_DATA[@]}" \
    --shaping "$SHAPING" --out "$OUT/run"
