"""Transport throughput: identity stages over loopback, bytes of frames per second per link.

Reproduces the "Transport" figure of BENCHMARKS.md (targets.md section 4: >= 1 GB/s per link)::

    python bench/transport.py --stages 1 --microbatch 64 --frames 150

Topology: a sender process -> K ``quantpipe stage`` daemons running ``builtin:identity`` at 32 bits
-> a counting receiver process; every hop is a real acknowledged, credit-limited link
(:mod:`quantpipe.runtime.link`) over 127.0.0.1 TCP, every frame is validated by ``decode_frame`` on every
hop. The sender and the receiver are the link layer without the source's pacing or the sink's top-5
(which would measure numpy, not transport). A link's throughput is the bytes of all frames crossing it
divided by the time from the receiver's first to its last frame; with K identity stages every link
carries the same frames, so the figure is per link. Also prints ``np.copyto`` bandwidth on the same
tensor, measured in the same run, as the machine's yardstick.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(address: str, shape: tuple[int, ...], frames: int, credits: int) -> None:
    import zmq

    from quantpipe import wire
    from quantpipe.runtime.link import LinkOptions, LinkSender

    ctx = zmq.Context()
    link = LinkSender(ctx, address, LinkOptions(window=credits), stage=wire.SOURCE_STAGE, policy_window=10)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    payload = wire.encode_frame(x, seq=0, first_id=0, stage=wire.SOURCE_STAGE)[1]  # zero-copy view of x
    trace = wire.pack_trace(time.time())
    for seq in range(frames):
        link.wait_credit()
        header = wire.pack_header(wire.FrameHeader(seq=seq, first_id=seq * shape[0], shape=shape,
                                                   payload_len=payload.size))
        link.send([header, payload, trace], seq=seq, images=shape[0], bits=32, fp32_bytes=x.nbytes)
        link.pump(0.0)
    link.drain(60.0)
    link.close()
    ctx.destroy(linger=0)


def _receive(address: str, frames: int, result: mp.Queue) -> None:
    import zmq

    from quantpipe import wire
    from quantpipe.runtime.link import LinkOptions, LinkReceiver

    ctx = zmq.Context()
    rx = LinkReceiver(ctx, address, LinkOptions(), stage=0xFFFE)
    got, nbytes, first, last = 0, 0, 0.0, 0.0
    while got < frames:
        msg = rx.receive(30.0)
        if msg is None:
            break
        wire.decode_frame(msg.frames)
        rx.accept(msg)
        rx.done(msg.header.seq)  # consumed: the sender may forget it (custody)
        last = time.perf_counter()
        if got == 0:
            first = last
        else:  # the first frame opens the clock; count what arrives after it
            nbytes += msg.nbytes
        got += 1
    result.put({"frames": got, "bytes": nbytes, "seconds": last - first})
    rx.close(1.0)
    ctx.destroy(linger=1000)


def copy_bandwidth(shape: tuple[int, ...], repeats: int = 10) -> float:
    """Bytes/s of ``np.copyto`` on a tensor of ``shape`` (best of ``repeats``)."""
    src = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=1,
                        help="identity stages between sender and receiver (0: one bare link)")
    parser.add_argument("--microbatch", type=int, default=64, help="images per frame")
    parser.add_argument("--shape", default="197,192", help="per-image tensor shape (DeiT-Tiny boundary)")
    parser.add_argument("--frames", type=int, default=150, help="frames to send")
    parser.add_argument("--credits", type=int, default=4, help="unacknowledged frames per link")
    args = parser.parse_args()
    shape = (args.microbatch, *(int(d) for d in args.shape.split(",")))
    ports = [_port() for _ in range(args.stages + 1)]
    addresses = [f"tcp://127.0.0.1:{p}" for p in ports]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "transport.toml"
        lines = ["[pipeline]", f"input_shape = {list(shape[1:])}", 'policy = "fixed"', "fixed_bits = 32",
                 f"credits = {args.credits}", f"microbatch = {args.microbatch}", "target_rate = 1000000.0",
                 "[sink]", f'address = "{addresses[-1]}"']
        for k in range(args.stages):
            lines += ["[[stages]]", 'engine = "builtin:identity"', f'address = "{addresses[k]}"']
        config.write_text("\n".join(lines) + "\n")  # with --stages 0 it is never read: sender -> receiver
        ctx = mp.get_context("spawn")
        result: mp.Queue = ctx.Queue()
        receiver = ctx.Process(target=_receive, args=(addresses[-1], args.frames, result))
        receiver.start()
        stages = [subprocess.Popen([sys.executable, "-m", "quantpipe.cli", "stage", "--config",
                                    str(config), "--stage", str(k), "-q"], stderr=subprocess.DEVNULL)
                  for k in range(args.stages)]
        try:
            time.sleep(3.0)  # stages load and bind
            sender = ctx.Process(target=_send, args=(addresses[0], shape, args.frames, args.credits))
            sender.start()
            measured = result.get(timeout=600)
            sender.join(60)
        finally:
            for p in stages:
                p.terminate()
            for p in stages:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            receiver.join(10)
            if receiver.is_alive():
                receiver.terminate()
    frame_bytes = measured["bytes"] / max(1, measured["frames"] - 1)
    rate = measured["bytes"] / measured["seconds"] if measured["seconds"] > 0 else 0.0
    copy = copy_bandwidth(shape)
    report = {
        "stages": args.stages, "frame_shape": list(shape), "frame_bytes": int(frame_bytes), "frames": measured["frames"],
        "seconds": round(measured["seconds"], 3), "link_GB_per_s": round(rate / 1e9, 3),
        "copyto_GB_per_s": round(copy / 1e9, 3), "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report))
    return 0 if measured["frames"] == args.frames else 1


if __name__ == "__main__":
    sys.exit(main())
