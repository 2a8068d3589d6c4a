"""Whole pipelines in one process (stage daemons in threads, real loopback sockets): exactness at 32
bits against the chained stages, quantized frames equal to the reference codec path, explicit errors,
and bounded memory when the sink stalls."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

from quantpipe.runtime.config import PipelineConfig, SinkConfig, SourceConfig, StageConfig
from quantpipe.runtime.sink import Sink
from quantpipe.runtime.source import Source, load_inputs
from quantpipe.runtime.stage import StageDaemon, load_stage_engine


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(engines: list[str], **kw) -> PipelineConfig:
    """A pipeline of ``engines`` on random free loopback ports."""
    stages = tuple(StageConfig(e, f"tcp://127.0.0.1:{_port()}") for e in engines)
    kw.setdefault("source", SourceConfig(count=40))
    return PipelineConfig(stages=stages, sink=SinkConfig(address=f"tcp://127.0.0.1:{_port()}"), **kw)


@contextlib.contextmanager
def running_stages(cfg: PipelineConfig):
    daemons = [StageDaemon(cfg, k) for k in range(len(cfg.stages))]
    threads = [threading.Thread(target=d.serve, kwargs={"drain_timeout_s": 2.0}, daemon=True) for d in daemons]
    for t in threads:
        t.start()
    try:
        yield daemons
    finally:
        for d in daemons:
            d.stop()
        for t in threads:
            t.join(10)


def _run(cfg: PipelineConfig, inputs=None) -> tuple[Sink, list[dict]]:
    out = io.StringIO()
    sink = Sink(cfg, cfg.source.count, out, keep_logits=True)
    with running_stages(cfg):
        source = Source(cfg, inputs if inputs is not None else load_inputs(cfg))
        feeder = threading.Thread(target=source.serve, kwargs={"drain_timeout_s": 10.0}, daemon=True)
        feeder.start()
        try:
            assert sink.serve(timeout_s=30.0) == 0
        finally:
            source.stop()
            feeder.join(15)
            sink.close()
    return sink, [json.loads(line) for line in out.getvalue().splitlines()]


def test_builtin_pipeline_is_exact_at_32_bits_and_in_order():
    cfg = _cfg(["builtin:linear", "builtin:linear", "builtin:head:50"], input_shape=(197, 64),
                         policy="fixed", fixed_bits=32, target_rate=2000.0, microbatch=3,
                         source=SourceConfig(count=40))
    sink, lines = _run(cfg)
    assert [r["id"] for r in lines] == list(range(40))  # every image once, in order (last microbatch short)
    inputs = load_inputs(cfg).images
    engines = [load_stage_engine(cfg, k) for k in range(3)]
    for first in range(0, 40, 3):  # the pipeline's microbatches: BLAS results depend on the batch shape
        y = inputs[np.arange(first, min(first + 3, 40)) % len(inputs)]
        for e in engines:
            y = e.run(y)
        for i in range(len(y)):
            assert np.array_equal(sink.logits[first + i], y[i])  # bit for bit
    assert all(len(r["top5"]) == 5 and r["latency_ms"] >= 0 for r in lines)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    pytest.importorskip("onnx")
    from quantpipe.cli import main
    from tests.calib.conftest import build_synthetic_stages

    out = tmp_path_factory.mktemp("rt-stages")
    build_synthetic_stages(out / "stages")
    table = out / "table.json"
    assert main(["calibrate", "--stages", str(out / "stages"), "--dataset", "synthetic", "--num-images", "16",
                 "--batch-size", "8", "--bits", "4,8", "--methods", "aciq_pc", "--out", str(table)]) == 0
    return out / "stages", table


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_onnx_pipeline_equals_the_chained_stages(onnx_export, bits):
    """At 32 bits the pipeline's logits are the chained ONNX stages' bit for bit; quantized, they are
    the chain with each boundary encoded and decoded by the same table."""
    from quantpipe.calib.chain import StageChain, quantize_boundary
    from quantpipe.quant.table import ClipTable

    stages_dir, table_path = onnx_export
    cfg = _cfg([str(stages_dir / f"stage{k}.onnx") for k in range(3)], stages_dir=str(stages_dir),
                         clip_table=str(table_path), method="aciq_pc", policy="fixed", fixed_bits=bits,
                         target_rate=2000.0, microbatch=4, source=SourceConfig(count=24))
    inputs = load_inputs(cfg)
    sink, lines = _run(cfg, inputs)
    assert [r["id"] for r in lines] == list(range(24)) and not any("error" in r for r in lines)
    table = ClipTable.load(table_path)
    method = table.method_index("aciq_pc")
    quant = None if bits == 32 else (lambda b, x: quantize_boundary(x, table=table, boundary=b, method=method, bits=bits))
    with StageChain(stages_dir, threads=1) as chain:
        for first in range(0, 24, 4):  # same microbatches as the pipeline: the same engine batch shapes
            ref = chain.run(inputs.images[np.arange(first, first + 4) % len(inputs.images)], quantize=quant)
            for i in range(4):
                assert np.array_equal(sink.logits[first + i], ref[i]), (bits, first + i)


def test_a_failing_microbatch_becomes_explicit_errors_and_the_rest_flows():
    cfg = _cfg(["builtin:identity", "builtin:head:10"], input_shape=(4, 8), policy="fixed", fixed_bits=32,
                         target_rate=2000.0, microbatch=4, source=SourceConfig(count=20))
    out = io.StringIO()
    sink = Sink(cfg, 20, out)
    with running_stages(cfg) as daemons:
        run = daemons[0].engine.run

        def flaky(x):
            if flaky.calls == 2:
                flaky.calls += 1
                raise RuntimeError("simulated device fault")
            flaky.calls += 1
            return run(x)

        flaky.calls = 0
        daemons[0].engine.run = flaky
        source = Source(cfg, load_inputs(cfg))
        feeder = threading.Thread(target=source.serve, daemon=True)
        feeder.start()
        assert sink.serve(timeout_s=30.0) == 0
        feeder.join(10)
        sink.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["id"] for r in lines] == list(range(20))
    assert [r["id"] for r in lines if "error" in r] == [8, 9, 10, 11]  # the third microbatch
    assert all(r["error"] == "engine" and "simulated device fault" in r["message"] for r in lines if "error" in r)
    assert daemons[0].metrics.error_count("engine") == 1


def test_memory_stays_bounded_when_the_sink_stalls():
    credits = 2
    cfg = _cfg(["builtin:identity", "builtin:identity"], input_shape=(8, 8), policy="fixed", fixed_bits=32,
                         target_rate=10000.0, microbatch=1, credits=credits, source=SourceConfig(count=500))
    stalled = Sink(cfg, 500, io.StringIO())  # bound but never reading: downstream stalls
    with running_stages(cfg) as daemons:
        source = Source(cfg, load_inputs(cfg))
        feeder = threading.Thread(target=source.serve, kwargs={"drain_timeout_s": 0.5}, daemon=True)
        feeder.start()
        time.sleep(2.0)
        in_flight = [source.link.in_flight] + [d.outbound.in_flight for d in daemons]
        custody = [source.link.in_custody] + [d.outbound.in_custody for d in daemons]
        queued = [d.inbox.queued for d in daemons]
        accepted = [d.metrics.images_in._value.get() for d in daemons]
        source.stop()
        feeder.join(10)
    stalled.close(0)
    assert all(n <= credits for n in in_flight), in_flight
    # Acked but not handed on (custody) and acked but not yet taken (the inbox): both bounded by the
    # custody limit credits + 2, however many images the source offers.
    limit = source.link.custody_limit
    assert limit == credits + 2 and all(n <= limit for n in custody + queued), (custody, queued)
    # The last stage runs what the frozen sink's window takes plus the one it is blocked on; the first,
    # what the last stage may hold for it plus the one it is blocked on.
    assert accepted[1] <= credits + 1 and accepted[0] <= limit + 1, accepted


def _raw_sender(cfg: PipelineConfig, ctx):
    import zmq

    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(cfg.sink.address)
    return s


def _logits_frames(seq: int, first_id: int, n: int) -> list:
    from quantpipe import wire

    y = np.tile(np.arange(8, dtype=np.float32), (n, 1)) + first_id
    return wire.encode_frame(y, seq=seq, first_id=first_id, stage=0) + [wire.pack_trace(time.time())]


def test_sink_refuses_a_seq_absurdly_far_ahead_instead_of_holding_it():
    import zmq

    cfg = _cfg(["builtin:identity"], input_shape=(8,), microbatch=2, credits=2, source=SourceConfig(count=4))
    out = io.StringIO()
    sink = Sink(cfg, 4, out)
    ctx = zmq.Context()
    raw = _raw_sender(cfg, ctx)
    try:
        assert sink.max_ahead == 128
        raw.send_multipart(_logits_frames(0 + sink.max_ahead + 1, 1000, 2))  # an injector's far-future seq
        raw.send_multipart(_logits_frames(1, 2, 2))  # out of order but plausible: held
        raw.send_multipart(_logits_frames(0, 0, 2))
        assert sink.serve(timeout_s=5.0) == 0
    finally:
        raw.close(0)
        sink.close(0)
        ctx.destroy(0)
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == [0, 1, 2, 3]
    assert sink.metrics.error_count("ahead") == 1 and not sink._held


def test_sink_resumes_from_its_output_file(tmp_path):
    import zmq

    cfg = _cfg(["builtin:identity"], input_shape=(8,), microbatch=2, source=SourceConfig(count=4))
    path = tmp_path / "results.jsonl"
    line = lambda i, seq: json.dumps({"id": i, "seq": seq, "top5": [[0, 1.0]]}) + "\n"  # noqa: E731
    path.write_text(line(0, 0) + line(1, 0) + line(2, 1) + '{"id": 3, "se')  # killed mid-write
    sink = Sink(cfg, 4, io.StringIO())
    sink.resume(path)
    assert (sink.written, sink._next_seq) == (3, 1)  # microbatch 1 is incomplete: take it again
    assert path.read_text().endswith(line(2, 1))  # the torn line is cut off
    ctx = zmq.Context()
    raw = _raw_sender(cfg, ctx)
    try:
        with path.open("a") as f:
            sink.out = f
            raw.send_multipart(_logits_frames(0, 0, 2))  # resent by the last stage: on file already
            raw.send_multipart(_logits_frames(1, 2, 2))
            assert sink.serve(timeout_s=5.0) == 0
    finally:
        raw.close(0)
        sink.close(0)
        ctx.destroy(0)
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_source_resumes_after_the_recorded_progress(tmp_path):
    from quantpipe.errors import QuantpipeError

    cfg = _cfg(["builtin:identity"], input_shape=(4,), microbatch=2, source=SourceConfig(count=20))
    progress = tmp_path / "progress.json"
    inputs = load_inputs(cfg)
    first = Source(cfg, inputs, progress=str(progress), resume=True)  # nothing recorded yet: from the start
    try:
        assert first.start_seq == 0
        for seq in (1, 0, 3):  # DONE arrives out of order: only the contiguous prefix 0..1 counts
            first._handed_on(seq)
        first.record_progress()
        assert json.loads(progress.read_text()) == {"done_through": 1, "count": 20, "microbatch": 2}
    finally:
        first.link.close()
    again = Source(cfg, inputs, progress=str(progress), resume=True)
    try:
        assert [(seq, first_id) for seq, first_id, _ in again.microbatches()][:2] == [(2, 4), (3, 6)]
    finally:
        again.link.close()
    with pytest.raises(QuantpipeError, match="remove it"):  # a record of another stream is refused
        Source(cfg.replace(microbatch=4), inputs, progress=str(progress), resume=True)
    with pytest.raises(QuantpipeError, match="--progress"):
        Source(cfg, inputs, resume=True)
