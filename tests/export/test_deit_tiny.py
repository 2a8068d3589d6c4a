"""The real DeiT-Tiny, split 4,8: chained ONNX stages vs torch on real ImageNet images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantpipe.engines import load_engine
from quantpipe.manifest import load_manifest

MODEL = "deit_tiny_patch16_224"
IMAGES = 16  # small: the suite shares 2 cores; `quantpipe export ... --verify-samples 0` checks all 750


@pytest.mark.slow
def test_deit_tiny_chain_matches_torch_on_real_images(deit_tiny_stages, deit_tiny_weights, imagenet_dev):
    # deit_tiny_stages ran `quantpipe export ... --verify-data imagenet-dev --verify-samples 16` (exit 0)
    out = deit_tiny_stages
    manifest = load_manifest(out)
    assert [s.blocks for s in manifest.stages] == [(0, 4), (4, 8), (8, 12)]
    assert [b.shape for b in manifest.boundaries] == [(None, 197, 192), (None, 197, 192)]
    # timm's own preprocessing for DeiT (crop_pct 0.9, not the 0.875 of most ImageNet models)
    assert manifest.data_config == {
        "input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
        "mean": pytest.approx([0.485, 0.456, 0.406]), "std": pytest.approx([0.229, 0.224, 0.225]),
    }
    assert manifest.provenance["weights"]["kind"] == "checkpoint"

    # Independently of export's own verification: run the stage graphs from the manifest as a pipeline
    # would, on the same real images, and compare with the torch model loaded from the same weights.
    from quantpipe.export.data import image_inputs
    from quantpipe.export.model import create_model

    model = create_model(MODEL, checkpoint=deit_tiny_weights)
    inputs = image_inputs(imagenet_dev, manifest.data_config, IMAGES)
    engines = [load_engine(manifest.stage_path(k), providers=["cpu"]) for k in range(manifest.num_stages)]
    worst_abs, worst_rel, agree, correct = 0.0, 0.0, 0, 0
    for start in range(0, IMAGES, 8):
        x = inputs.images[start : start + 8]
        h = x.numpy()
        for engine in engines:
            h = engine.run(h)
        with torch.no_grad():
            ref = model(x).numpy()
        worst_abs = max(worst_abs, float(np.abs(h - ref).max()))
        worst_rel = max(worst_rel, float(np.abs(h - ref).max() / np.abs(ref).max()))
        agree += int((h.argmax(1) == ref.argmax(1)).sum())
        correct += int((h.argmax(1) == np.array(inputs.labels[start : start + 8])).sum())
    print(f"\nDeiT-Tiny split 4,8, {IMAGES} real images: chained ONNX vs torch logits max abs {worst_abs:.3e}, "
          f"rel {worst_rel:.3e}, top-1 agreement {agree}/{IMAGES}, top-1 correct {correct}/{IMAGES}")
    assert agree == IMAGES  # top-1 identical
    assert worst_rel <= 1e-4  # what the quantization-off pipeline test downstream relies on
    assert correct >= IMAGES // 2  # real weights on real images: a broken preprocessing would be near 0
