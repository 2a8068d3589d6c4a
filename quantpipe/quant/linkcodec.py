"""The numbers of one hop: a per-link frame encoder/decoder with everything resolved once.

:mod:`quantpipe.wire` builds and parses frames (header layout, structural checks); this module does
the arithmetic that turns a boundary tensor into a payload and back: the optional rotation
(:class:`~quantpipe.quant.rotation.Rotation`), clip + quantize + pack (:class:`~quantpipe.quant.codec.PreparedRange`)
and the reverse. A stage daemon holds one :class:`BoundaryCodec` for its inbound link and one for its
outbound link, built when it starts (or loads its table), so that the per-frame work is only what
changes per frame:

* the table digest, the float32 ranges of every (boundary, method, bitwidth) laid out for the kernels,
  and every rotation in its fast form are prepared in the constructor; a frame costs dict lookups, not
  work that grows with the table;
* a received frame is validated once (:meth:`BoundaryCodec.check`, in the stage's receiving thread,
  before it is acknowledged) and the result (:class:`CheckedFrame`) is what :meth:`BoundaryCodec.decode`
  takes: no second parse;
* payloads are decoded in place from the received ZeroMQ buffers, and tensor-sized buffers come from a
  :class:`BufferPool` that reuses a buffer only once nothing else (a frame still queued in libzmq or held
  in custody for a resend, an engine's output that aliases its input) references it.

The codes are those of the reference (:mod:`quantpipe.quant.primitives` + :mod:`quantpipe.quant.packing`)
for the same input, range and rotated input; a rotated input is computed by the fast transform, which
agrees with the dense ``x @ R`` to float32 rounding (a value within an ulp of a rounding boundary may get
the neighbouring code). A codec is not thread-safe except :meth:`BoundaryCodec.check`, which only reads.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantpipe import wire
from quantpipe.errors import FrameError
from quantpipe.quant import codec
from quantpipe.quant.codec import PreparedRange
from quantpipe.quant.rotation import Rotation

__all__ = ["BufferPool", "CheckedFrame", "BoundaryCodec", "codec_for"]

#: Buffers kept per (shape, dtype): more than a link ever holds (credits + custody), few enough to be cheap.
_POOL_DEPTH = 16


class BufferPool:
    """Tensor-sized numpy buffers reused across frames.

    A buffer is handed out again only when the pool's own references are the only ones left: a payload
    that pyzmq still sends without copying (``copy=False``), a frame kept in custody for a resend, or an
    engine output that is a view of its input all hold a reference (directly or as a view's base), so
    such a buffer is never overwritten under them.
    """

    def __init__(self, depth: int = _POOL_DEPTH) -> None:
        self.depth = depth
        self._buffers: dict[tuple, list[np.ndarray]] = {}
        self.allocations = 0

    def get(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype).str)
        kept = self._buffers.setdefault(key, [])
        for buf in kept:
            # Held by the list, the loop variable and getrefcount's argument: 3 means nobody else.
            if sys.getrefcount(buf) <= 3:
                return buf
        buf = np.empty(shape, dtype=dtype)
        self.allocations += 1
        if len(kept) < self.depth:
            kept.append(buf)
        return buf


@dataclass(frozen=True)
class CheckedFrame:
    """A data message that passed every check (:meth:`BoundaryCodec.check`), ready to decode."""

    header: wire.FrameHeader
    payload: np.ndarray  # uint8 view of the received payload frame (no copy)
    prepared: PreparedRange | None = None  # table frames: the prepared range of (boundary, method, bits)
    rotation: Rotation | None = None  # table frames of a rotated method


class BoundaryCodec:
    """Encodes one link's outgoing frames and validates and decodes its incoming ones.

    Args:
        table: the clip table (a :class:`~quantpipe.quant.table.ClipTable` or anything with ``digest``,
            ``bits``, ``methods``, ``boundaries``, ``ranges()`` and ``transform()``), or None: then
            quantized frames carry a per-microbatch min-max range inline.
        boundary: the boundary this codec encodes (a stage's output index).
        method: the clip-table method index it encodes with.
        stage: the sending stage index written into headers (:data:`wire.SOURCE_STAGE` for the source).
        max_payload: largest payload :meth:`check` accepts.
        reuse_buffers: decode into and encode from pooled buffers (daemons); False returns fresh
            arrays that the caller may keep (tools, tests).
    """

    def __init__(self, table: Any = None, boundary: int = 0, method: int = 0, *, stage: int = wire.SOURCE_STAGE,
                 max_payload: int = wire.DEFAULT_MAX_PAYLOAD, reuse_buffers: bool = True) -> None:
        self.table = table
        self.boundary, self.method, self.stage = int(boundary), int(method), int(stage)
        self.max_payload = max_payload
        self.digest = int(table.digest) if table is not None else 0
        self._pool = BufferPool() if reuse_buffers else None
        self._ranges: dict[tuple[int, int, int], PreparedRange] = {}
        self._rotations: dict[tuple[int, int], Rotation] = {}
        self._scratch: dict[tuple, np.ndarray] = {}
        self._shared_rotations: dict[bytes, Rotation] = {}
        if table is not None:
            self._prepare(table)

    def _prepare(self, table: Any) -> None:
        """Prepare every (boundary, method, bits) of a table that lists them (a ClipTable); a minimal
        range provider (``digest``, ``ranges()``, ``transform()``) is prepared entry by entry on first use."""
        if not all(hasattr(table, a) for a in ("boundaries", "methods", "bits")):
            return
        for b in table.boundaries:
            for m in range(len(table.methods)):
                for bits in table.bits:
                    if bits != 32:
                        self._entry(b, m, bits)

    def _entry(self, b: int, m: int, bits: int) -> tuple[PreparedRange, Rotation | None]:
        """The prepared range and rotation of (boundary, method, bits). Raises KeyError if the table has none."""
        prepared = self._ranges.get((b, m, bits))
        if prepared is None:
            try:
                lo, hi = self.table.ranges(b, m, bits)
                r = self.table.transform(b, m)
                prepared = codec.prepare_range(lo, hi, bits)
            except (KeyError, IndexError, ValueError) as exc:
                raise KeyError(f"the clip table has no range for boundary {b}, method {m}, {bits} bits ({exc})") from None
            if r is not None and (b, m) not in self._rotations:
                key = np.ascontiguousarray(r, dtype=np.float32).tobytes()
                # methods that share a stored matrix share its prepared form
                self._rotations[(b, m)] = self._shared_rotations.setdefault(key, Rotation(r))
            self._ranges[(b, m, bits)] = prepared
        return prepared, self._rotations.get((b, m))

    # ------------------------------------------------------------------------------------ buffers
    def _buffer(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if self._pool is None:
            return np.empty(shape, dtype=dtype)
        return self._pool.get(shape, dtype)

    def _scratch_for(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 buffer used only inside one encode/decode call (never escapes)."""
        if self._pool is None:
            return np.empty(shape, dtype=np.float32)
        buf = self._scratch.get(shape)
        if buf is None:
            buf = self._scratch[shape] = np.empty(shape, dtype=np.float32)
        return buf

    # ------------------------------------------------------------------------------------ encode
    def encode(self, y: np.ndarray, bits: int, *, seq: int, first_id: int, payload_crc: bool = False,
               inline_range: tuple[float, float] | None = None, boundary: int | None = None,
               method: int | None = None, stage: int | None = None) -> list:
        """The data message ``[header, payload(, crc)]`` of float32 tensor ``y`` at ``bits``.

        With a table, quantized frames reference (boundary, method); without one (or with
        ``inline_range``) they carry a per-tensor range in the header, by default ``y``'s min-max.
        The payload is a fresh or pooled buffer (at 32 bits, a view of ``y``): send it with
        ``copy=False``.
        """
        b = self.boundary if boundary is None else int(boundary)
        m = self.method if method is None else int(method)
        x = np.require(y, dtype=np.float32, requirements=["C", "A"])
        lo = hi = 0.0
        digest = 0
        if bits == 32:
            kind, payload = wire.RangeKind.NONE, codec.encode(x, 32)
        else:
            payload = self._buffer((codec.encoded_nbytes(x.size, bits),), np.uint8)
            if self.table is not None and inline_range is None:
                kind, digest = wire.RangeKind.TABLE, self.digest
                try:
                    prepared, rotation = self._entry(b, m, bits)
                except KeyError as exc:
                    raise ValueError(str(exc).strip("'\"")) from None
                if rotation is not None:
                    x = rotation.apply(x, self._scratch_for(x.shape))
                prepared.encode(x, payload)
            else:
                kind = wire.RangeKind.INLINE
                if inline_range is None:
                    inline_range = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
                lo, hi = (float(np.float32(v)) for v in inline_range)
                codec.encode(x, bits, lo, hi, out=payload)
        return self._message(payload, x.shape, bits, kind, seq=seq, first_id=first_id, stage=stage, boundary=b,
                             method=m, digest=digest, lo=lo, hi=hi, payload_crc=payload_crc)

    def _message(self, payload: np.ndarray, shape: tuple[int, ...], bits: int, kind: wire.RangeKind, *, seq: int,
                 first_id: int, stage: int | None, boundary: int, method: int, digest: int, lo: float, hi: float,
                 payload_crc: bool) -> list:
        """``[header, payload(, crc)]`` around an encoded payload (shared with the GPU codec)."""
        header = wire.FrameHeader(
            seq=seq, first_id=first_id, shape=tuple(int(d) for d in shape), bits=bits, range_kind=kind,
            stage=self.stage if stage is None else stage, boundary=boundary, method=method, table_digest=digest,
            lo=lo, hi=hi, payload_len=payload.size, flags=wire.FLAG_PAYLOAD_CRC if payload_crc else 0,
        )
        frames = [wire.pack_header(header), payload]
        if payload_crc:
            frames.append(wire.payload_crc(payload))
        return frames

    # ------------------------------------------------------------------------------------ decode
    def check(self, frames, *, max_payload: int | None = None) -> CheckedFrame:
        """Validate a data message completely, without decoding it. Raises :class:`FrameError`.

        A frame that passes cannot fail to decode for a reason a resend could fix, so a receiver may
        acknowledge it before the (costlier) decode. Safe to call from a thread other than the owner's.
        """
        header, payload = wire.check_message(frames, max_payload=self.max_payload if max_payload is None else max_payload)
        data = np.frombuffer(payload, dtype=np.uint8)
        if header.range_kind != wire.RangeKind.TABLE:
            return CheckedFrame(header, data)
        if self.table is None:
            raise FrameError("frame references a clip table but this receiver has none loaded", "table")
        if header.table_digest != self.digest:
            raise FrameError(
                f"frame references clip table {header.table_digest:08x}, this receiver holds {self.digest:08x}: "
                "give every stage the same table", "table",
            )
        try:
            prepared, rotation = self._entry(header.boundary, header.method, header.bits)
        except KeyError:
            raise FrameError(f"clip table has no entry for boundary {header.boundary}, method {header.method}, "
                             f"{header.bits} bits", "table") from None
        if prepared.channels and prepared.channels != header.shape[-1]:
            raise FrameError(f"clip table has {prepared.channels} channels, frame has {header.shape[-1]}",
                             "inconsistent")
        if rotation is not None and rotation.channels != header.shape[-1]:
            raise FrameError(f"clip table rotation has {rotation.channels} channels, frame has "
                             f"{header.shape[-1]}", "inconsistent")
        return CheckedFrame(header, data, prepared, rotation)

    def decode(self, checked: CheckedFrame, out: np.ndarray | None = None) -> np.ndarray:
        """The float32 tensor of a checked frame.

        32-bit frames come back as a read-only view of the received buffer (no copy; it keeps the frame
        alive); quantized ones are decoded into ``out``, a pooled buffer, or (``reuse_buffers=False``) a
        fresh array.
        """
        h = checked.header
        if h.range_kind == wire.RangeKind.NONE:
            x = checked.payload.view(np.float32).reshape(h.shape)  # keeps the received frame alive
            if out is None:
                return x
            np.copyto(out.reshape(h.shape), x)
            return out.reshape(h.shape)
        if out is None:
            out = self._buffer(h.shape, np.float32)
        out = out.reshape(h.shape)
        if h.range_kind == wire.RangeKind.INLINE:
            return codec.decode(checked.payload, h.shape, h.bits, h.lo, h.hi, out=out)
        if checked.rotation is None:
            return checked.prepared.decode(checked.payload, out)
        tmp = self._scratch_for(h.shape)
        checked.prepared.decode(checked.payload, tmp)
        return checked.rotation.invert(tmp, out)


_SHARED: "weakref.WeakKeyDictionary[Any, BoundaryCodec]" = weakref.WeakKeyDictionary()
_NO_TABLE = BoundaryCodec(None, reuse_buffers=False)


def codec_for(table: Any) -> BoundaryCodec:
    """A shared codec that returns fresh arrays for ``table`` (None: no table), prepared on first use.

    For tools and tests that encode or decode the odd frame (:func:`quantpipe.wire.encode_frame`);
    daemons build their own :class:`BoundaryCodec` per link.
    """
    if table is None:
        return _NO_TABLE
    try:
        found = _SHARED.get(table)
    except TypeError:  # not weak-referenceable: prepare anew
        return BoundaryCodec(table, reuse_buffers=False)
    if found is None:
        found = _SHARED[table] = BoundaryCodec(table, reuse_buffers=False)
    return found
