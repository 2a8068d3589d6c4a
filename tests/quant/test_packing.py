"""The bitstream (numpy reference): hand-worked bytes per bitwidth, round trips, sizes, bad input.

The expected bytes below are worked out by hand from the format (value i at stream bits
[i*b, (i+1)*b), stream bit k = bit k % 8 of byte k // 8), never by calling ``pack``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantpipe.errors import QuantpipeError
from quantpipe.quant.packing import pack, packed_nbytes, unpack
from quantpipe.quant.primitives import QUANT_BITS, QuantizationInputError

# bits -> (codes, expected bytes, how the bytes follow)
HAND_WORKED = {
    1: ([1, 0, 1, 1, 0, 0, 0, 1, 1], [0x8D, 0x01],
        "bits LSB first 1,0,1,1,0,0,0,1 -> 0b10001101; the 9th code opens byte 1"),
    2: ([3, 0, 1, 2, 2], [0x93, 0x02],
        "3 | 0<<2 | 1<<4 | 2<<6 = 3 + 16 + 128 = 0x93; then 2"),
    3: ([1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F],
        "1 + 2<<3 + 3<<6 + 4<<9 + 5<<12 + 6<<15 + 7<<18 = 2054353 = 0x1F58D1, 24 bits, little-endian"),
    4: ([1, 10, 15, 3, 7], [0xA1, 0x3F, 0x07],
        "low nibble first: 0xA1 (1, 10), 0x3F (15, 3), 0x07 (7 + zero padding)"),
    5: ([31, 1, 16], [0x3F, 0x40],
        "31 + 1<<5 + 16<<10 = 16447 = 0x403F, 15 bits in 2 bytes"),
    6: ([63, 0, 21, 42], [0x3F, 0x50, 0xA9],
        "63 + 21<<12 + 42<<18 = 11096127 = 0xA9503F: 6 bits per value, not 6.4"),
    7: ([100, 27, 64], [0xE4, 0x0D, 0x10],
        "100 + 27<<7 + 64<<14 = 1052132 = 0x100DE4, 21 bits in 3 bytes"),
    8: ([0, 255, 18], [0x00, 0xFF, 0x12], "one code per byte"),
    16: ([0x1234, 0xFFFF, 1], [0x34, 0x12, 0xFF, 0xFF, 0x01, 0x00], "little-endian uint16"),
}


def test_every_quantized_bitwidth_has_a_hand_worked_example():
    assert sorted(HAND_WORKED) == sorted(QUANT_BITS)


@pytest.mark.parametrize("bits", sorted(HAND_WORKED))
def test_hand_worked_bytes(bits):
    codes, expected, _why = HAND_WORKED[bits]
    dtype = np.uint16 if bits == 16 else np.uint8
    packed = pack(np.array(codes, dtype=dtype), bits)
    assert packed.dtype == np.uint8
    assert packed.tolist() == expected
    unpacked = unpack(bytes(expected), len(codes), bits)
    assert unpacked.dtype == dtype
    assert unpacked.tolist() == codes


def test_docstring_example():
    """The worked example in packing's module docstring."""
    assert pack(np.array([5, 3, 7], dtype=np.uint8), 3).tolist() == [0xDD, 0x01]


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(QUANT_BITS), data=st.data())
def test_round_trip_any_length(bits, data):
    n = data.draw(st.integers(0, 77), label="n")  # odd lengths and tails of every size
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n), label="codes")
    dtype = np.uint16 if bits == 16 else np.uint8
    packed = pack(np.array(codes, dtype=dtype), bits)
    assert packed.size == packed_nbytes(n, bits) == -(-n * bits // 8)
    out = unpack(packed, n, bits)
    assert out.dtype == dtype and out.tolist() == codes
    # padding bits of the last byte are zero
    if n * bits % 8:
        assert int(packed[-1]) >> (n * bits % 8) == 0


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_round_trip_all_codes_and_shapes(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 5, 7)).astype(np.uint16 if bits == 16 else np.uint8)
    codes.flat[0], codes.flat[-1] = 0, (1 << bits) - 1
    packed = pack(codes, bits)  # any shape, taken in C order
    np.testing.assert_array_equal(unpack(packed, codes.size, bits), codes.reshape(-1))


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_empty(bits):
    packed = pack(np.zeros(0, dtype=np.uint8), bits)
    assert packed.size == 0
    assert unpack(b"", 0, bits).size == 0


@pytest.mark.parametrize("stream_type", [bytes, bytearray, memoryview, np.asarray])
def test_unpack_accepts_buffers(stream_type):
    codes, expected, _ = HAND_WORKED[3]
    stream = stream_type(bytes(expected)) if stream_type is not np.asarray else np.array(expected, dtype=np.uint8)
    assert unpack(stream, len(codes), 3).tolist() == codes


def test_unpack_ignores_trailing_bytes():
    assert unpack(bytes([0xA1, 0x3F, 0x07, 0xEE]), 5, 4).tolist() == [1, 10, 15, 3, 7]


def test_unpack_rejects_short_stream():
    with pytest.raises(QuantizationInputError, match="bitstream has 2 bytes"):
        unpack(bytes(2), 8, 3)


@pytest.mark.parametrize("bits", [1, 2, 3, 7, 8])
def test_pack_rejects_codes_that_do_not_fit(bits):
    with pytest.raises(QuantizationInputError, match=f"for {bits} bits"):
        pack(np.array([0, 1 << bits], dtype=np.int64), bits)


def test_pack_rejects_negative_codes():
    with pytest.raises(QuantizationInputError, match="codes must lie in"):
        pack(np.array([1, -1], dtype=np.int64), 4)


@pytest.mark.parametrize("bits", [0, 9, 12, 32, -1, 2.5, True])
def test_unsupported_bitwidth(bits):
    with pytest.raises(QuantizationInputError, match="unsupported bitwidth") as info:
        pack(np.zeros(4, dtype=np.uint8), bits)
    assert isinstance(info.value, QuantpipeError) and isinstance(info.value, ValueError)
    with pytest.raises(QuantizationInputError, match="unsupported bitwidth"):
        unpack(bytes(4), 4, bits)
    with pytest.raises(QuantizationInputError, match="unsupported bitwidth"):
        packed_nbytes(4, bits)


def test_packed_nbytes():
    assert packed_nbytes(197 * 768, 6) == 113472  # algorithms.md section 10: 6 bits per value exactly
    assert packed_nbytes(197 * 768, 2) == 37824
    assert packed_nbytes(3, 3) == 2
    assert packed_nbytes(0, 5) == 0
