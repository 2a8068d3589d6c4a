"""Bit packing: the one definition of the bitstream (numpy reference).

Codes of ``b`` bits are packed into a contiguous little-endian bitstream, exactly ``b`` bits per
value for every ``b`` in 1..8 (6-bit costs 6 bits, not the 6.4 of packing whole codes into 32-bit
words), and 16-bit codes as little-endian uint16:

* value ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first;
* stream bit ``k`` is bit ``k % 8`` (LSB = 0) of byte ``k // 8``;
* the last byte is padded with zero bits; the stream is ``ceil(n*b / 8)`` bytes.

Worked example, 3 bits, codes ``[5, 3, 7]`` = binary ``101, 011, 111`` (LSB first: ``1 0 1 | 1 1 0 |
1 1 1``): stream bits 0..8 = ``1,0,1,1,1,0,1,1,1`` -> byte 0 = ``0b11011101`` = 0xDD, byte 1 = ``0b1``
= 0x01.

The fast kernels in :mod:`quantpipe.quant._kernels` produce the same bytes and are tested against these
functions.
"""

from __future__ import annotations

import numpy as np

from quantpipe.quant.primitives import QuantizationInputError, check_bits, code_dtype

__all__ = ["packed_nbytes", "pack", "unpack"]


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return (int(n) * check_bits(bits) + 7) // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes (any shape, taken in C order) into a uint8 bitstream.

    Raises:
        QuantizationInputError: a code is negative or does not fit in ``bits`` bits.
    """
    bits = check_bits(bits)
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.size and (int(flat.max()) >> bits or int(flat.min()) < 0):
        raise QuantizationInputError(
            f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits, got [{int(flat.min())}, {int(flat.max())}]"
        )
    if bits == 16:
        return flat.astype("<u2").view(np.uint8).copy()
    if bits == 8:
        return flat.astype(np.uint8).copy()
    shifts = np.arange(bits, dtype=np.uint8)
    bit_matrix = (flat.astype(np.uint8)[:, None] >> shifts) & np.uint8(1)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack(stream, n: int, bits: int) -> np.ndarray:
    """Unpack ``n`` codes of ``bits`` bits from a bitstream (bytes-like or uint8 array).

    Bytes beyond ``ceil(n * bits / 8)`` are ignored.

    Raises:
        QuantizationInputError: the stream is shorter than ``n`` codes need.
    """
    bits = check_bits(bits)
    buf = np.frombuffer(stream, dtype=np.uint8) if not isinstance(stream, np.ndarray) else stream.reshape(-1).view(np.uint8)
    need = packed_nbytes(n, bits)
    if buf.size < need:
        raise QuantizationInputError(f"bitstream has {buf.size} bytes, {n} codes of {bits} bits need {need}")
    if bits == 16:
        return buf[: 2 * n].view("<u2").astype(np.uint16)
    if bits == 8:
        return buf[:n].copy()
    bit_values = np.unpackbits(buf[:need], count=n * bits, bitorder="little").reshape(n, bits)
    weights = (np.uint16(1) << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (bit_values.astype(np.uint16) @ weights).astype(code_dtype(bits))
