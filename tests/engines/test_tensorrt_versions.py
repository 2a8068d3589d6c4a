"""How build_engine drives the TensorRT 8.6, 10 and 11 builder APIs, against a recording stand-in module.

No GPU is needed: a small fake ``tensorrt`` records the calls build_engine makes, so the version
differences (explicit-batch flag, fp16 builder flag vs strongly typed graphs, TF32, timing cache merge,
cache reuse by key) are checked on every CI run. test_tensorrt.py runs the real library where it exists.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from quantpipe.errors import QuantpipeError


def _fake_tensorrt(version: str, has_fp16_flag: bool, network_dtype: str = "FLOAT") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: dict = {"builds": 0, "flags_set": [], "flags_cleared": [], "combined": 0}
    trt.calls = calls

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    trt.ILogger = ILogger
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    flags = {"TF32": "tf32"}
    if has_fp16_flag:
        flags["FP16"] = "fp16"
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF")

    class Tensor:
        def __init__(self, name, shape, dtype="FLOAT"):
            self.name, self.shape, self.dtype = name, shape, dtype

    class Layer:
        num_outputs = 1

        def get_output(self, j):
            return Tensor("h", (-1, 4, 8), network_dtype)

    class Network:
        num_inputs = num_outputs = num_layers = 1

        def get_input(self, i):
            return Tensor("boundary0", (-1, 4, 8))

        def get_output(self, i):
            return Tensor("boundary1", (-1, 4, 8))

        def get_layer(self, i):
            return Layer()

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+tactics"

        def combine(self, other, ignore_mismatch):
            calls["combined"] += 1

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, flag):
            calls["flags_set"].append(flag)

        def clear_flag(self, flag):
            calls["flags_cleared"].append(flag)

        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            calls["profile"] = profile.shapes

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["builds"] += 1
            return b"PLAN" + version.encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"] = path
            return True

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.fixture
def use_trt(monkeypatch):
    import quantpipe.engines.tensorrt as backend

    monkeypatch.setattr(backend, "gpu_info", lambda device=0: {"gpu": "Fake GPU", "compute_capability": "8.7"})

    def install(version, has_fp16_flag=True, network_dtype="FLOAT"):
        trt = _fake_tensorrt(version, has_fp16_flag, network_dtype)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt, backend

    return install


@pytest.mark.parametrize("version, explicit_batch", [("8.6.1", 1), ("10.3.0", 0), ("11.0.0", 0)])
def test_explicit_batch_flag_only_before_10(use_trt, tiny_stage, tmp_path, version, explicit_batch):
    trt, backend = use_trt(version)
    meta = backend.build_engine(tiny_stage, tmp_path / "s.plan", batch=(1, 4, 8))
    assert trt.calls["network_flags"] == explicit_batch
    assert trt.calls["profile"] == ("boundary0", (1, 4, 8), (4, 4, 8), (8, 4, 8))
    assert trt.calls["flags_cleared"] == ["tf32"] and trt.calls["flags_set"] == []  # fp32 means fp32
    assert (tmp_path / "s.plan").read_bytes() == b"PLAN" + version.encode()
    assert meta["key"]["tensorrt"] == version and meta["key"]["gpu"] == "Fake GPU"
    assert meta["input"] == {"name": "boundary0", "shape": [None, 4, 8]}


def test_fp16_uses_the_builder_flag_where_it_exists(use_trt, tiny_stage, tmp_path):
    trt, backend = use_trt("10.3.0")
    meta = backend.build_engine(tiny_stage, tmp_path / "s.plan", fp16=True)
    assert trt.calls["flags_set"] == ["fp16"] and trt.calls["flags_cleared"] == []
    assert meta["key"]["precision"] == "fp16"


def test_strongly_typed_tensorrt_refuses_fp16_from_an_fp32_graph(use_trt, tiny_stage, tmp_path):
    trt, backend = use_trt("11.0.0", has_fp16_flag=False)
    assert backend.needs_fp16_graph()
    with pytest.raises(QuantpipeError, match="strongly typed.*--fp16"):
        backend.build_engine(tiny_stage, tmp_path / "s.plan", fp16=True)
    assert trt.calls["builds"] == 0


def test_strongly_typed_tensorrt_builds_an_fp16_graph(use_trt, tiny_stage, tmp_path):
    trt, backend = use_trt("11.0.0", has_fp16_flag=False, network_dtype="HALF")
    meta = backend.build_engine(tiny_stage, tmp_path / "s.plan", fp16=True)
    assert trt.calls["builds"] == 1 and trt.calls["flags_set"] == []
    assert meta["key"]["precision"] == "fp16"


def test_cached_plan_is_reused_until_its_key_changes(use_trt, tiny_stage, tmp_path):
    trt, backend = use_trt("10.3.0")
    plan, cache = tmp_path / "s.plan", tmp_path / "timing.cache"
    first = backend.build_engine(tiny_stage, plan, batch=(1, 4, 8), timing_cache=cache)
    assert cache.read_bytes() == b"+tactics" and trt.calls["combined"] == 0
    assert backend.build_engine(tiny_stage, plan, batch=(1, 4, 8), timing_cache=cache) == first
    assert trt.calls["builds"] == 1  # reused
    backend.build_engine(tiny_stage, plan, batch=(1, 4, 16), timing_cache=cache)  # new profile -> rebuild
    assert trt.calls["builds"] == 2 and trt.calls["combined"] == 1  # merged into the existing cache file
    plan.write_bytes(b"corrupted")
    backend.build_engine(tiny_stage, plan, batch=(1, 4, 16), timing_cache=cache)
    assert trt.calls["builds"] == 3  # a plan that no longer matches its recorded sha256 is rebuilt
    use_trt("10.4.0")  # a TensorRT upgrade invalidates every plan
    upgraded = backend.build_engine(tiny_stage, plan, batch=(1, 4, 16), timing_cache=cache)
    assert upgraded["key"]["tensorrt"] == "10.4.0"
    assert json.loads((tmp_path / "s.plan.json").read_text())["key"]["tensorrt"] == "10.4.0"


@pytest.mark.parametrize("version, limit", [("8.6.1", 17), ("10.3.0", None), ("11.0.0", None)])
def test_opset_limit_of_the_parser(use_trt, version, limit):
    _, backend = use_trt(version)
    assert backend.max_onnx_opset() == limit


def test_parse_failure_on_8_6_suggests_opset_17(use_trt, tiny_stage, tmp_path):
    trt, backend = use_trt("8.6.1")

    class FailingParser(trt.OnnxParser):
        num_errors = 1

        def parse_from_file(self, path):
            return False

        def get_error(self, i):
            return "In node 3 (parseGraph): INVALID_NODE: Split"

    trt.OnnxParser = FailingParser
    with pytest.raises(QuantpipeError, match="INVALID_NODE: Split.*up to 17: re-export with --opset 17"):
        backend.build_engine(tiny_stage, tmp_path / "s.plan")
