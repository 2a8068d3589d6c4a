"""A tiny stage graph built with onnx.helper, so engine tests need neither torch nor an export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

WEIGHT = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
BIAS = np.linspace(-1, 1, 8, dtype=np.float32)


def reference(x: np.ndarray) -> np.ndarray:
    """What the tiny stage computes: ``x @ W + b`` on the last axis."""
    return x @ WEIGHT + BIAS


@pytest.fixture(scope="session")
def tiny_stage(tmp_path_factory) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["boundary0", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["boundary1"])],
        "tiny_stage",
        [helper.make_tensor_value_info("boundary0", TensorProto.FLOAT, ["batch", 4, 8])],
        [helper.make_tensor_value_info("boundary1", TensorProto.FLOAT, ["batch", 4, 8])],
        initializer=[numpy_helper.from_array(WEIGHT, "W"), numpy_helper.from_array(BIAS, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path_factory.mktemp("tiny") / "stage1.onnx"
    onnx.save(model, str(path))
    return path
