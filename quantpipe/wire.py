"""The wire format: self-describing frames sent as ZeroMQ multipart messages. Never pickle.

A message is ``[header, payload]`` (plus an optional third 4-byte frame, the payload's CRC-32, when
``FLAG_PAYLOAD_CRC`` is set). The header is exactly :data:`HEADER_SIZE` = 64 bytes, little-endian:

======  ====  ================  ===========================================================
offset  size  field             meaning
======  ====  ================  ===========================================================
0       4     magic             ``b"QPIP"``
4       1     version           :data:`VERSION`
5       1     flags             bit 0: a payload CRC-32 frame follows
6       1     bits              1..8, 16 (quantized) or 32 (raw float32)
7       1     range_kind        0 none (bits 32), 1 clip-table reference, 2 inline per-tensor range
8       1     dtype             decoded dtype: 1 = float32
9       1     ndim              1..4
10      1     boundary          row of the clip table (range_kind 1)
11      1     method            method index within the clip table (range_kind 1)
12      2     stage             index of the sending stage (the source is 0xFFFF)
14      1     msg_type          0 data, 1 ack, 2 heartbeat, 3 error, 4 done (see :class:`MsgType`)
15      1     reserved          0
16      8     seq               microbatch sequence number
24      8     first_id          id of the first image in the microbatch (ids are consecutive)
32      4     table_digest      first 4 bytes of the clip table's sha256 (range_kind 1), else 0
36      4     payload_len       bytes in the payload frame
40      4     lo                inline range (range_kind 2), float32, else 0
44      4     hi                inline range (range_kind 2), float32, else 0
48      4     dim0              first dimension (the batch), uint32
52      2x3   dim1..dim3        remaining dimensions, uint16 each, 0 where unused
58      2     reserved          0
60      4     header_crc        CRC-32 of bytes 0..59
======  ====  ================  ===========================================================

A receiver needs nothing but the frame and the shared clip table to decode it, so a sender may change
bitwidth on any frame without a handshake. :func:`parse_header` validates every field and
:func:`check_message` also checks the payload against the header; anything malformed, truncated,
oversized, inconsistent or corrupted raises :class:`~quantpipe.errors.FrameError` with a ``kind``.
This module only builds and parses frames: the numbers (rotation, clip, quantize, pack, and whether a
table reference resolves) are :mod:`quantpipe.quant.linkcodec`'s, which daemons hold per link;
:func:`encode_frame` / :func:`decode_frame` are one-off conveniences over it.

Control messages (acks, heartbeats, errors) use the same header with an empty or small payload
(:func:`encode_control` / :func:`decode_control`): ``bits`` 32, range kind none, ``shape`` ``(count,)``
where count is the number of images a message concerns (0 for acks and heartbeats), ``seq`` the
microbatch it concerns, ``first_id`` its first image id (a heartbeat carries the sender's incarnation
there, so a peer notices a restart). The runtime (:mod:`quantpipe.runtime.link`) defines what they mean.

On a runtime link, data and error messages carry one more, last frame: the 8-byte *trace*
(:func:`pack_trace`), the source's wall-clock time when the microbatch entered the pipeline, so the
sink can report per-image latency. The link layer strips it before calling :func:`decode_frame`, which
keeps seeing exactly the 2- or 3-frame data message documented above.
"""

from __future__ import annotations

import enum
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from quantpipe.errors import FrameError
from quantpipe.quant import codec
from quantpipe.quant.primitives import WIRE_BITS

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "SOURCE_STAGE",
    "DEFAULT_MAX_PAYLOAD",
    "FLAG_PAYLOAD_CRC",
    "MsgType",
    "RangeKind",
    "FrameHeader",
    "RangeProvider",
    "pack_header",
    "parse_header",
    "encode_frame",
    "decode_frame",
    "check_frame",
    "check_message",
    "payload_crc",
    "frame_nbytes",
    "TRACE_SIZE",
    "MAX_CONTROL_BODY",
    "pack_trace",
    "parse_trace",
    "encode_control",
    "decode_control",
]

MAGIC = b"QPIP"
VERSION = 1
HEADER_SIZE = 64
SOURCE_STAGE = 0xFFFF
FLAG_PAYLOAD_CRC = 0x01
DEFAULT_MAX_PAYLOAD = 256 * 1024 * 1024

