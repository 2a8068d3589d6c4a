""":class:`GpuBoundaryCodec`: the per-link codec of :mod:`quantpipe.quant.linkcodec` on a CUDA device.

``encode`` takes the engine's output in device memory (a CuPy array, or anything with
``__cuda_array_interface__``), rotates, clips, quantizes and packs it there, and copies only the packed
payload into a pinned host buffer (the frame's payload, sent by pyzmq without another copy).
``decode`` copies a received payload to the device and unpacks, dequantizes and inverse-rotates it into
a device array: the next engine's input binding. Frames, validation (:meth:`check`, inherited) and the
bitstream are the CPU codec's, so either end may be a CPU.

Everything a frame needs is prepared once per link: the float32 ranges of every (boundary, method,
bitwidth) of the table as device arrays, each rotation in its device form (the fused Walsh-Hadamard
kernels for randomized Hadamard rotations with at most 32 butterfly groups, a cuBLAS product for any
other orthogonal matrix), and pools of device and pinned buffers that are reused once nothing else holds
them (a payload still queued in libzmq or kept in custody holds its buffer).
"""

from __future__ import annotations

import os

import sys
from typing import Any

import numpy as np

from quantpipe import wire
from quantpipe.quant import codec
from quantpipe.quant.codec import NonFiniteInputError
from quantpipe.quant.gpu import _cuda, is_device_array
from quantpipe.quant.linkcodec import BoundaryCodec, CheckedFrame
from quantpipe.quant.primitives import (
    WIRE_BITS,
    QuantizationInputError,
    as_range,
    check_bits,
    range_for_shape,
    step_and_inverse,
)
from quantpipe.quant.rotation import Rotation

__all__ = ["GpuBoundaryCodec"]

_POOL_DEPTH = 16
_H2D, _D2H = 1, 2  # cudaMemcpyKind
_STAGE_MIN_BYTES = 256 * 1024  # smaller payloads are copied from pageable memory directly


class _Pool:
    """Buffers reused once only the pool refers to them (the refcount rule of linkcodec.BufferPool)."""

    def __init__(self, alloc) -> None:  # noqa: ANN001
        self._alloc = alloc
        self._kept: dict[Any, list] = {}

    def get(self, key: Any):  # noqa: ANN201
        kept = self._kept.setdefault(key, [])
        for buf in kept:
            if sys.getrefcount(buf) <= 3:  # the list, the loop variable and getrefcount's argument
                return buf
        buf = self._alloc(key)
        if len(kept) < _POOL_DEPTH:
            kept.append(buf)
        return buf


class _DenseRotation:
    """Any orthogonal matrix, applied as one cuBLAS float32 product."""

    def __init__(self, cp, matrix: np.ndarray) -> None:  # noqa: ANN001
        self.channels = int(matrix.shape[0])
        self.matrix = cp.asarray(np.ascontiguousarray(matrix, dtype=np.float32))
        self.matrix_t = cp.ascontiguousarray(self.matrix.T)


