"""quantpipe serve over gRPC (KServe v2 GRPCInferenceService), driven by the official tritonclient.grpc."""

from __future__ import annotations

import numpy as np
import pytest

tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from quantpipe.runtime.config import load_config  # noqa: E402
from quantpipe.serve.model import BUILTIN_MODEL_NAME as MODEL  # noqa: E402
from tests.serve.conftest import ServerThread, stages_in_threads, write_config  # noqa: E402
from tests.serve.test_http import _images, chained  # noqa: E402


def _input(name: str, x: np.ndarray, datatype: str) -> tg.InferInput:
    i = tg.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x)
    return i


def test_grpc_health_metadata_infer_and_classification(builtin_pipeline):
    cfg, srv = builtin_pipeline
    c = tg.InferenceServerClient(srv.grpc_url)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
    md = c.get_model_metadata(MODEL, as_json=True)
    assert md["name"] == MODEL and [i["name"] for i in md["inputs"]] == ["input", "pixels", "image"]
    assert c.get_model_config(MODEL, as_json=True)["config"]["max_batch_size"] == cfg.microbatch
    assert c.get_model_repository_index(as_json=True)["models"][0]["state"] == "READY"
    x = _images(5, seed=11)
    r = c.infer(MODEL, [_input("input", x, "FP32")], request_id="g1")
    assert r.get_response().id == "g1"
    np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)
    top = c.infer(MODEL, [_input("input", x, "FP32")],
                  outputs=[tg.InferRequestedOutput("logits", class_count=2)]).as_numpy("logits")
    assert [int(v.decode().split(":")[1]) for v in top[0]] == list(np.argsort(-chained(cfg, x)[0], kind="stable")[:2])


def test_grpc_sixteen_concurrent_async_requests(builtin_pipeline):
    cfg, srv = builtin_pipeline
    c = tg.InferenceServerClient(srv.grpc_url)
    batches = [_images(1 + i % 4, seed=200 + i) for i in range(16)]
    results: dict[int, object] = {}

    def callback(i):
        return lambda result, error: results.__setitem__(i, error or result)

    for i, x in enumerate(batches):
        c.async_infer(MODEL, [_input("input", x, "FP32")], callback(i))
    import time

    deadline = time.monotonic() + 20
    while len(results) < 16 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(results) == 16
    for i, x in enumerate(batches):
        np.testing.assert_allclose(results[i].as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)


def test_grpc_errors_have_fitting_status_codes(tmp_path):
    cfg = load_config(write_config(tmp_path, ["builtin:identity", "builtin:head:1000"]))
    with stages_in_threads(cfg), ServerThread(cfg, http=None, grpc=("127.0.0.1", 0), token="tok") as srv:
        srv.wait_ready()
        c = tg.InferenceServerClient(srv.grpc_url)
        assert c.is_server_live() and c.is_server_ready()  # health needs no token
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            c.get_model_metadata(MODEL)
        auth = {"authorization": "Bearer tok"}
        x = _images(1)
        with pytest.raises(InferenceServerException, match="NOT_FOUND.*unknown model"):
            c.infer("other", [_input("input", x, "FP32")], headers=auth)
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*must be FP32"):
            c.infer(MODEL, [_input("input", x.astype(np.float64), "FP64")], headers=auth)
        r = c.infer(MODEL, [_input("input", x, "FP32")], headers=auth)
        np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)
