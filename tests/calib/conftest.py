"""A tiny ViT-shaped stage export built directly with onnx.helper, so calibration tests run in seconds.

The graphs are small but shaped like the real thing: stage 0 is a patch embedding (Conv, stride =
kernel) plus one residual MLP block, stage 1 another residual block, stage 2 a block, mean pooling and
a classifier. A constant bias puts a few large channels in the residual stream, like DeiT's.
"""

from __future__ import annotations

import numpy as np
import pytest

from quantpipe.manifest import BoundaryInfo, StageInfo, StageManifest, TensorInfo, sha256_file

C = 32  # hidden size
TOKENS = 16  # 16x16 image, 4x4 patches
CLASSES = 10


def _block(prefix: str, x: str, rng: np.random.Generator, nodes: list, inits: list, scale: float = 0.3) -> str:
    """``x + gelu(x @ W1) @ W2``: the residual stream keeps its outlier channels."""
    from onnx import helper, numpy_helper

    w1 = numpy_helper.from_array((rng.standard_normal((C, 2 * C)) * scale / np.sqrt(C)).astype(np.float32), f"{prefix}_w1")
    w2 = numpy_helper.from_array((rng.standard_normal((2 * C, C)) * scale / np.sqrt(2 * C)).astype(np.float32), f"{prefix}_w2")
    inits += [w1, w2]
    nodes += [
        helper.make_node("MatMul", [x, w1.name], [f"{prefix}_h"]),
        helper.make_node("Gelu", [f"{prefix}_h"], [f"{prefix}_g"], domain=""),
        helper.make_node("MatMul", [f"{prefix}_g", w2.name], [f"{prefix}_m"]),
        helper.make_node("Add", [x, f"{prefix}_m"], [f"{prefix}_out"]),
    ]
    return f"{prefix}_out"


def _save(path, name_in: str, shape_in: list, name_out: str, shape_out: list, nodes: list, inits: list) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info(name_in, TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info(name_out, TensorProto.FLOAT, shape_out)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def build_synthetic_stages(out, seed: int = 0) -> StageManifest:
    """Write stage0..2.onnx and manifest.json into ``out``; ``seed`` changes the weights (and hashes)."""
    from onnx import helper, numpy_helper

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # stage 0: patch embedding + a block
    nodes, inits = [], []
    conv = numpy_helper.from_array((rng.standard_normal((C, 3, 4, 4)) * 0.2).astype(np.float32), "patch_w")
    bias = rng.normal(0, 0.2, C).astype(np.float32)
    bias[[3, 17]] = [2.0, -1.5]
    gain = np.ones(C, np.float32)
    gain[[3, 17]] = [15.0, 10.0]  # "massive activation" channels: wide, not just offset
    pos = numpy_helper.from_array(bias.reshape(1, 1, C), "pos")
    inits.append(numpy_helper.from_array(gain.reshape(1, 1, C), "gain"))
    shape = numpy_helper.from_array(np.array([0, C, TOKENS], dtype=np.int64), "shape")
    inits += [conv, pos, shape]
    nodes += [
        helper.make_node("Conv", ["input", "patch_w"], ["pe"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Reshape", ["pe", "shape"], ["pe_flat"]),
        helper.make_node("Transpose", ["pe_flat"], ["tok"], perm=[0, 2, 1]),
        helper.make_node("Add", ["tok", "pos"], ["x0_"]),
        helper.make_node("Mul", ["x0_", "gain"], ["x0"]),
    ]
    y = _block("b0", "x0", rng, nodes, inits)
    nodes.append(helper.make_node("Identity", [y], ["boundary0"]))
    _save(out / "stage0.onnx", "input", ["B", 3, 16, 16], "boundary0", ["B", TOKENS, C], nodes, inits)
    # stage 1: a block
    nodes, inits = [], []
    y = _block("b1", "boundary0", rng, nodes, inits)
    nodes.append(helper.make_node("Identity", [y], ["boundary1"]))
    _save(out / "stage1.onnx", "boundary0", ["B", TOKENS, C], "boundary1", ["B", TOKENS, C], nodes, inits)
    # stage 2: a block, mean pooling, classifier
    nodes, inits = [], []
    y = _block("b2", "boundary1", rng, nodes, inits)
    head = numpy_helper.from_array((rng.standard_normal((C, CLASSES)) / np.sqrt(C)).astype(np.float32), "head")
    inits.append(head)
    nodes += [helper.make_node("ReduceMean", [y, "axes"], ["pooled"], keepdims=0),
              helper.make_node("MatMul", ["pooled", "head"], ["logits"])]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
    _save(out / "stage2.onnx", "boundary1", ["B", TOKENS, C], "logits", ["B", CLASSES], nodes, inits)

    names = [("input", "boundary0"), ("boundary0", "boundary1"), ("boundary1", "logits")]
    shapes = [((None, 3, 16, 16), (None, TOKENS, C)), ((None, TOKENS, C), (None, TOKENS, C)),
              ((None, TOKENS, C), (None, CLASSES))]
    stages = [StageInfo(i, f"stage{i}.onnx", sha256_file(out / f"stage{i}.onnx"), TensorInfo(names[i][0], shapes[i][0]),
                        TensorInfo(names[i][1], shapes[i][1]), (i, i + 1)) for i in range(3)]
    manifest = StageManifest(
        model="synthetic_vit", split=[1, 2], num_blocks=3, stages=stages,
        boundaries=[BoundaryInfo(0, (None, TOKENS, C)), BoundaryInfo(1, (None, TOKENS, C))],
        data_config={"input_size": [3, 16, 16], "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        num_classes=CLASSES, provenance={"command": f"(test fixture, seed {seed})"},
    )
    manifest.write(out)
    return manifest


@pytest.fixture(scope="session")
def synthetic_stages(tmp_path_factory):
    """An export directory of three small ONNX stages (see the module docstring)."""
    pytest.importorskip("onnx")
    out = tmp_path_factory.mktemp("stages")
    build_synthetic_stages(out)
    return out
