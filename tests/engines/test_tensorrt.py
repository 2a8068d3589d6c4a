"""The TensorRT backend: importable everywhere, clear errors without TensorRT, real builds where it runs."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from quantpipe.engines import load_engine, tensorrt_available
from quantpipe.errors import MissingDependencyError

from .conftest import reference


def test_module_imports_without_tensorrt():
    module = importlib.import_module("quantpipe.engines.tensorrt")
    assert callable(module.build_engine) and module.TensorRTEngine.backend == "tensorrt"


@pytest.mark.skipif(tensorrt_available(), reason="checks the message shown where TensorRT is missing")
def test_without_tensorrt_the_error_says_what_to_install(tiny_stage, tmp_path):
    with pytest.raises(MissingDependencyError, match=r"pip install 'quantpipe\[tensorrt\]'"):
        load_engine(tiny_stage, backend="tensorrt")
    plan = tmp_path / "stage1.plan"
    plan.write_bytes(b"x")
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        load_engine(plan)  # auto picks TensorRT for a .plan


def test_engine_key_covers_everything_a_plan_depends_on():
    from quantpipe.engines.tensorrt import engine_key

    gpu = {"gpu": "NVIDIA H100", "compute_capability": "9.0"}
    base = engine_key("ab" * 32, (1, 8, 32), False, "10.3.0", gpu)
    assert base["precision"] == "fp32" and base["profile"] == {"min": 1, "opt": 8, "max": 32}
    variants = [
        engine_key("cd" * 32, (1, 8, 32), False, "10.3.0", gpu),
        engine_key("ab" * 32, (1, 8, 64), False, "10.3.0", gpu),
        engine_key("ab" * 32, (1, 8, 32), True, "10.3.0", gpu),
        engine_key("ab" * 32, (1, 8, 32), False, "8.6.1", gpu),
        engine_key("ab" * 32, (1, 8, 32), False, "10.3.0", {"gpu": "Orin", "compute_capability": "8.7"}),
    ]
    assert all(v != base for v in variants)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_run_and_cache(tiny_stage, tmp_path):
    pytest.importorskip("tensorrt")
    from quantpipe.engines.tensorrt import TensorRTEngine, build_engine

    plan = tmp_path / "stage1.fp32.plan"
    cache = tmp_path / "timing.cache"
    meta = build_engine(tiny_stage, plan, batch=(1, 4, 8), timing_cache=cache)
    assert plan.is_file() and cache.is_file()
    assert meta["key"]["profile"] == {"min": 1, "opt": 4, "max": 8} and meta["key"]["precision"] == "fp32"
    assert json.loads(plan.with_name(plan.name + ".json").read_text())["plan_sha256"] == meta["plan_sha256"]
    engine = TensorRTEngine(plan)
    assert engine.input.name == "boundary0" and engine.input.shape == (None, 4, 8)
    for batch in (1, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 4, 8)).astype(np.float32)
        np.testing.assert_allclose(engine.run(x), reference(x), rtol=1e-3, atol=1e-3)
    with pytest.raises(Exception, match="outside the engine's profile"):
        engine.run(np.zeros((9, 4, 8), np.float32))
    engine.close()
    # A matching cached plan is reused; a different profile is a different key and rebuilds.
    again = build_engine(tiny_stage, plan, batch=(1, 4, 8), timing_cache=cache)
    assert again["build_seconds"] == meta["build_seconds"]
    wider = build_engine(tiny_stage, plan, batch=(1, 4, 16), timing_cache=cache)
    assert wider["key"]["profile"]["max"] == 16


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_load_engine_builds_from_onnx(tiny_stage, tmp_path):
    pytest.importorskip("tensorrt")
    engine = load_engine(tiny_stage, backend="tensorrt", batch=(1, 2, 4), cache_dir=tmp_path)
    x = np.ones((3, 4, 8), np.float32)
    np.testing.assert_allclose(engine.run(x), reference(x), rtol=1e-3, atol=1e-3)
    assert "tensorrt" in engine.describe()
    engine.close()
