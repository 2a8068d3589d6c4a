"""`quantpipe export --pixels-stage` folds the normalization into a second stage-0 graph that takes pixel
values; with it as stage 0's engine, `quantpipe serve` sends uint8 pixels (a quarter of the bytes) and
answers what the plain graphs answer on calibration's preprocessing."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

pytest.importorskip("timm")
import tritonclient.http as th  # noqa: E402

from quantpipe.calib.data import Preprocess  # noqa: E402
from quantpipe.cli import main  # noqa: E402
from quantpipe.manifest import load_manifest  # noqa: E402
from quantpipe.runtime.config import PipelineConfig, SinkConfig, StageConfig  # noqa: E402
from quantpipe.runtime.stage import load_stage_engine  # noqa: E402
from tests.serve.conftest import ServerThread, free_port, stages_in_threads  # noqa: E402

pytestmark = pytest.mark.slow  # exports a test_vit (about 20 s)


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("pixels") / "stages"
    code = main(["export", "--model", "test_vit", "--split", "3", "--out", str(out), "--verify-samples", "2",
                 "--pixels-stage", "-q"])
    assert code == 0
    return out


def _cfg(out, stage0: str) -> PipelineConfig:
    m = load_manifest(out)
    engines = [stage0] + [s.file for s in m.stages[1:]]
    stages = tuple(StageConfig(str(out / e), f"tcp://127.0.0.1:{free_port()}") for e in engines)
    return PipelineConfig(stages=stages, stages_dir=str(out), policy="fixed", fixed_bits=32, microbatch=4,
                          sink=SinkConfig(address=f"tcp://127.0.0.1:{free_port()}"))


def test_pixel_stage_is_recorded_and_served_with_a_uint8_first_hop(pixel_export):
    from PIL import Image

    m = load_manifest(pixel_export)  # verifies every file, the pixel graph's sha256 included
    assert m.pixels_stage0["file"] == "stage0.pixels.onnx" and m.pixels_stage0["verification"]["rel"] < 1e-5
    plain, folded = _cfg(pixel_export, "stage0.onnx"), _cfg(pixel_export, "stage0.pixels.onnx")
    _, h, w = m.data_config["input_size"]
    pixels = np.random.default_rng(1).integers(0, 256, (3, h + 13, w + 7, 3), dtype=np.uint8)
    pre = Preprocess.from_config(m.data_config)
    y = np.stack([pre(Image.fromarray(p)) for p in pixels])
    for k in range(len(plain.stages)):
        y = load_stage_engine(plain, k).run(y)
    with stages_in_threads(folded), ServerThread(folded) as srv:
        assert srv.server.model.first_hop == "uint8"  # chosen from the manifest: stage 0 takes pixels
        srv.wait_ready(30)
        inp = th.InferInput("pixels", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels)
        r = th.InferenceServerClient(srv.http_url).infer(m.model, [inp])
        text = urllib.request.urlopen(f"http://{srv.http_url}/metrics").read().decode()
    np.testing.assert_allclose(r.as_numpy("logits"), y, rtol=1e-4, atol=1e-4)
    assert f"quantpipe_serve_first_hop_bytes_total {64.0 + 3 * 3 * h * w}" in text  # 1 byte per value


def test_float32_first_hop_to_a_pixel_stage_is_refused(pixel_export):
    from quantpipe.errors import ConfigError
    from quantpipe.serve.model import ServedModel

    with pytest.raises(ConfigError, match="use --first-hop uint8"):
        ServedModel.from_config(_cfg(pixel_export, "stage0.pixels.onnx"), first_hop="float32")
    with pytest.raises(ConfigError, match="--pixels-stage"):
        ServedModel.from_config(_cfg(pixel_export, "stage0.onnx"), first_hop="uint8")
