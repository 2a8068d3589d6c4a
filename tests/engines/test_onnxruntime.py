"""The onnxruntime backend and load_engine's backend choice."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from quantpipe.engines import Engine, load_engine
from quantpipe.engines.onnxruntime import OnnxRuntimeEngine, resolve_providers
from quantpipe.errors import ArtifactMismatchError, ConfigError

from .conftest import reference

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_providers_are_ordered_tensorrt_cuda_cpu_and_filtered():
    assert resolve_providers(None, ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]) == ALL
    assert resolve_providers(None, ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ALL[1:]


def test_explicit_providers_keep_their_order_and_accept_short_names():
    assert resolve_providers(["cpu"], ALL) == ["CPUExecutionProvider"]
    assert resolve_providers(["cuda", "CPUExecutionProvider", "cpu"], ALL) == ALL[1:]


def test_explicitly_requested_missing_provider_is_an_error():
    with pytest.raises(ConfigError, match="'cuda' was requested but is not available.*onnxruntime-gpu"):
        resolve_providers(["cuda", "cpu"], ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="spelling"):
        resolve_providers(["cpux"], ["CPUExecutionProvider"])


def test_missing_provider_fails_at_load(tiny_stage):
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    with pytest.raises(ConfigError, match="TensorRT"):
        load_engine(tiny_stage, providers=["tensorrt"])


def test_runs_a_stage_and_reports_specs(tiny_stage, caplog):
    with caplog.at_level(logging.INFO, logger="quantpipe.engines.onnxruntime"):
        engine = load_engine(tiny_stage, threads=1)
    assert isinstance(engine, OnnxRuntimeEngine) and isinstance(engine, Engine)
    assert "providers CPUExecutionProvider" in caplog.text  # the providers actually used are logged
    assert engine.input.name == "boundary0" and engine.input.shape == (None, 4, 8)
    assert engine.output.name == "boundary1" and engine.output.dtype == np.float32
    assert engine.providers[-1] == "CPUExecutionProvider"
    assert "threads=1" in engine.describe()
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 4, 8)).astype(np.float32)
        np.testing.assert_allclose(engine.run(x), reference(x), rtol=1e-5, atol=1e-5)
    # float64 input is converted, not rejected
    x64 = np.ones((2, 4, 8))
    np.testing.assert_allclose(engine.run(x64), reference(x64.astype(np.float32)), rtol=1e-5, atol=1e-5)
    engine.close()


def test_wrong_shape_is_refused_with_both_shapes(tiny_stage):
    engine = load_engine(tiny_stage, backend="onnxruntime")
    with pytest.raises(ArtifactMismatchError, match=r"\[2, 4, 9\] does not fit boundary0 \[B, 4, 8\]"):
        engine.run(np.zeros((2, 4, 9), np.float32))
    with pytest.raises(ArtifactMismatchError):
        engine.run(np.zeros((4, 8), np.float32))


def test_bad_arguments(tiny_stage, tmp_path):
    with pytest.raises(ConfigError, match="unknown engine backend"):
        load_engine(tiny_stage, backend="openvino")
    with pytest.raises(ConfigError, match="threads"):
        load_engine(tiny_stage, threads=0)
    with pytest.raises(ArtifactMismatchError, match="not found"):
        load_engine(tmp_path / "nope.onnx")
    plan = tmp_path / "stage0.plan"
    plan.write_bytes(b"x")
    with pytest.raises(ConfigError, match="serialized TensorRT engine"):
        load_engine(plan, backend="onnxruntime")
    with pytest.raises(ConfigError, match="onnxruntime backend only"):
        load_engine(tiny_stage, backend="tensorrt", providers=["cpu"])


def test_cpu_engine_device_and_run_device(tiny_stage):
    engine = load_engine(tiny_stage, providers=["cpu"], threads=1)
    assert engine.device == "cpu"
    with pytest.raises(NotImplementedError, match="runs on the cpu"):
        engine.run_device(np.zeros((1, 4, 8), np.float32))


def test_providers_that_cannot_load_are_skipped_and_logged(tiny_stage, monkeypatch, caplog):
    """onnxruntime-gpu lists TensorRT everywhere; without libnvinfer it must be skipped up front (no EP Error)."""
    from quantpipe.engines import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "provider_load_error",
                        lambda name: "libnvinfer.so.10: cannot open shared object file" if name.startswith("Tensorrt") else "")
    kept, dropped = ort_backend.loadable_providers(ALL)
    assert kept == ALL[1:] and list(dropped) == ["TensorrtExecutionProvider"]
    assert ort_backend.loadable_providers(["TensorrtExecutionProvider"])[0] == ["CPUExecutionProvider"]
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(ALL))
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    with caplog.at_level(logging.INFO, logger="quantpipe.engines.onnxruntime"):
        engine = load_engine(tiny_stage)
    assert _FakeSession.asked == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    line = [r.getMessage() for r in caplog.records if "providers" in r.getMessage()]
    assert len(line) == 1 and "TensorrtExecutionProvider skipped: cannot load" in line[0]
    assert engine.device == "cuda" and engine.skipped_providers
    with pytest.raises(ConfigError, match="TensorrtExecutionProvider was requested but cannot load"):
        load_engine(tiny_stage, providers=["tensorrt", "cpu"])


def test_provider_load_error_is_empty_for_the_cpu_provider():
    from quantpipe.engines.onnxruntime import provider_load_error

    assert provider_load_error("CPUExecutionProvider") == ""


class _FakeSession:
    """Stands in for onnxruntime.InferenceSession: records the providers asked for."""

    asked: list = []

    def __init__(self, path, sess_options=None, providers=None):  # noqa: ANN001
        _FakeSession.asked = [p if isinstance(p, str) else p[0] for p in providers]
        self._providers = list(_FakeSession.asked)

    def get_providers(self):  # noqa: ANN201
        return self._providers

    def get_inputs(self):  # noqa: ANN201
        return [_Arg("boundary0", ["batch", 4, 8])]

    def get_outputs(self):  # noqa: ANN201
        return [_Arg("boundary1", ["batch", 4, 8])]


class _Arg:
    def __init__(self, name, shape):  # noqa: ANN001
        self.name, self.shape, self.type = name, shape, "tensor(float)"
