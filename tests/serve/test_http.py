"""quantpipe serve over HTTP, driven by the official tritonclient: health, metadata, every input kind,
the classification extension, dynamic batching under 16 concurrent async_infer calls checked against
the chained stages, and every kind of bad request answered with a clear error."""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from quantpipe.calib.data import Preprocess
from quantpipe.runtime.config import load_config
from quantpipe.runtime.stage import load_stage_engine
from quantpipe.serve.model import BUILTIN_MODEL_NAME as MODEL
from tests.serve.conftest import ServerThread, stages_in_threads, write_config


def chained(cfg, x: np.ndarray) -> np.ndarray:
    """What the stages compute for ``x``, run one after the other in this process."""
    for k in range(len(cfg.stages)):
        x = load_stage_engine(cfg, k).run(x)
    return x


def _input(name: str, x: np.ndarray, datatype: str, binary: bool = True) -> th.InferInput:
    i = th.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_metadata_and_repository(builtin_pipeline):
    cfg, srv = builtin_pipeline
    c = th.InferenceServerClient(srv.http_url)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1")
    md = c.get_model_metadata(MODEL)
    assert md["name"] == MODEL and md["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in md["inputs"]} == {"input": "FP32", "pixels": "UINT8", "image": "BYTES"}
    assert md["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    assert c.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY"}]
    assert c.get_model_config(MODEL)["max_batch_size"] == cfg.microbatch
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        c.get_model_metadata("nope")
    assert not c.is_model_ready("nope")


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_infer_equals_the_chained_stages_and_echoes_the_id(builtin_pipeline, binary):
    cfg, srv = builtin_pipeline
    c = th.InferenceServerClient(srv.http_url)
    x = _images(3)
    r = c.infer(MODEL, [_input("input", x, "FP32", binary)], request_id="req-7",
                outputs=[th.InferRequestedOutput("logits", binary_data=binary)])
    assert r.get_response()["id"] == "req-7" and r.get_response()["model_name"] == MODEL
    np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)


def test_request_larger_than_a_microbatch_is_split_and_reassembled(builtin_pipeline):
    cfg, srv = builtin_pipeline
    x = _images(4 * cfg.microbatch + 3, seed=5)
    r = th.InferenceServerClient(srv.http_url).infer(MODEL, [_input("input", x, "FP32")])
    np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)


def test_compressed_requests_and_versioned_paths_work(builtin_pipeline):
    cfg, srv = builtin_pipeline
    x = _images(2, seed=6)
    r = th.InferenceServerClient(srv.http_url).infer(MODEL, [_input("input", x, "FP32")], model_version="1",
                                                     request_compression_algorithm="gzip")
    np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException, match="only version 1"):
        th.InferenceServerClient(srv.http_url).infer(MODEL, [_input("input", x, "FP32")], model_version="2")


def test_uint8_pixels_and_encoded_images_are_preprocessed_like_calibration(builtin_pipeline):
    from PIL import Image

    cfg, srv = builtin_pipeline
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    pre = Preprocess.from_config({"input_size": [3, 32, 32]})
    expected = chained(cfg, np.stack([pre(Image.fromarray(p)) for p in pixels]))
    c = th.InferenceServerClient(srv.http_url)
    r = c.infer(MODEL, [_input("pixels", pixels, "UINT8")])
    np.testing.assert_allclose(r.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    files = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="PNG")  # lossless: the same pixels after decoding
        files.append(buf.getvalue())
    r = c.infer(MODEL, [_input("image", np.array(files, dtype=np.object_), "BYTES")])
    np.testing.assert_allclose(r.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)


def test_classification_extension_returns_value_index_strings(builtin_pipeline):
    cfg, srv = builtin_pipeline
    x = _images(2, seed=9)
    r = th.InferenceServerClient(srv.http_url).infer(
        MODEL, [_input("input", x, "FP32")], outputs=[th.InferRequestedOutput("logits", class_count=3)])
    top = r.as_numpy("logits")
    assert top.shape == (2, 3)
    y = chained(cfg, x)
    for i in range(2):
        fields = [v.decode().split(":") for v in top[i]]
        assert [int(f[1]) for f in fields] == list(np.argsort(-y[i], kind="stable")[:3])
        assert [float(f[0]) for f in fields] == pytest.approx(list(np.sort(y[i])[::-1][:3]), rel=1e-4, abs=1e-5)


def test_sixteen_concurrent_async_requests_each_get_their_own_result(builtin_pipeline):
    cfg, srv = builtin_pipeline
    c = th.InferenceServerClient(srv.http_url, concurrency=16)
    batches = [_images(1 + i % 3, seed=100 + i) for i in range(16)]
    pending = [c.async_infer(MODEL, [_input("input", x, "FP32")], request_id=str(i)) for i, x in enumerate(batches)]
    for i, (p, x) in enumerate(zip(pending, batches)):
        r = p.get_result()
        assert r.get_response()["id"] == str(i)
        np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)
    text = urllib.request.urlopen(f"http://{srv.http_url}/metrics").read().decode()
    assert 'quantpipe_serve_requests_total{outcome="ok",protocol="http"} 16.0' in text
    assert "quantpipe_serve_batch_images_count" in text
    # every microbatch that carried them made one round trip through the stages
    batches_sent = float(re.search(r"^quantpipe_serve_batch_images_count (\S+)$", text, re.M).group(1))
    trips = float(re.search(r"^quantpipe_serve_pipeline_seconds_count (\S+)$", text, re.M).group(1))
    assert batches_sent >= 1 and trips == batches_sent


