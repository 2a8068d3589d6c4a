"""DeiT-Tiny behind quantpipe serve (slow: uses the session's DeiT-Tiny export): JPEG files sent as
BYTES come back with the logits of the chained stage graphs on calibration's preprocessing, and the
classification extension names ImageNet wnids."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as th

from quantpipe.calib.data import Preprocess, imagenet_wnids
from quantpipe.manifest import load_manifest
from quantpipe.runtime.config import PipelineConfig, SinkConfig, StageConfig
from quantpipe.runtime.stage import load_stage_engine
from tests.serve.conftest import ServerThread, free_port, stages_in_threads


@pytest.mark.slow
def test_deit_tiny_served_equals_the_chained_stages_on_calibration_preprocessing(deit_tiny_stages, imagenet_dev):
    m = load_manifest(deit_tiny_stages)
    stages = tuple(StageConfig(str(deit_tiny_stages / s.file), f"tcp://127.0.0.1:{free_port()}") for s in m.stages)
    cfg = PipelineConfig(stages=stages, stages_dir=str(deit_tiny_stages), policy="fixed", fixed_bits=32, microbatch=4,
                         sink=SinkConfig(address=f"tcp://127.0.0.1:{free_port()}"))
    files = sorted(imagenet_dev.glob("*/*.jpg"))[:3]
    pre = Preprocess.from_config(m.data_config)
    x = np.stack([pre.load(f) for f in files])
    y = x
    for k in range(len(stages)):
        y = load_stage_engine(cfg, k).run(y)
    with stages_in_threads(cfg), ServerThread(cfg) as srv:
        srv.wait_ready(60)
        c = th.InferenceServerClient(srv.http_url)
        assert c.get_model_metadata(m.model)["outputs"][0]["shape"] == [-1, 1000]
        inp = th.InferInput("image", [len(files)], "BYTES")
        inp.set_data_from_numpy(np.array([f.read_bytes() for f in files], dtype=np.object_))
        logits = c.infer(m.model, [inp]).as_numpy("logits")
        top = c.infer(m.model, [inp], outputs=[th.InferRequestedOutput("logits", class_count=1)]).as_numpy("logits")
    # The same graphs on the same preprocessing; onnxruntime's results depend slightly on the batch shape.
    np.testing.assert_allclose(logits, y, rtol=1e-4, atol=1e-4)
    assert top.shape == (len(files), 1)
    for i, f in enumerate(files):
        value, index, label = top[i, 0].decode().split(":")
        assert int(index) == int(np.argmax(y[i])) and float(value) == pytest.approx(float(y[i].max()), abs=1e-3)
        assert label == imagenet_wnids()[int(index)]
    assert sum(f.parent.name == t[0].decode().split(":")[2] for f, t in zip(files, top)) >= 2  # DeiT-Tiny knows them
