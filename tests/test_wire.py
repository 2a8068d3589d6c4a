"""The data-frame contract of quantpipe.wire: layout, round trips, and rejection of bad frames."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantpipe import wire
from quantpipe.errors import FrameError
from quantpipe.quant import codec


class FakeTable:
    """A minimal RangeProvider: per-channel ranges, optional rotation."""

    def __init__(self, channels: int, digest: int = 0xA1B2C3D4, rotate: bool = False, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.digest = digest
        self.lo = (-2.0 - rng.random(channels)).astype(np.float32)
        self.hi = (2.0 + rng.random(channels)).astype(np.float32)
        self.rot = np.linalg.qr(rng.standard_normal((channels, channels)))[0].astype(np.float32) if rotate else None

    def ranges(self, boundary, method, bits):
        if boundary != 0 or method not in (0, 1):
            raise KeyError((boundary, method))
        return self.lo, self.hi

    def transform(self, boundary, method):
        return self.rot if method == 1 else None


def _activations(shape=(3, 7, 16), seed=1):
    return np.random.default_rng(seed).laplace(0, 0.7, size=shape).astype(np.float32)


def test_header_layout_is_the_documented_one():
    x = _activations((2, 5, 8))
    frames = wire.encode_frame(x, seq=0x0102030405060708, first_id=42, stage=1, bits=4, inline_range=(-1.5, 2.5))
    h = frames[0]
    assert len(h) == wire.HEADER_SIZE == 64
    assert h[0:4] == b"QPIP"
    assert h[4] == wire.VERSION and h[5] == 0 and h[6] == 4 and h[7] == wire.RangeKind.INLINE
    assert h[8] == 1 and h[9] == 3  # float32, ndim
    assert struct.unpack_from("<H", h, 12)[0] == 1
    assert h[14] == wire.MsgType.DATA and h[15] == 0
    assert struct.unpack_from("<QQ", h, 16) == (0x0102030405060708, 42)
    assert struct.unpack_from("<I", h, 36)[0] == len(frames[1]) == (2 * 5 * 8 * 4 + 7) // 8
    assert struct.unpack_from("<ff", h, 40) == (-1.5, 2.5)
    assert struct.unpack_from("<IHHH", h, 48) == (2, 5, 8, 0)
    assert struct.unpack_from("<I", h, 60)[0] == zlib.crc32(h[:60])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16, 32])
def test_round_trip_with_table_matches_codec(bits):
    x = _activations()
    table = FakeTable(x.shape[-1])
    frames = wire.encode_frame(x, seq=7, first_id=100, stage=0, bits=bits, table=table)
    header, y = wire.decode_frame(frames, table=table)
    assert (header.seq, header.first_id, header.shape, header.bits) == (7, 100, x.shape, bits)
    if bits == 32:
        assert np.array_equal(y, x)
    else:
        assert header.range_kind == wire.RangeKind.TABLE and header.table_digest == table.digest
        expected = codec.decode(codec.encode(x, bits, table.lo, table.hi), x.shape, bits, table.lo, table.hi)
        assert np.array_equal(y, expected)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8, 16])
def test_wire_bytes_within_ideal_plus_header(bits):
    x = _activations((4, 197, 24))
    frames = wire.encode_frame(x, seq=1, first_id=0, stage=0, bits=bits, inline_range=(-3, 3))
    ideal = -(-x.size * bits // 8)
    assert sum(len(f) for f in frames) <= ideal + 64
    assert len(frames[1]) == ideal


def test_rotation_is_applied_and_undone():
    x = 0.25 * _activations((2, 9, 12))  # small enough that x @ R stays inside the table's range
    table = FakeTable(12, rotate=True)
    frames = wire.encode_frame(x, seq=1, first_id=0, stage=0, bits=16, table=table, method=1)
    _, y = wire.decode_frame(frames, table=table)
    assert np.max(np.abs(y - x)) < 1e-3  # 16-bit on a rotated tensor: small, and in the original basis


def test_payload_crc_detects_corruption():
    x = _activations()
    frames = wire.encode_frame(x, seq=1, first_id=0, stage=0, bits=8, inline_range=(-4, 4), payload_crc=True)
    assert len(frames) == 3
    wire.decode_frame(frames)
    bad = bytearray(frames[1])
    bad[5] ^= 0x10
    with pytest.raises(FrameError) as err:
        wire.decode_frame([frames[0], bytes(bad), frames[2]])
    assert err.value.kind == "crc"


def _rewrite(header: bytes, offset: int, fmt: str, value) -> bytes:
    """Change one header field and fix the CRC, to test validation beyond the checksum."""
    h = bytearray(header)
    struct.pack_into(fmt, h, offset, value)
    struct.pack_into("<I", h, 60, zlib.crc32(bytes(h[:60])))
    return bytes(h)


@pytest.mark.parametrize(
    "mutate, kind",
    [
        (lambda h, p: [h[:40], p], "length"),
        (lambda h, p: [b"XXXX" + h[4:], p], "magic"),
        (lambda h, p: [_rewrite(h, 4, "<B", 9), p], "version"),
        (lambda h, p: [h[:20] + bytes([h[20] ^ 1]) + h[21:], p], "crc"),
        (lambda h, p: [_rewrite(h, 15, "<B", 1), p], "malformed"),
        (lambda h, p: [_rewrite(h, 6, "<B", 9), p], "malformed"),
        (lambda h, p: [_rewrite(h, 9, "<B", 0), p], "malformed"),
        (lambda h, p: [_rewrite(h, 36, "<I", len(p) + 1), p], "inconsistent"),
        (lambda h, p: [_rewrite(h, 7, "<B", 0), p], "inconsistent"),
        (lambda h, p: [_rewrite(h, 40, "<f", float("nan")), p], "inconsistent"),
        (lambda h, p: [h, p[:-1]], "length"),
        (lambda h, p: [h, p + b"\0"], "length"),
        (lambda h, p: [h], "malformed"),
        (lambda h, p: [h, p, b"", b""], "malformed"),
    ],
    ids=["short-header", "magic", "version", "header-crc", "reserved", "bits", "ndim", "payload-len",
         "range-kind", "nan-range", "truncated", "padded", "one-frame", "four-frames"],
)
def test_bad_frames_are_rejected_with_a_kind(mutate, kind):
    x = _activations()
    header, payload = wire.encode_frame(x, seq=1, first_id=0, stage=0, bits=4, inline_range=(-2, 2))
    with pytest.raises(FrameError) as err:
        wire.decode_frame(mutate(header, bytes(payload)))
    assert err.value.kind == kind


def test_oversized_payload_is_rejected_before_decoding():
    x = _activations((8, 197, 64))
    frames = wire.encode_frame(x, seq=1, first_id=0, stage=0, bits=32)
    with pytest.raises(FrameError) as err:
        wire.decode_frame(frames, max_payload=1024)
    assert err.value.kind == "oversized"


def test_table_mismatch_and_missing_entries():
    x = _activations()
    table = FakeTable(x.shape[-1])
    frames = wire.encode_frame(x, seq=1, first_id=0, stage=0, bits=4, table=table)
    with pytest.raises(FrameError, match="same table") as err:
        wire.decode_frame(frames, table=FakeTable(x.shape[-1], digest=0x11111111))
    assert err.value.kind == "table"
    with pytest.raises(FrameError) as err:
        wire.decode_frame(frames, table=None)
    assert err.value.kind == "table"
    other = wire.encode_frame(x, seq=1, first_id=0, stage=0, bits=4, table=table, boundary=0, method=0)
    h = _rewrite(other[0], 10, "<B", 3)  # boundary 3 is not in the table
    with pytest.raises(FrameError) as err:
        wire.decode_frame([h, other[1]], table=table)
    assert err.value.kind == "table"


def _valid_frames(seed: int):
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(1, 6, size=int(rng.integers(1, 4))))
    bits = int(rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 16, 32]))
    x = rng.standard_normal(shape).astype(np.float32)
    kw = {} if bits == 32 else {"inline_range": (-1.0, 1.0)}
    return wire.encode_frame(x, seq=seed, first_id=seed, stage=0, bits=bits, **kw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), data=st.data())
def test_fuzz_mutated_frames_never_escape_as_other_errors(seed, data):
    """Random bit flips, truncations and junk: decoding either succeeds with a consistent tensor or
    raises FrameError; nothing else escapes (no crash path for a live daemon)."""
    frames = [bytes(f) for f in _valid_frames(seed)]
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "junk-header", "swap"]))
    target = data.draw(st.integers(0, len(frames) - 1))
    buf = bytearray(frames[target])
    if op == "flip" and buf:
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        buf = buf[: data.draw(st.integers(0, max(0, len(buf) - 1)))]
    elif op == "extend":
        buf += data.draw(st.binary(min_size=1, max_size=32))
    elif op == "junk-header":
        target, buf = 0, bytearray(data.draw(st.binary(min_size=0, max_size=80)))
    elif op == "swap":
        frames = frames[::-1]
    frames[target] = bytes(buf)
    try:
        header, y = wire.decode_frame(frames)
    except FrameError as exc:
        assert exc.kind
    else:
        assert y.shape == header.shape and y.dtype == np.float32
