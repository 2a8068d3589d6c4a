"""The serving front's parts without servers: the batcher's cuts, the KServe v2 body parser, the uint8
first-hop frame (decoded exactly by the stage's codec), the access log's rate limit, the token file."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

from quantpipe import wire
from quantpipe.errors import ConfigError
from quantpipe.quant.linkcodec import BoundaryCodec
from quantpipe.serve.batcher import Request, RequestQueue
from quantpipe.serve.bridge import first_hop_frame
from quantpipe.serve.observe import AccessLog, read_token, token_matches
from quantpipe.serve.protocol import InferError, elements_to_bytes, encode_http_response, parse_http_request


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _req(loop, n: int, timeout_s: float = 10.0) -> Request:
    return Request(np.arange(n, dtype=np.float32)[:, None] + np.zeros((n, 2), np.float32), loop, timeout_s)


def test_batcher_fills_microbatches_across_requests_and_splits_large_ones(loop):
    q = RequestQueue(capacity_images=100, microbatch=4, max_queue_delay_s=1.0)
    a, b, c = _req(loop, 3), _req(loop, 6), _req(loop, 1)
    for r in (a, b, c):
        q.put(r)
    segs, x = q.take(now=0.0)
    assert [(s.request, s.start, s.count, s.offset) for s in segs] == [(a, 0, 3, 0), (b, 0, 1, 3)]
    assert x.shape == (4, 2) and x[:, 0].tolist() == [0, 1, 2, 0]
    segs, x = q.take(now=0.0)
    assert [(s.request, s.start, s.count) for s in segs] == [(b, 1, 4)]
    # 2 images left (< microbatch): not due before the oldest has waited max_queue_delay_s
    assert q.take(now=0.0) is None and q.waiting == 2
    segs, x = q.take(now=1e9)
    assert [(s.request, s.start, s.count) for s in segs] == [(b, 5, 1), (c, 0, 1)]
    assert q.waiting == 0 and q.take(now=1e9) is None


def test_batcher_refuses_when_full_and_forgets_withdrawn_requests(loop):
    q = RequestQueue(capacity_images=5, microbatch=4, max_queue_delay_s=0.0)
    a = _req(loop, 4)
    q.put(a)
    with pytest.raises(InferError) as e:
        q.put(_req(loop, 2))
    assert e.value.status == 503 and e.value.reason == "queue_full"
    with pytest.raises(InferError) as e:
        q.put(_req(loop, 6))
    assert e.value.status == 400  # can never fit: not a retry-later
    q.withdraw(a)  # timed out: its images never leave
    assert q.waiting == 0 and q.take(now=1e9) is None
    q.put(_req(loop, 5))


def test_request_is_answered_once(loop):
    r = _req(loop, 3)
    r.deliver(1, np.ones((2, 4), np.float32))
    assert not r.done
    r.deliver(0, np.zeros((1, 4), np.float32))
    assert r.done and r.future.result()[:, 0].tolist() == [0, 1, 1]
    assert not r.fail(InferError("late", 504))  # a late timeout cannot answer it again
    r2 = _req(loop, 2)
    assert r2.fail(InferError("timeout", 504))
    r2.deliver(0, np.ones((2, 4), np.float32))  # a late result is dropped
    assert isinstance(r2.future.exception(), InferError)


def test_uint8_first_hop_frame_decodes_to_the_exact_pixel_values():
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    x[0, 0, 0, :2] = (0, 255)
    frames, bits = first_hop_frame(x, seq=7, first_id=21)
    assert bits == 8
    assert bytes(frames[1]) == x.tobytes()  # the payload is the pixels' own bytes
    codec = BoundaryCodec(None, 0, stage=0)  # what stage 0 decodes its input with
    checked = codec.check([bytes(frames[0]), bytes(frames[1])])
    assert (checked.header.seq, checked.header.first_id, checked.header.bits) == (7, 21, 8)
    y = codec.decode(checked)
    assert y.dtype == np.float32 and np.array_equal(y, x.astype(np.float32))
    _, y2 = wire.decode_frame([bytes(frames[0]), bytes(frames[1])])
    assert np.array_equal(y2, x.astype(np.float32))


def test_float32_first_hop_frame_is_the_wire_modules_32_bit_frame_byte_for_byte():
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    ours, bits = first_hop_frame(x, seq=9, first_id=40)
    assert bits == 32
    ref = wire.encode_frame(x, seq=9, first_id=40, stage=wire.SOURCE_STAGE, bits=32)
    assert [bytes(f) for f in ours] == [bytes(f) for f in ref]
    _, y = wire.decode_frame([bytes(f) for f in ours])
    assert np.array_equal(y, x)


def test_http_body_parser_binary_json_and_bytes():
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    files = np.array([b"abc", b""], dtype=object)
    blob = elements_to_bytes(files)
    head = json.dumps({"id": "r1", "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 6], "parameters": {"binary_data_size": x.nbytes}},
        {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(blob)}},
        {"name": "j", "datatype": "INT32", "shape": [2], "data": [1, 2]}],
        "outputs": [{"name": "logits", "parameters": {"classification": 3, "binary_data": True}}]}).encode()
    req = parse_http_request(head + x.tobytes() + blob, len(head))
    assert req.id == "r1" and np.array_equal(req.inputs[0].data, x)
    assert req.inputs[1].data.tolist() == [b"abc", b""] and req.inputs[2].data.tolist() == [1, 2]
    assert req.outputs[0].classification == 3 and req.outputs[0].binary
    with pytest.raises(InferError, match="after the last input"):
        parse_http_request(head + x.tobytes() + blob + b"x", len(head))
    with pytest.raises(InferError, match="truncated"):
        parse_http_request(head + x.tobytes() + blob[:-2], len(head))
    with pytest.raises(InferError, match="non-empty 'inputs'"):
        parse_http_request(b'{"inputs": []}', None)
    body, n = encode_http_response("m", "1", "r1", [("logits", "FP32", x, True), ("c", "BYTES", files, False)])
    doc = json.loads(body[:n])
    assert doc["id"] == "r1" and doc["outputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    assert doc["outputs"][1]["data"] == ["abc", ""] and body[n:] == x.tobytes()


def test_access_log_is_rate_limited_and_counts_what_it_skipped(caplog):
    now = [0.0]
    log = AccessLog(logging.getLogger("test.access"), lines_per_s=2, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.access"):
        written = [log.line("1.2.3.4", "POST", "/v2/models/m/infer", 200, 0.01) for _ in range(10)]
        now[0] += 1.0
        assert log.line("1.2.3.4", "GET", "/v2", 200, 0.001)
    assert sum(written) == 2
    assert "(+8 lines skipped)" in caplog.records[-1].getMessage()


def test_token_file_and_constant_time_check(tmp_path):
    p = tmp_path / "token"
    p.write_text("abc123\n")
    token = read_token(str(p))
    assert token == "abc123"
    assert token_matches("Bearer abc123", token)
    assert not token_matches("Bearer abc12", token) and not token_matches("abc123", token)
    assert not token_matches(None, token)
    p.write_text("\n")
    with pytest.raises(ConfigError, match="one token"):
        read_token(str(p))
