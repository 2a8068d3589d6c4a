"""The source refuses to feed normalized float32 images to a stage 0 that takes uint8 pixels."""

from __future__ import annotations

import types

import pytest

import quantpipe.manifest
from quantpipe.errors import QuantpipeError
from quantpipe.runtime.config import PipelineConfig, SinkConfig, StageConfig
from quantpipe.runtime.source import load_inputs


def test_a_pixel_stage_0_is_refused_with_what_to_do(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(data_config={}, pixels_stage0={"file": "stage0.pixels.onnx", "sha256": "0"})
    monkeypatch.setattr(quantpipe.manifest, "load_manifest", lambda *a, **k: fake)
    stages = (StageConfig(str(tmp_path / "stage0.pixels.onnx"), "tcp://127.0.0.1:1"),
              StageConfig(str(tmp_path / "stage1.onnx"), "tcp://127.0.0.1:2"))
    cfg = PipelineConfig(stages=stages, stages_dir=str(tmp_path), sink=SinkConfig(address="tcp://127.0.0.1:3"))
    with pytest.raises(QuantpipeError, match="stage0.onnx"):
        load_inputs(cfg)