class GpuBoundaryCodec(BoundaryCodec):
    """:class:`~quantpipe.quant.linkcodec.BoundaryCodec` whose tensors live on the current CUDA device.

    Same arguments as the CPU codec. ``encode`` of a device array returns ``[header, payload]`` with the
    payload in pinned host memory (the same bytes the CPU codec produces); ``encode`` of a numpy array
    is the CPU codec's. ``decode`` returns a CuPy array (``out``, if given, must be a CuPy float32 array
    of the frame's size); all work is queued on CuPy's current stream, and ``encode`` returns once the
    payload is on the host.
    """

    def __init__(self, table: Any = None, boundary: int = 0, method: int = 0, *, stage: int = wire.SOURCE_STAGE,
                 max_payload: int = wire.DEFAULT_MAX_PAYLOAD, reuse_buffers: bool = True) -> None:
        import cupy as cp

        self._cp = cp
        self._dev_ranges: dict[tuple[int, int, int], tuple] = {}
        self._dev_rotations: dict[int, Any] = {}
        self._reuse = reuse_buffers
        self._device_pool = _Pool(lambda key: cp.empty(key[0], dtype=key[1]))
        self._host_pool = _Pool(self._pinned)
        self._staging: dict[int, tuple[np.ndarray, Any]] = {}
        self._nan = cp.zeros(1, dtype=np.uint32)
        self._nan_host = self._pinned(4).view(np.uint32)
        self.device_id = int(cp.cuda.Device().id)
        super().__init__(table, boundary, method, stage=stage, max_payload=max_payload, reuse_buffers=reuse_buffers)

    # ------------------------------------------------------------------------------ preparation
    def _pinned(self, nbytes: int) -> np.ndarray:
        mem = self._cp.cuda.alloc_pinned_memory(max(int(nbytes), 1))
        return np.frombuffer(mem, dtype=np.uint8, count=int(nbytes))

    def _entry(self, b: int, m: int, bits: int):  # noqa: ANN202
        prepared, rotation = super()._entry(b, m, bits)
        if (b, m, bits) not in self._dev_ranges:
            self._dev_ranges[(b, m, bits)] = self._device_range(prepared.lo, prepared.hi, bits)
        if rotation is not None and id(rotation) not in self._dev_rotations:
            self._dev_rotations[id(rotation)] = self._device_rotation(rotation)
        return prepared, rotation

    def _device_range(self, lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple:
        """(lo, inv, step) as flat float32 device arrays of 1 (per tensor) or C (per channel) values."""
        cp = self._cp
        step, inv = step_and_inverse(lo, hi, bits)
        flat = [np.ascontiguousarray(np.reshape(a, -1), dtype=np.float32) for a in (lo, inv, step)]
        return tuple(cp.asarray(a) for a in flat)

    def _device_rotation(self, rotation: Rotation) -> Any:
        groups = int(getattr(rotation, "groups", 1))
        q = int(getattr(rotation, "_q", 0) or 0)
        signs = getattr(rotation, "_scaled_signs", None)
        # QUANTPIPE_GPU_ROTATION: "auto" (default), "warp" or "tiled" (A/B benchmarks). Measured on an H200
        # (BENCHMARKS.md section 8): the tiled kernels encode and decode faster at every shape measured
        # since the encoder's base pass works on (unit, part) items; the warp kernels remain for widths the
        # tiled ones do not support (their tile must fit in shared memory).
        if rotation.fast and signs is not None and q:
            base = getattr(rotation, "_base", None)
            base = np.ones((1, 1), np.float32) if base is None else base
            bits = tuple(b for b in (self.table.bits if self.table is not None else ()) if b != 32)
            mode = os.environ.get("QUANTPIPE_GPU_ROTATION", "auto")
            tiled = (_cuda.TiledRotation(rotation.channels, groups, q, signs, base)
                     if mode != "warp" and _cuda.TiledRotation.supports(rotation.channels, groups, q) else None)
            warp = (_cuda.FastRotation(rotation.channels, groups, q, signs, base)
                    if tiled is None and mode != "tiled" and _cuda.FastRotation.supports(rotation.channels, groups, q)
                    else None)
            kernels = tiled if tiled is not None else warp
            if kernels is not None:
                kernels.warmup(bits)
                return kernels
        return _DenseRotation(self._cp, rotation.matrix)

    # ------------------------------------------------------------------------------ buffers
    def _device(self, shape: tuple[int, ...], dtype: Any):  # noqa: ANN202
        if not self._reuse:
            return self._cp.empty(shape, dtype=dtype)
        return self._device_pool.get((tuple(shape), np.dtype(dtype).str))

    def _host(self, nbytes: int) -> np.ndarray:
        return self._host_pool.get(int(nbytes)) if self._reuse else self._pinned(nbytes)

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        if nbytes:
            self._cp.cuda.runtime.memcpyAsync(dst, src, nbytes, kind, self._cp.cuda.get_current_stream().ptr)

    def _upload(self, dst_ptr: int, payload: np.ndarray) -> None:
        """Copy a received (pageable) host payload to the device: through a pinned staging buffer, as
        onnxruntime does, which is about twice as fast as a copy from pageable memory for large tensors
        (the first hop's float32 images); the buffer is reused once its previous copy has finished."""
        nbytes = int(payload.nbytes)
        if nbytes < _STAGE_MIN_BYTES:
            self._memcpy(dst_ptr, payload.ctypes.data, nbytes, _H2D)
            return
        entry = self._staging.get(nbytes)
        if entry is None:
            entry = self._staging[nbytes] = (self._pinned(nbytes), self._cp.cuda.Event(block=False, disable_timing=True))
        buf, done = entry
        done.synchronize()
        np.copyto(buf, payload.reshape(-1).view(np.uint8))
        self._memcpy(dst_ptr, buf.ctypes.data, nbytes, _H2D)
        done.record()

    def _as_flat(self, y):  # noqa: ANN001, ANN202
        cp = self._cp
        x = cp.ascontiguousarray(cp.asarray(y), dtype=cp.float32)
        if x.data.ptr % 16:
            x = x.copy()
        return x

    # ------------------------------------------------------------------------------ encode
    def encode(self, y, bits: int, *, seq: int, first_id: int, payload_crc: bool = False,  # noqa: ANN001
               inline_range: tuple[float, float] | None = None, boundary: int | None = None,
               method: int | None = None, stage: int | None = None) -> list:
        """The data message ``[header, payload(, crc)]`` of ``y`` at ``bits``: the CPU codec's bytes.

        ``y`` on the device is encoded there (the payload is a pinned host buffer); a numpy ``y`` goes
        through the CPU codec. Raises like the CPU codec (NaN: :class:`NonFiniteInputError`).
        """
        if not is_device_array(y):
            return super().encode(y, bits, seq=seq, first_id=first_id, payload_crc=payload_crc,
                                  inline_range=inline_range, boundary=boundary, method=method, stage=stage)
        cp = self._cp
        bits = check_bits(bits, WIRE_BITS)
        b = self.boundary if boundary is None else int(boundary)
        m = self.method if method is None else int(method)
        x = self._as_flat(y)
        flat = x.reshape(-1)
        lo = hi = 0.0
        digest = 0
        self._nan.fill(0)
        if bits == 32:
            kind = wire.RangeKind.NONE
            payload = self._host(x.nbytes)
            _cuda.count_nan(flat, self._nan)
            self._memcpy(payload.ctypes.data, flat.data.ptr, x.nbytes, _D2H)
        else:
            nbytes = codec.encoded_nbytes(x.size, bits)
            dev = self._device((nbytes,), np.uint8)
            if self.table is not None and inline_range is None:
                kind, digest = wire.RangeKind.TABLE, self.digest
                self.encode_device(x, bits, dev, boundary=b, method=m)
            else:
                kind = wire.RangeKind.INLINE
                if inline_range is None:
                    inline_range = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
                lo, hi = (float(np.float32(v)) for v in inline_range)
                lo_d, inv_d, _ = self._device_range(*as_range(lo, hi), bits)
                _cuda.encode_plain(flat, bits, lo_d, inv_d, dev, self._nan)
            payload = self._host(nbytes)
            self._memcpy(payload.ctypes.data, dev.data.ptr, nbytes, _D2H)
        self._memcpy(self._nan_host.ctypes.data, self._nan.data.ptr, 4, _D2H)
        cp.cuda.get_current_stream().synchronize()
        nans = int(self._nan_host[0])
        if nans:
            raise NonFiniteInputError(nans)
        return self._message(payload, x.shape, bits, kind, seq=seq, first_id=first_id, stage=stage, boundary=b,
                             method=m, digest=digest, lo=lo, hi=hi, payload_crc=payload_crc)

    def encode_device(self, x, bits: int, out=None, *, boundary: int | None = None,  # noqa: ANN001, ANN201
                      method: int | None = None):
        """Only the device work of a table frame: rotate, clip, quantize and pack float32 device array ``x``
        into device uint8 ``out`` (allocated if None) on the current stream, without waiting. NaNs are
        counted into the codec's counter, which :meth:`encode` checks."""
        cp = self._cp
        b = self.boundary if boundary is None else int(boundary)
        m = self.method if method is None else int(method)
        bits = check_bits(bits)
        x = self._as_flat(x)
        flat = x.reshape(-1)
        if out is None:
            out = self._device((codec.encoded_nbytes(x.size, bits),), np.uint8)
        try:
            prepared, rotation = self._entry(b, m, bits)
        except KeyError as exc:
            raise ValueError(str(exc).strip("'\"")) from None
        if prepared.channels and (not x.ndim or x.shape[-1] != prepared.channels):
            range_for_shape(x.shape, prepared.lo, prepared.hi)  # raises the precise error
        lo_d, inv_d, _ = self._dev_ranges[(b, m, bits)]
        if rotation is None:
            _cuda.encode_plain(flat, bits, lo_d, inv_d, out, self._nan)
            return out
        if not x.ndim or x.shape[-1] != rotation.channels:
            raise QuantizationInputError(
                f"the clip table's rotation has {rotation.channels} channels, the tensor's last axis "
                f"has {x.shape[-1] if x.ndim else 0}")
        rot = self._dev_rotations[id(rotation)]
        if isinstance(rot, _DenseRotation):
            tmp = self._device(x.shape, np.float32)
            cp.matmul(x.reshape(-1, rot.channels), rot.matrix, out=tmp.reshape(-1, rot.channels))
            _cuda.encode_plain(tmp.reshape(-1), bits, lo_d, inv_d, out, self._nan)
        else:
            rot.encode(flat, bits, lo_d, inv_d, out, self._nan)
        return out

    def decode_device(self, payload, shape: tuple[int, ...], bits: int, out=None, *,  # noqa: ANN001, ANN201
                      boundary: int | None = None, method: int | None = None):
        """Only the device work of a table frame: unpack, dequantize and inverse-rotate device uint8
        ``payload`` into float32 device ``out`` (allocated if None) on the current stream, without waiting."""
        cp = self._cp
        b = self.boundary if boundary is None else int(boundary)
        m = self.method if method is None else int(method)
        _, rotation = self._entry(b, m, bits)
        if out is None:
            out = self._device(tuple(shape), np.float32)
        flat = out.reshape(-1)
        lo_d, _, step_d = self._dev_ranges[(b, m, bits)]
        if rotation is None:
            _cuda.decode_plain(payload, bits, step_d, lo_d, flat)
            return out
        rot = self._dev_rotations[id(rotation)]
        if isinstance(rot, _DenseRotation):
            tmp = self._device(tuple(shape), np.float32)
            _cuda.decode_plain(payload, bits, step_d, lo_d, tmp.reshape(-1))
            cp.matmul(tmp.reshape(-1, rot.channels), rot.matrix_t, out=out.reshape(-1, rot.channels))
        else:
            rot.decode(payload, bits, step_d, lo_d, flat)
        return out

    # ------------------------------------------------------------------------------ decode
    def decode(self, checked: CheckedFrame, out=None):  # noqa: ANN001, ANN201
        """The float32 tensor of a checked frame, on the device (``out`` or a pooled device buffer).

        A numpy ``out`` decodes on the CPU (the CPU codec's result)."""
        if out is not None and not is_device_array(out):
            return super().decode(checked, out)
        cp = self._cp
        h = checked.header
        n = int(np.prod(h.shape, dtype=np.int64))
        if out is None:
            out = self._device(h.shape, np.float32)
        else:
            if out.dtype != np.float32 or out.size != n or not out.flags.c_contiguous:
                raise QuantizationInputError(f"out= must be a C-contiguous float32 device array of {n} elements")
            out = out.reshape(h.shape)
        payload = checked.payload
        if h.range_kind == wire.RangeKind.NONE:
            self._upload(out.data.ptr, payload)
            return out
        dev = self._device((payload.size,), np.uint8)
        self._upload(dev.data.ptr, payload)
        flat = out.reshape(-1)
        if h.range_kind == wire.RangeKind.INLINE:
            lo_d, _, step_d = self._device_range(*as_range(h.lo, h.hi), h.bits)
            _cuda.decode_plain(dev, h.bits, step_d, lo_d, flat)
            return out
        return self.decode_device(dev, h.shape, h.bits, out, boundary=h.boundary, method=h.method)

    def synchronize(self) -> None:
        """Wait for the work this codec queued (decode returns before its kernels finish)."""
        self._cp.cuda.get_current_stream().synchronize()
