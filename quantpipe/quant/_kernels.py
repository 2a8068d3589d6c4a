"""Fused single-pass codec kernels, compiled with numba: the fast path behind :mod:`quantpipe.quant.codec`.

encode = clip + quantize + pack, decode = unpack + dequantize, in one pass over the tensor, producing
exactly the bytes of ``packing.pack(primitives.quantize(...))`` and exactly the floats of
``primitives.dequantize(packing.unpack(...))`` (the tests compare them on random data for every
bitwidth, per tensor and per channel).

How it stays fast and exact:

* The flat tensor is processed in *rows* of ``P`` values, ``P`` a multiple of 8 (so every row starts on a
  byte boundary of the bitstream, whatever the bitwidth) and of the channel count ``C`` (so channel
  ``j % C`` of a row's value ``j`` is the same in every row). The per-channel ranges are tiled to ``P``
  once per call (:func:`row_period`, done by the caller), so the inner loops are plain, branch-free
  loops over contiguous arrays that LLVM vectorizes.
* A row is quantized into a small code buffer that stays in L1, then packed: the buffer is read as
  little-endian words of 2, 4 or 8 codes, each squeezed into 1 byte (1, 2, 4 bits) or 3 bytes (3, 6
  bits) with a few shifts and masks, which LLVM vectorizes; 5 and 7 bits go through one 64-bit word per
  8 codes; at 8 and 16 bits the codes are the stream. The last, partial row goes through the same loops,
  its final group of 8 padded with code 0, into a scratch row of which only the bytes the stream needs
  are copied out. Decode mirrors all of this.
* float32 arithmetic in the reference's order. ``fastmath`` stays off: contracting ``q * s + lo`` into
  an FMA, or reassociating, would change results in the last bit.
* Quantization is rewritten branch-free but provably equal to the reference
  ``min(floor((clip(x, lo, hi) - lo) * inv + 0.5), L)``: with ``t = (x - lo) * inv + 0.5`` the code is
  ``trunc(min(max(t, 0), L))`` where ``max`` maps NaN to 0. The upper clip to ``hi`` is not needed
  because rounding is monotone and ``(hi - lo) * inv >= L - 1/2`` in float32, so every ``x >= hi``
  already reaches ``L``; values below ``lo`` give ``t < 1/2`` and code 0; NaN input (and the NaN of
  ``0 * inf`` that the reference maps to 0) gives code 0. NaNs are counted in the same pass.

Every function is compiled with ``cache=True`` (a restarted daemon loads machine code from
``__pycache__`` instead of recompiling) and ``nogil=True`` (a daemon may encode while another thread
receives). Only little-endian hosts are supported (x86-64, aarch64); :mod:`quantpipe.quant.codec`
falls back to the numpy reference elsewhere.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["row_period", "encode_into", "decode_into", "warmup", "readonly"]

# No fastmath (see the module docstring); boundscheck off is numba's default, stated to be explicit.
_JIT = {"cache": True, "nogil": True, "boundscheck": False, "error_model": "numpy"}

#: Rows hold about this many values: large enough that per-row overhead vanishes, small enough that the
#: tiled ranges (2 x 4 bytes per value) and the code buffer stay in L1/L2.
_TARGET_ROW = 2048


def row_period(channels: int) -> int:
    """Row length for a tensor with ``channels`` values per range period (1 for a per-tensor range).

    A multiple of 8 and of ``channels``, at least about :data:`_TARGET_ROW` values.
    """
    if channels < 1:
        raise ValueError(f"row_period needs at least one channel, got {channels}")
    base = channels * 8 // math.gcd(channels, 8)
    return base * max(1, -(-_TARGET_ROW // base))


# --------------------------------------------------------------------------------------------- encode


@njit(**_JIT)
def _quantize_row(x, m, lo, inv, n_levels, codes):
    """Codes of ``x[:m]`` (ranges ``lo``/``inv`` already tiled to the row) into ``codes[:m]``.

    Returns the number of NaNs in the row. The loop only ORs a NaN flag (a 64-bit counter in the loop
    would halve its vector width); a flagged row, which is about to be refused anyway, is counted again
    while it is still in L1.
    """
    zero = np.float32(0.0)
    half = np.float32(0.5)
    top = np.float32(n_levels)
    seen_nan = False
    for j in range(m):
        v = x[j]
        seen_nan |= v != v
        t = (v - lo[j]) * inv[j] + half
        t = t if t > zero else zero  # also NaN -> 0
        t = t if t < top else top
        codes[j] = t  # t is in [0, L]: truncation is floor
    if not seen_nan:
        return 0
    nans = 0
    for j in range(m):
        nans += np.isnan(x[j])
    return nans


@njit(**_JIT)
def _pack_groups(codes, k, bits, out):
    """Pack ``codes[:k]`` (``k`` a multiple of 8, codes < 2**bits) into ``out[: k*bits//8]``.

    ``codes`` (a multiple of 8 long) is read as little-endian words of 2, 4 or 8 codes so that each
    output byte comes from one contiguous load and a few shifts, which vectorizes; reading code ``j``
    as byte ``j`` of a word is where little-endianness is assumed.
    """
    if bits == 1:
        w64 = codes.view(np.uint64)
        for g in range(k >> 3):
            x = w64[g] & np.uint64(0x0101010101010101)  # bit 0 of each code at bits 0, 8, ..., 56
            x |= x >> np.uint64(7)
            x |= x >> np.uint64(14)
            x |= x >> np.uint64(28)
            out[g] = np.uint8(x & np.uint64(0xFF))
    elif bits == 2:
        w32 = codes.view(np.uint32)
        for g in range(k >> 2):
            u = w32[g]
            out[g] = np.uint8((u & np.uint32(0x03)) | ((u >> np.uint32(6)) & np.uint32(0x0C))
                                  | ((u >> np.uint32(12)) & np.uint32(0x30)) | ((u >> np.uint32(18)) & np.uint32(0xC0)))
    elif bits == 4:
        w16 = codes.view(np.uint16)
        for g in range(k >> 1):
            u = w16[g]
            out[g] = np.uint8((u & np.uint16(0x0F)) | ((u >> np.uint16(4)) & np.uint16(0xF0)))
    elif bits == 8:
        for g in range(k):
            out[g] = codes[g]
    elif bits == 3:
        # 8 codes -> 24 bits -> 3 bytes
        w64 = codes.view(np.uint64)
        for g in range(k >> 3):
            u = w64[g]
            w = np.uint64(0)
            for j in range(8):
                w |= ((u >> np.uint64(8 * j)) & np.uint64(7)) << np.uint64(3 * j)
            out[3 * g] = np.uint8(w & np.uint64(0xFF))
            out[3 * g + 1] = np.uint8((w >> np.uint64(8)) & np.uint64(0xFF))
            out[3 * g + 2] = np.uint8((w >> np.uint64(16)) & np.uint64(0xFF))
    elif bits == 6:
        # 4 codes -> 24 bits -> 3 bytes
        w32 = codes.view(np.uint32)
        for g in range(k >> 2):
            u = w32[g]
            w = ((u & np.uint32(0x3F)) | ((u >> np.uint32(2)) & np.uint32(0xFC0))
                 | ((u >> np.uint32(4)) & np.uint32(0x3F000)) | ((u >> np.uint32(6)) & np.uint32(0xFC0000)))
            out[3 * g] = np.uint8(w & np.uint32(0xFF))
            out[3 * g + 1] = np.uint8((w >> np.uint32(8)) & np.uint32(0xFF))
            out[3 * g + 2] = np.uint8(w >> np.uint32(16))
    # 5 and 7 bits: one call site per width so that LLVM, inlining, sees `bits` as a constant and
    # unrolls the byte loops.
    elif bits == 5:
        _pack_octets(codes, k, 5, out)
    else:
        _pack_octets(codes, k, 7, out)


@njit(**_JIT)
def _pack_octets(codes, k, bits, out):
    """Pack groups of 8 codes into ``bits`` bytes each, through one 64-bit word per group."""
    w64 = codes.view(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for g in range(k >> 3):
        u = w64[g]
        w = np.uint64(0)
        for j in range(8):
            w |= ((u >> np.uint64(8 * j)) & mask) << np.uint64(j * bits)
        dst = out[g * bits:]
        for i in range(bits):
            dst[i] = np.uint8((w >> np.uint64(8 * i)) & np.uint64(0xFF))


@njit(**_JIT)
def _encode_narrow(x, lo, inv, bits, out):
    """Encode at 1..8 bits (see :func:`encode_into`).

    Each helper has a single call site (compile time grows with every inlined copy of a vectorized
    loop): the last, partial row is packed into a zeroed scratch row, its final group of 8 padded with
    code 0, and only the bytes the stream needs are copied out.
    """
    n = x.size
    p = lo.size
    n_levels = (1 << bits) - 1
    row_bytes = p * bits // 8
    codes = np.zeros(p, dtype=np.uint8)
    tail = np.zeros(row_bytes, dtype=np.uint8)
    nans = 0
    for r in range((n + p - 1) // p):
        start = r * p
        m = min(p, n - start)
        partial = m < p
        if partial:
            codes[:] = 0
        # 8-bit codes are the stream itself: quantize straight into the payload.
        target = out[start:] if bits == 8 else codes
        nans += _quantize_row(x[start:], m, lo, inv, n_levels, target)
        if bits != 8:
            o = r * row_bytes
            dst = tail if partial else out[o:]
            _pack_groups(codes, (m + 7) & ~7, bits, dst)
            if partial:
                used = (m * bits + 7) // 8
                out[o:o + used] = tail[:used]
    return nans


@njit(**_JIT)
def _encode_wide(x, lo, inv, out):
    """Encode at 16 bits: little-endian uint16 codes, written byte by byte (``out`` may be unaligned)."""
    n = x.size
    p = lo.size
    codes = np.empty(p, dtype=np.uint16)
    nans = 0
    for r in range((n + p - 1) // p):
        start = r * p
        m = min(p, n - start)
        nans += _quantize_row(x[start:], m, lo, inv, 65535, codes)
        dst = out[2 * start:]
        for j in range(m):
            dst[2 * j] = np.uint8(codes[j] & np.uint16(0xFF))
            dst[2 * j + 1] = np.uint8(codes[j] >> np.uint16(8))
    return nans


@njit(**_JIT)
def _encode_wide_aligned(x, lo, inv, out16):
    """Encode at 16 bits into a 2-byte-aligned stream viewed as uint16 (little-endian hosts only)."""
    n = x.size
    p = lo.size
    nans = 0
    for r in range((n + p - 1) // p):
        start = r * p
        nans += _quantize_row(x[start:], min(p, n - start), lo, inv, 65535, out16[start:])
    return nans


def encode_into(x: np.ndarray, lo: np.ndarray, inv: np.ndarray, bits: int, out: np.ndarray) -> int:
    """Quantize and pack a flat float32 tensor into ``out``; return how many NaNs it held.

    Args:
        x: 1-D C-contiguous float32 values.
        lo, inv: float32 arrays of length :func:`row_period` (C), the per-channel range start and inverse
            step ``L / (hi - lo)`` (0 for an empty range) tiled to that length (a per-tensor range is
            a constant array).
        bits: 1..8 or 16 (validated by the caller).
        out: uint8 array of exactly ``ceil(x.size * bits / 8)`` bytes.
    """
    _check_arrays(x, lo, inv, bits, out)
    x, lo, inv = readonly(x), readonly(lo), readonly(inv)
    if bits == 16:
        if out.ctypes.data % 2 == 0:  # the stream is the little-endian uint16 codes themselves
            return int(_encode_wide_aligned(x, lo, inv, out.view(np.uint16)))
        return int(_encode_wide(x, lo, inv, out))
    return int(_encode_narrow(x, lo, inv, bits, out))


# --------------------------------------------------------------------------------------------- decode


@njit(**_JIT)
def _dequantize_row(codes, m, step, lo, y):
    """``y[:m] = codes[:m] * step + lo`` in float32, two roundings (no FMA)."""
    for j in range(m):
        y[j] = np.float32(codes[j]) * step[j] + lo[j]


@njit(**_JIT)
def _unpack_groups(buf, k, bits, codes):
    """Unpack ``k`` codes (a multiple of 8) from ``buf[: k*bits//8]`` into ``codes[:k]``.

    The mirror of :func:`_pack_groups`: each input byte is spread into a word of 2, 4 or 8 codes.
    """
    if bits == 1:
        w64 = codes.view(np.uint64)
        for g in range(k >> 3):
            x = np.uint64(buf[g])
            x = (x | (x << np.uint64(28))) & np.uint64(0x0000000F0000000F)
            x = (x | (x << np.uint64(14))) & np.uint64(0x0003000300030003)
            x = (x | (x << np.uint64(7))) & np.uint64(0x0101010101010101)
            w64[g] = x
    elif bits == 2:
        w32 = codes.view(np.uint32)
        for g in range(k >> 2):
            x = np.uint32(buf[g])
            w32[g] = ((x & np.uint32(0x03)) | ((x & np.uint32(0x0C)) << np.uint32(6))
                      | ((x & np.uint32(0x30)) << np.uint32(12)) | ((x & np.uint32(0xC0)) << np.uint32(18)))
    elif bits == 4:
        w16 = codes.view(np.uint16)
        for g in range(k >> 1):
            x = np.uint16(buf[g])
            w16[g] = (x & np.uint16(0x0F)) | ((x & np.uint16(0xF0)) << np.uint16(4))
    elif bits == 8:
        for g in range(k):
            codes[g] = buf[g]
    elif bits == 3:
        w64 = codes.view(np.uint64)
        for g in range(k >> 3):
            w = (np.uint64(buf[3 * g]) | (np.uint64(buf[3 * g + 1]) << np.uint64(8))
                 | (np.uint64(buf[3 * g + 2]) << np.uint64(16)))
            x = np.uint64(0)
            for j in range(8):
                x |= ((w >> np.uint64(3 * j)) & np.uint64(7)) << np.uint64(8 * j)
            w64[g] = x
    elif bits == 6:
        w32 = codes.view(np.uint32)
        for g in range(k >> 2):
            w = (np.uint32(buf[3 * g]) | (np.uint32(buf[3 * g + 1]) << np.uint32(8))
                 | (np.uint32(buf[3 * g + 2]) << np.uint32(16)))
            w32[g] = ((w & np.uint32(0x3F)) | ((w << np.uint32(2)) & np.uint32(0x3F00))
                      | ((w << np.uint32(4)) & np.uint32(0x3F0000)) | ((w << np.uint32(6)) & np.uint32(0x3F000000)))
    elif bits == 5:
        _unpack_octets(buf, k, 5, codes)
    else:
        _unpack_octets(buf, k, 7, codes)


@njit(**_JIT)
def _unpack_octets(buf, k, bits, codes):
    """Unpack groups of ``bits`` bytes into 8 codes each, through one 64-bit word per group."""
    w64 = codes.view(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for g in range(k >> 3):
        src = buf[g * bits:]
        w = np.uint64(0)
        for i in range(bits):
            w |= np.uint64(src[i]) << np.uint64(8 * i)
        x = np.uint64(0)
        for j in range(8):
            x |= ((w >> np.uint64(j * bits)) & mask) << np.uint64(8 * j)
        w64[g] = x


@njit(**_JIT)
def _decode_narrow(buf, step, lo, bits, y):
    """Decode 1..8-bit codes (see :func:`decode_into`).

    The mirror of :func:`_encode_narrow`: the last, partial row's bytes are copied into a zeroed
    scratch row first, so that unpacking whole groups of 8 never reads past the payload.
    """
    n = y.size
    p = lo.size
    row_bytes = p * bits // 8
    codes = np.empty(p, dtype=np.uint8)
    tail = np.zeros(row_bytes, dtype=np.uint8)
    for r in range((n + p - 1) // p):
        start = r * p
        m = min(p, n - start)
        o = r * row_bytes
        if bits == 8:
            source = buf[start:]
        else:
            src = buf[o:]
            if m < p:
                used = (m * bits + 7) // 8
                tail[:used] = buf[o:o + used]
                src = tail
            _unpack_groups(src, (m + 7) & ~7, bits, codes)
            source = codes
        _dequantize_row(source, m, step, lo, y[start:])


@njit(**_JIT)
def _decode_wide(buf, step, lo, y):
    """Decode little-endian 16-bit codes, read byte by byte (``buf`` may be unaligned)."""
    n = y.size
    p = lo.size
    codes = np.empty(p, dtype=np.uint16)
    for r in range((n + p - 1) // p):
        start = r * p
        m = min(p, n - start)
        src = buf[2 * start:]
        for j in range(m):
            codes[j] = np.uint16(src[2 * j]) | (np.uint16(src[2 * j + 1]) << np.uint16(8))
        _dequantize_row(codes, m, step, lo, y[start:])


@njit(**_JIT)
def _decode_wide_aligned(buf16, step, lo, y):
    """Decode 16-bit codes from a 2-byte-aligned stream viewed as uint16 (little-endian hosts only)."""
    n = y.size
    p = lo.size
    for r in range((n + p - 1) // p):
        start = r * p
        _dequantize_row(buf16[start:], min(p, n - start), step, lo, y[start:])


def decode_into(buf: np.ndarray, step: np.ndarray, lo: np.ndarray, bits: int, y: np.ndarray) -> None:
    """Unpack and dequantize a payload into the flat float32 array ``y``.

    Args:
        buf: uint8 payload of exactly ``ceil(y.size * bits / 8)`` bytes.
        step, lo: float32 step ``(hi - lo) / L`` and range start, tiled to :func:`row_period` (C).
        bits: 1..8 or 16 (validated by the caller).
        y: 1-D C-contiguous float32 output.
    """
    _check_arrays(y, lo, step, bits, buf)
    buf, step, lo = readonly(buf), readonly(step), readonly(lo)
    if bits == 16:
        if buf.ctypes.data % 2 == 0:
            _decode_wide_aligned(readonly(buf.view(np.uint16)), step, lo, y)
        else:
            _decode_wide(buf, step, lo, y)
    else:
        _decode_narrow(buf, step, lo, bits, y)


def _check_arrays(values: np.ndarray, lo: np.ndarray, table: np.ndarray, bits: int, stream: np.ndarray) -> None:
    """Refuse arrays the kernels would overrun (they run without bounds checks) or recompile for."""
    ok = (
        values.dtype == np.float32 and values.ndim == 1 and values.flags.c_contiguous
        and stream.dtype == np.uint8 and stream.ndim == 1 and stream.flags.c_contiguous
        and stream.size == (values.size * bits + 7) // 8
        and lo.dtype == table.dtype == np.float32 and lo.shape == table.shape and lo.ndim == 1
        and lo.size % 8 == 0 and lo.size > 0
    )
    if not ok or bits not in (1, 2, 3, 4, 5, 6, 7, 8, 16):
        raise ValueError(
            "codec kernel arguments do not fit: flat float32 values, a uint8 stream of ceil(n * bits / 8) "
            "bytes and two float32 range tables of row_period(C) values (use quantpipe.quant.codec)"
        )


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a``.

    numba compiles one specialization per argument type, and writability is part of the type. Inputs
    arrive both writable (a tensor from an engine) and read-only (a payload received from ZeroMQ), so
    the entry points always see read-only inputs: one compilation instead of two.
    """
    if not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


def warmup() -> None:
    """Compile (or load from the on-disk cache) every specialization the codec uses.

    All bitwidths share the same few machine-code specializations (the bitwidth is a runtime argument
    that selects a loop per row), so a tiny tensor per path compiles everything.
    """
    p = row_period(1)
    lo = np.zeros(p, dtype=np.float32)
    ones = np.ones(p, dtype=np.float32)
    x = np.linspace(-1, 2, 13, dtype=np.float32)
    for bits in (1, 2, 3, 8, 16):
        out = np.empty((x.size * bits + 7) // 8, dtype=np.uint8)
        encode_into(x, lo, ones, bits, out)
        decode_into(out, ones, lo, bits, np.empty_like(x))
    unaligned = np.empty(2 * x.size + 1, dtype=np.uint8)[1:]  # the byte-wise 16-bit paths
    encode_into(x, lo, ones, 16, unaligned)
    decode_into(unaligned, ones, lo, 16, np.empty_like(x))
    wht_rows(np.zeros(64, dtype=np.float32), 32, 2, 16, 1)
    for q, h16 in H16.items():
        h16(np.zeros(16 * q, dtype=np.float32))
    signs = readonly(np.ones(4, dtype=np.float32))
    mul_rows(readonly(np.zeros(8, dtype=np.float32)), signs, np.empty(8, dtype=np.float32))
    mul_rows_inplace(np.zeros(8, dtype=np.float32), signs)


# ------------------------------------------------------------------------------------------- rotation


@njit(**_JIT)
def _butterfly(top, bottom, n):
    for i in range(n):
        u = top[i]
        w = bottom[i]
        top[i] = u + w
        bottom[i] = u - w


@njit(**_JIT)
def wht_rows(a, channels, groups, q, first=1):
    """In place, per row of ``channels`` values: the Walsh-Hadamard butterfly over ``groups`` blocks of
    ``q`` contiguous values (``channels = groups * q``, ``groups`` a power of two), stages ``first``,
    ``2 * first``, ... (``first = 16`` after :data:`H16` did the four stages below).

    Unnormalized (``H H^T = groups * I``); :class:`quantpipe.quant.rotation.Rotation` folds the scale
    into its sign vector. Slices keep every index non-negative, so the inner loop vectorizes; that is
    fast for the long spans of the later stages, and slow for spans of 12-96 values, where each
    stage costs more in slicing than in arithmetic: :data:`H16` does those.
    """
    for r in range(a.size // channels):
        row = a[r * channels:(r + 1) * channels]
        h = first
        while h < groups:
            span = h * q
            for start in range(0, channels, 2 * span):
                block = row[start:start + 2 * span]
                _butterfly(block[:span], block[span:], span)
            h *= 2


@njit(**_JIT)
def mul_rows(x, signs, out):
    """``out = x * signs`` per row of ``signs.size`` values (flat C-contiguous arrays, ``out`` not ``x``): the
    rotation's sign multiply, twice numpy's broadcast multiply on a [32, 197, 192] microbatch."""
    c = signs.size
    for r in range(x.size // c):
        o = r * c
        for j in range(c):
            out[o + j] = x[o + j] * signs[j]


@njit(**_JIT)
def mul_rows_inplace(a, signs):
    """``a *= signs`` per row of ``signs.size`` values (the inverse rotation's last step)."""
    c = signs.size
    for r in range(a.size // c):
        o = r * c
        for j in range(c):
            a[o + j] *= signs[j]


#: Block sizes ``q`` of :data:`H16`: the Paley bases 12 and 20, and 16 (a power of two folds its first
#: four stages into a 16 x 16 base, see :class:`quantpipe.quant.rotation.Rotation`).
H16_Q = (12, 16, 20)


def _make_h16(q: int):
    """In place, the first four butterfly stages (groups ``g`` and ``g + 1, 2, 4, 8``) of every block
    of 16 groups of ``q`` values, the 16 values of a lane in registers.

    ``q`` is a compile-time constant (one function per ``q``), so every offset ``k * q`` is too, and the
    kernel touches one array only: LLVM then vectorizes the loop over the ``q`` lanes of a block with no
    runtime alias checks. With ``q`` a runtime argument, or a second array (an input, a sign vector),
    the same loop stays scalar; the slicing of :func:`wht_rows` costs 27x this on a [32, 197, 192]
    microbatch. The arithmetic is :func:`wht_rows`'s butterfly in its order, so the results are bit for
    bit the same.
    """
    n = 16 * q

    def h16(t):
        for blk in range(t.size // n):
            a0 = blk * n
            for a in range(a0, a0 + q):
                v0 = t[a]; v1 = t[a + q]; v2 = t[a + 2 * q]; v3 = t[a + 3 * q]  # noqa: E702
                v4 = t[a + 4 * q]; v5 = t[a + 5 * q]; v6 = t[a + 6 * q]; v7 = t[a + 7 * q]  # noqa: E702
                v8 = t[a + 8 * q]; v9 = t[a + 9 * q]; v10 = t[a + 10 * q]; v11 = t[a + 11 * q]  # noqa: E702
                v12 = t[a + 12 * q]; v13 = t[a + 13 * q]; v14 = t[a + 14 * q]; v15 = t[a + 15 * q]  # noqa: E702
                # groups g, g + 1
                v0, v1, v2, v3 = v0 + v1, v0 - v1, v2 + v3, v2 - v3
                v4, v5, v6, v7 = v4 + v5, v4 - v5, v6 + v7, v6 - v7
                v8, v9, v10, v11 = v8 + v9, v8 - v9, v10 + v11, v10 - v11
                v12, v13, v14, v15 = v12 + v13, v12 - v13, v14 + v15, v14 - v15
                # g, g + 2
                v0, v2, v1, v3 = v0 + v2, v0 - v2, v1 + v3, v1 - v3
                v4, v6, v5, v7 = v4 + v6, v4 - v6, v5 + v7, v5 - v7
                v8, v10, v9, v11 = v8 + v10, v8 - v10, v9 + v11, v9 - v11
                v12, v14, v13, v15 = v12 + v14, v12 - v14, v13 + v15, v13 - v15
                # g, g + 4
                v0, v4, v1, v5 = v0 + v4, v0 - v4, v1 + v5, v1 - v5
                v2, v6, v3, v7 = v2 + v6, v2 - v6, v3 + v7, v3 - v7
                v8, v12, v9, v13 = v8 + v12, v8 - v12, v9 + v13, v9 - v13
                v10, v14, v11, v15 = v10 + v14, v10 - v14, v11 + v15, v11 - v15
                # g, g + 8
                t[a] = v0 + v8; t[a + 8 * q] = v0 - v8  # noqa: E702
                t[a + q] = v1 + v9; t[a + 9 * q] = v1 - v9  # noqa: E702
                t[a + 2 * q] = v2 + v10; t[a + 10 * q] = v2 - v10  # noqa: E702
                t[a + 3 * q] = v3 + v11; t[a + 11 * q] = v3 - v11  # noqa: E702
                t[a + 4 * q] = v4 + v12; t[a + 12 * q] = v4 - v12  # noqa: E702
                t[a + 5 * q] = v5 + v13; t[a + 13 * q] = v5 - v13  # noqa: E702
                t[a + 6 * q] = v6 + v14; t[a + 14 * q] = v6 - v14  # noqa: E702
                t[a + 7 * q] = v7 + v15; t[a + 15 * q] = v7 - v15  # noqa: E702

    h16.__name__ = h16.__qualname__ = f"h16_q{q}"  # one on-disk cache entry per q
    return njit(**_JIT)(h16)


#: ``H16[q](t)``: :func:`_make_h16`'s kernel for each ``q`` of :data:`H16_Q`.
H16 = {q: _make_h16(q) for q in H16_Q}