_STRUCT = struct.Struct("<4sBBBBBBBBHBBQQIIffIHHHHI")
assert _STRUCT.size == HEADER_SIZE

_TRACE = struct.Struct("<d")
TRACE_SIZE = _TRACE.size
#: Control bodies (error reports) are small JSON documents; anything larger is refused.
MAX_CONTROL_BODY = 64 * 1024

_DTYPES = {1: np.dtype(np.float32)}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}


class MsgType(enum.IntEnum):
    DATA = 0
    ACK = 1
    HEARTBEAT = 2
    ERROR = 3
    DONE = 4  # the receiver handed the microbatch on (runtime links: the sender may forget it)


class RangeKind(enum.IntEnum):
    NONE = 0
    TABLE = 1
    INLINE = 2


@dataclass(frozen=True)
class FrameHeader:
    """The decoded fields of a frame header (see the module docstring for the layout)."""

    seq: int
    first_id: int
    shape: tuple[int, ...]
    bits: int = 32
    range_kind: RangeKind = RangeKind.NONE
    stage: int = SOURCE_STAGE
    msg_type: MsgType = MsgType.DATA
    boundary: int = 0
    method: int = 0
    table_digest: int = 0
    lo: float = 0.0
    hi: float = 0.0
    payload_len: int = 0
    flags: int = 0
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def batch(self) -> int:
        return self.shape[0] if self.shape else 0


class RangeProvider(Protocol):
    """What a receiver needs to dequantize table-referenced frames: the shared clip table.

    ``transform`` returns an orthogonal matrix ``R`` (``[C, C]``) when the method quantizes ``x @ R``
    instead of ``x`` (decoding then applies ``R.T``), or None.
    """

    digest: int

    def ranges(self, boundary: int, method: int, bits: int) -> tuple[np.ndarray, np.ndarray]: ...

    def transform(self, boundary: int, method: int) -> np.ndarray | None: ...


def pack_header(h: FrameHeader) -> bytes:
    """Serialize a header (fields are validated by :func:`parse_header` on the other side)."""
    if not 1 <= len(h.shape) <= 4:
        raise ValueError(f"a frame carries 1 to 4 dimensions, got shape {h.shape}")
    dims = list(h.shape) + [0] * (4 - len(h.shape))
    if dims[0] >= 1 << 32 or any(d >= 1 << 16 for d in dims[1:]):
        raise ValueError(f"shape {h.shape} does not fit the header (dim0 < 2**32, other dims < 2**16)")
    body = _STRUCT.pack(
        MAGIC, VERSION, h.flags, h.bits, int(h.range_kind), _DTYPE_CODES[np.dtype(h.dtype)], len(h.shape),
        h.boundary, h.method, h.stage, int(h.msg_type), 0, h.seq, h.first_id, h.table_digest,
        h.payload_len, h.lo, h.hi, dims[0], dims[1], dims[2], dims[3], 0, 0,
    )
    return body[:60] + struct.pack("<I", zlib.crc32(body[:60]))


