"""export_stage on its own: external data above the size threshold, opset pinning, checker."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from quantpipe.engines import load_engine
from quantpipe.errors import QuantpipeError
from quantpipe.export.model import create_model
from quantpipe.export.onnx_export import export_stage
from quantpipe.export.split import build_stages
from quantpipe.export.verify import check_graphs


def test_large_stage_goes_to_external_data_and_older_opset_is_pinned(tmp_path):
    stage = build_stages(create_model("test_vit"), [2, 4])[1]
    example = torch.randn(2, 101, 64)
    # threshold 0 stands in for a > 2 GB stage (ViT-H and up), which CI cannot afford to export
    graph = export_stage(stage, example, tmp_path / "stage1.onnx", "boundary0", "boundary1", opset=17,
                         external_data_threshold=0)
    assert graph.data_path == tmp_path / "stage1.onnx.data" and graph.data_path.stat().st_size > 100_000
    assert (tmp_path / "stage1.onnx").stat().st_size < 100_000  # weights are not inside the graph
    proto = onnx.load(str(graph.path), load_external_data=False)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert graph.input_shape == (None, 101, 64) and graph.output_shape == (None, 101, 64)
    check_graphs([graph.path])
    engine = load_engine(graph.path, providers=["cpu"])
    x = torch.randn(5, 101, 64)
    with torch.no_grad():
        ref = stage(x).numpy()
    np.testing.assert_allclose(engine.run(x.numpy()), ref, rtol=1e-4, atol=1e-4)


def test_small_stage_is_self_contained_and_old_opsets_are_refused(tmp_path):
    stage = build_stages(create_model("test_vit"), [5])[1]
    with pytest.raises(QuantpipeError, match="opset >= 17"):
        export_stage(stage, torch.randn(2, 101, 64), tmp_path / "s.onnx", "boundary0", "logits", opset=16)
    with pytest.raises(ValueError, match="at least 2"):
        export_stage(stage, torch.randn(1, 101, 64), tmp_path / "s.onnx", "boundary0", "logits")


def test_checker_rejects_a_broken_graph(tmp_path):
    from onnx import TensorProto, helper

    bad = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],  # output nobody produces
    ))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(QuantpipeError, match="onnx.checker rejected"):
        check_graphs([tmp_path / "bad.onnx"])