def test_bad_requests_get_clear_errors(builtin_pipeline):
    cfg, srv = builtin_pipeline
    c = th.InferenceServerClient(srv.http_url)
    x = _images(1)
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.infer("resnet50", [_input("input", x, "FP32")])
    with pytest.raises(InferenceServerException, match=r"shape \[N, 3, 32, 32\]"):
        c.infer(MODEL, [_input("input", _images(1)[:, :, :16], "FP32")])
    with pytest.raises(InferenceServerException, match="must be FP32, got INT32"):
        c.infer(MODEL, [_input("input", x.astype(np.int32), "INT32")])
    with pytest.raises(InferenceServerException, match="unknown input 'data'"):
        c.infer(MODEL, [_input("data", x, "FP32")])
    with pytest.raises(InferenceServerException, match="unknown output 'probs'"):
        c.infer(MODEL, [_input("input", x, "FP32")], outputs=[th.InferRequestedOutput("probs")])
    with pytest.raises(InferenceServerException, match="not a readable image"):
        c.infer(MODEL, [_input("image", np.array([b"not a jpeg"], dtype=np.object_), "BYTES")])
    # Truncated binary data: the header promises more bytes than the body holds.
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    status, body = _post(f"http://{srv.http_url}/v2/models/{MODEL}/infer", head + x.tobytes()[:1000],
                         {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
    assert status == 400 and "truncated" in body["error"]
    status, body = _post(f"http://{srv.http_url}/v2/models/{MODEL}/infer", b"{not json", {})
    assert status == 400 and "does not parse" in body["error"]
    text = urllib.request.urlopen(f"http://{srv.http_url}/metrics").read().decode()
    assert 'quantpipe_serve_failures_total{protocol="http",reason="unknown_model"} 1.0' in text


def test_oversized_body_and_missing_token_are_refused(tmp_path):
    path = write_config(tmp_path, ["builtin:identity", "builtin:head:1000"])
    cfg = load_config(path)
    with stages_in_threads(cfg), ServerThread(cfg, token="s3cret", max_body_bytes=64 * 1024) as srv:
        srv.wait_ready()
        assert th.InferenceServerClient(srv.http_url).is_server_live()  # health stays open
        assert th.InferenceServerClient(srv.http_url).is_server_ready()
        with pytest.raises(InferenceServerException, match="bearer token"):
            th.InferenceServerClient(srv.http_url).get_model_metadata(MODEL)
        wrong = th.InferenceServerClient(srv.http_url)
        with pytest.raises(InferenceServerException, match="bearer token"):
            wrong.infer(MODEL, [_input("input", _images(1), "FP32")], headers={"Authorization": "Bearer s3cre"})
        c = th.InferenceServerClient(srv.http_url)
        auth = {"Authorization": "Bearer s3cret"}
        x = _images(2)
        r = c.infer(MODEL, [_input("input", x, "FP32")], headers=auth)
        np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)
        with pytest.raises(InferenceServerException, match="exceeds 65536 bytes"):
            c.infer(MODEL, [_input("input", _images(8), "FP32")], headers=auth)  # 98 KB


def test_uint8_first_hop_carries_the_cropped_pixels_exactly(tmp_path):
    from PIL import Image

    cfg = load_config(write_config(tmp_path, ["builtin:identity", "builtin:head:1000"]))
    pixels = np.random.default_rng(4).integers(0, 256, (3, 37, 45, 3), dtype=np.uint8)
    # Preprocessing with mean 0 and std 1/255 leaves the resized, cropped pixel values 0..255.
    crop = Preprocess.from_config({"input_size": [3, 32, 32], "mean": [0, 0, 0], "std": [1 / 255] * 3})
    expected = chained(cfg, np.rint(np.stack([crop(Image.fromarray(p)) for p in pixels])))
    with stages_in_threads(cfg), ServerThread(cfg, first_hop="uint8") as srv:
        srv.wait_ready()
        r = th.InferenceServerClient(srv.http_url).infer(MODEL, [_input("pixels", pixels, "UINT8")])
        text = urllib.request.urlopen(f"http://{srv.http_url}/metrics").read().decode()
    np.testing.assert_allclose(r.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    # one 64-byte header + 1 byte per value: a quarter of the float32 hop
    assert f"quantpipe_serve_first_hop_bytes_total {64.0 + 3 * 3 * 32 * 32}" in text


def test_sixty_four_clients_connecting_at_once_are_all_served(builtin_pipeline):
    import threading

    cfg, srv = builtin_pipeline
    x = _images(1, seed=64)
    expected = chained(cfg, x)
    barrier = threading.Barrier(64)
    answers: list = []

    def one() -> None:
        c = th.InferenceServerClient(srv.http_url, connection_timeout=30, network_timeout=30)
        barrier.wait()  # all 64 connect and send at the same moment
        try:
            answers.append(c.infer(MODEL, [_input("input", x, "FP32")]).as_numpy("logits"))
        except InferenceServerException as exc:
            answers.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 64
    for a in answers:
        assert isinstance(a, np.ndarray), a
        np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)