def parse_header(buf, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> FrameHeader:
    """Parse and validate a 64-byte header. Raises :class:`FrameError` on anything malformed."""
    raw = bytes(buf) if not isinstance(buf, bytes) else buf
    if len(raw) != HEADER_SIZE:
        raise FrameError(f"header is {len(raw)} bytes, expected {HEADER_SIZE}", "length")
    (magic, version, flags, bits, range_kind, dtype_code, ndim, boundary, method, stage, msg_type, reserved,
     seq, first_id, digest, payload_len, lo, hi, d0, d1, d2, d3, reserved2, crc) = _STRUCT.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: not a quantpipe frame", "magic")
    if version != VERSION:
        raise FrameError(f"frame version {version}, this build speaks {VERSION}: upgrade the older side", "version")
    if zlib.crc32(raw[:60]) != crc:
        raise FrameError("header CRC mismatch: the frame is corrupted", "crc")
    if reserved or reserved2 or flags & ~FLAG_PAYLOAD_CRC:
        raise FrameError("reserved header bits are set", "malformed")
    try:
        msg_type = MsgType(msg_type)
        range_kind = RangeKind(range_kind)
    except ValueError as exc:
        raise FrameError(str(exc), "malformed") from None
    if bits not in WIRE_BITS:
        raise FrameError(f"unsupported bitwidth {bits}", "malformed")
    if dtype_code not in _DTYPES:
        raise FrameError(f"unknown dtype code {dtype_code}", "malformed")
    if not 1 <= ndim <= 4:
        raise FrameError(f"ndim {ndim} out of range 1..4", "malformed")
    dims = (d0, d1, d2, d3)
    shape = dims[:ndim]
    if any(d == 0 for d in shape) and msg_type == MsgType.DATA or any(dims[ndim:]):
        raise FrameError(f"inconsistent shape fields {dims} for ndim {ndim}", "inconsistent")
    if (bits == 32) != (range_kind == RangeKind.NONE):
        raise FrameError(f"range kind {range_kind.name} does not fit bitwidth {bits}", "inconsistent")
    if range_kind == RangeKind.INLINE and not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise FrameError(f"invalid inline range [{lo}, {hi}]", "inconsistent")
    if payload_len > max_payload:
        raise FrameError(f"payload of {payload_len} bytes exceeds the limit of {max_payload}", "oversized")
    if msg_type == MsgType.DATA:
        n = math.prod(shape)
        expected = codec.encoded_nbytes(n, bits)
        if payload_len != expected:
            raise FrameError(f"payload_len {payload_len} does not match shape {shape} at {bits} bits ({expected})", "inconsistent")
    return FrameHeader(
        seq=seq, first_id=first_id, shape=tuple(shape), bits=bits, range_kind=range_kind, stage=stage,
        msg_type=msg_type, boundary=boundary, method=method, table_digest=digest, lo=lo, hi=hi,
        payload_len=payload_len, flags=flags, dtype=_DTYPES[dtype_code],
    )


def frame_nbytes(n_values: int, bits: int) -> int:
    """Bytes of a data frame on the wire (header + payload), excluding ZeroMQ's own framing."""
    return HEADER_SIZE + codec.encoded_nbytes(n_values, bits)


def payload_crc(payload) -> bytes:
    """The optional third frame of a data message: the payload's CRC-32, little-endian."""
    return struct.pack("<I", zlib.crc32(payload))


def check_message(frames, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[FrameHeader, memoryview]:
    """Every structural check of a data message ``[header, payload(, crc)]``: the header's fields,
    the payload's length and (when flagged) its CRC. Returns the header and a zero-copy view of the
    payload. Whether a clip-table reference resolves is the decoder's check
    (:meth:`quantpipe.quant.linkcodec.BoundaryCodec.check`). Raises :class:`FrameError`.
    """
    if len(frames) not in (2, 3):
        raise FrameError(f"a data message has 2 or 3 frames, got {len(frames)}", "malformed")
    header = parse_header(_buffer(frames[0]), max_payload=max_payload)
    if header.msg_type != MsgType.DATA:
        raise FrameError(f"expected a data frame, got {header.msg_type.name}", "malformed")
    payload = _buffer(frames[1])
    if len(payload) != header.payload_len:
        raise FrameError(f"payload is {len(payload)} bytes, header says {header.payload_len}: truncated or padded", "length")
    has_crc = bool(header.flags & FLAG_PAYLOAD_CRC)
    if has_crc != (len(frames) == 3):
        raise FrameError("payload CRC flag and frame count disagree", "malformed")
    if has_crc:
        crc_buf = bytes(_buffer(frames[2]))
        if len(crc_buf) != 4 or struct.unpack("<I", crc_buf)[0] != zlib.crc32(payload):
            raise FrameError("payload CRC mismatch: the frame is corrupted", "crc")
    return header, payload


# -- one-off convenience: tools, tests and calibration. Daemons hold a BoundaryCodec per link instead.
def encode_frame(
    x: np.ndarray,
    *,
    seq: int,
    first_id: int,
    stage: int,
    bits: int = 32,
    table: RangeProvider | None = None,
    boundary: int = 0,
    method: int = 0,
    inline_range: tuple[float, float] | None = None,
    payload_crc: bool = False,
) -> list:
    """Encode a float32 tensor as a data message ``[header, payload(, crc)]``.

    Quantized frames take their range from ``table`` (per channel, referenced by boundary/method) or
    from ``inline_range`` (per tensor, carried in the header). One of them is required below 32 bits.
    """
    if bits != 32 and table is None and inline_range is None:
        raise ValueError(f"encoding at {bits} bits needs a clip table or an inline range")
    from quantpipe.quant.linkcodec import codec_for

    return codec_for(table).encode(x, bits, seq=seq, first_id=first_id, stage=stage, boundary=boundary,
                                   method=method, inline_range=inline_range, payload_crc=payload_crc)


def check_frame(
    frames, *, table: RangeProvider | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> FrameHeader:
    """Validate a data message completely (everything :func:`decode_frame` checks) without decoding it."""
    from quantpipe.quant.linkcodec import codec_for

    return codec_for(table).check(frames, max_payload=max_payload).header


def decode_frame(
    frames, *, table: RangeProvider | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> tuple[FrameHeader, np.ndarray]:
    """Validate and decode a data message. Returns the header and a float32 tensor the caller owns.

    ``frames`` is the list from ``recv_multipart`` (bytes or zmq.Frame objects).
    """
    from quantpipe.quant.linkcodec import codec_for

    c = codec_for(table)
    checked = c.check(frames, max_payload=max_payload)
    return checked.header, c.decode(checked)


def _buffer(frame) -> memoryview:
    """A read-only byte view of a zmq.Frame, bytes or buffer, without copying."""
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf


def pack_trace(t_origin: float) -> bytes:
    """The trace frame: the source's wall-clock time (seconds since the epoch) for latency reports."""
    return _TRACE.pack(float(t_origin))


def parse_trace(frame) -> float:
    """Parse a trace frame. Raises :class:`FrameError` (kind ``"malformed"``) unless it is 8 finite bytes."""
    buf = _buffer(frame)
    if len(buf) != TRACE_SIZE:
        raise FrameError(f"trace frame is {len(buf)} bytes, expected {TRACE_SIZE}", "malformed")
    (t,) = _TRACE.unpack(buf)
    if not math.isfinite(t):
        raise FrameError("trace frame holds a non-finite time", "malformed")
    return t


def encode_control(
    msg_type: MsgType, *, seq: int = 0, stage: int = SOURCE_STAGE, first_id: int = 0, count: int = 0,
    body: bytes = b"",
) -> list[bytes]:
    """Encode a control message ``[header(, body)]``: an ack, heartbeat or error report.

    Args:
        msg_type: :attr:`MsgType.ACK`, :attr:`MsgType.HEARTBEAT` or :attr:`MsgType.ERROR`.
        seq: the microbatch acknowledged or reported on.
        stage: the sending stage.
        first_id: first image id of the microbatch (errors), or the sender's incarnation (heartbeats).
        count: images concerned (errors), else 0.
        body: small payload (an error report's UTF-8 JSON); at most :data:`MAX_CONTROL_BODY` bytes.
    """
    msg_type = MsgType(msg_type)
    if msg_type == MsgType.DATA:
        raise ValueError("data messages are made with encode_frame")
    if len(body) > MAX_CONTROL_BODY:
        raise ValueError(f"control body of {len(body)} bytes exceeds {MAX_CONTROL_BODY}")
    header = pack_header(FrameHeader(seq=seq, first_id=first_id, shape=(count,), stage=stage,
                                     msg_type=msg_type, payload_len=len(body)))
    return [header, bytes(body)] if body else [header]


def decode_control(frames) -> tuple[FrameHeader, bytes]:
    """Validate a control message made by :func:`encode_control`; returns its header and body."""
    if len(frames) not in (1, 2):
        raise FrameError(f"a control message has 1 or 2 frames, got {len(frames)}", "malformed")
    header = parse_header(_buffer(frames[0]), max_payload=MAX_CONTROL_BODY)
    if header.msg_type == MsgType.DATA:
        raise FrameError("expected a control message, got a data frame", "malformed")
    if header.bits != 32 or header.range_kind != RangeKind.NONE or len(header.shape) != 1:
        raise FrameError("control message header has data fields set", "inconsistent")
    body = bytes(_buffer(frames[1])) if len(frames) == 2 else b""
    if len(body) != header.payload_len:
        raise FrameError(f"control body is {len(body)} bytes, header says {header.payload_len}", "length")
    return header, body
