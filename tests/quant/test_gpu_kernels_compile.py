"""The GPU codec's CUDA source compiles with NVRTC for a data-centre GPU (sm_90) and a Jetson Orin (sm_87).

Needs no GPU: NVRTC is a host library (torch's CUDA wheels bring one, ``nvidia-cuda-nvrtc``). It catches a
kernel that would fail to build only on the device machine, for every kernel family and template
instance that CuPy compiles at run time. Skipped where no libnvrtc is installed.
"""

from __future__ import annotations

import ctypes
import glob
import os
import site
import sys

import numpy as np
import pytest

from quantpipe.quant.primitives import QUANT_BITS
from quantpipe.quant.rotation import hadamard_matrix


def _nvrtc():
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for root in roots:
        for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so.*")), reverse=True):
            if ".alt." in lib:
                continue
            for builtins in glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so.*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)  # NVRTC opens it by name
            try:
                return ctypes.CDLL(lib)
            except OSError:
                continue
    return None


NVRTC = _nvrtc()
pytestmark = pytest.mark.skipif(NVRTC is None, reason="no libnvrtc installed (pip install nvidia-cuda-nvrtc-cu12)")


def _compile(source: str, names: list[str], arch: str) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None) == 0
    try:
        for n in names:
            assert NVRTC.nvrtcAddNameExpression(prog, n.encode()) == 0
        opts = [b"-std=c++14", f"--gpu-architecture={arch}".encode()]
        rc = NVRTC.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetProgramLog(prog, log)
        return rc, log.value.decode(errors="replace")
    finally:
        NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))


def _base_literal(q: int) -> str:
    return ",".join(f"{v:.1f}f" for v in hadamard_matrix(q).astype(np.float32).reshape(-1))


@pytest.mark.parametrize("arch", ["compute_90", "compute_87"])
def test_plain_kernels_compile(arch):
    from quantpipe.quant.gpu import _cuda

    names = [f"enc_plain<{b}>" for b in QUANT_BITS] + [f"dec_plain<{b}>" for b in QUANT_BITS] + ["count_nan"]
    rc, log = _compile(_cuda._SOURCE, names, arch)
    assert rc == 0, log


@pytest.mark.parametrize("arch,q,log_g", [("compute_90", 12, 4), ("compute_90", 12, 6), ("compute_90", 16, 7),
                                          ("compute_90", 16, 0), ("compute_87", 12, 4), ("compute_87", 20, 5)])
def test_tiled_rotation_kernels_compile(arch, q, log_g):
    from quantpipe.quant.gpu import _cuda

    c, g = q << log_g, 1 << log_g
    srow = _cuda.TiledRotation._srow(c, q, g)
    assert srow >= c and srow % 4 == 0
    prefix = (f"#define QP_TILED\n#define Q {q}\n#define LOG_G {log_g}\n#define SROW {srow}\n"
              f"__constant__ float c_base[{q * q}] = {{{_base_literal(q)}}};\n")
    names = [f"enc_tiled<{b}>" for b in QUANT_BITS] + [f"dec_tiled<{b}>" for b in QUANT_BITS]
    rc, log = _compile(prefix + _cuda._SOURCE, names, arch)
    assert rc == 0, log


@pytest.mark.parametrize("arch,q,p", [("compute_90", 12, 1), ("compute_87", 12, 2)])
def test_warp_rotation_kernels_compile(arch, q, p):
    from quantpipe.quant.gpu import _cuda

    prefix = f"#define QP_ROT\n#define Q {q}\n#define P {p}\n__constant__ float c_base[{q * q}] = {{{_base_literal(q)}}};\n"
    names = [f"enc_rot<{b}>" for b in QUANT_BITS] + [f"dec_rot<{b}>" for b in QUANT_BITS]
    rc, log = _compile(prefix + _cuda._SOURCE, names, arch)
    assert rc == 0, log


def test_tiled_bank_layout_and_shared_memory():
    """The row stride puts consecutive rows of the last butterfly pass on consecutive banks."""
    from quantpipe.quant.gpu import _cuda

    for q, g in ((12, 16), (12, 64), (16, 64), (20, 32)):
        c = q * g
        srow = _cuda.TiledRotation._srow(c, q, g)
        log_g = g.bit_length() - 1
        w = q << (log_g - min(log_g, 5))
        lanes = [(l // w) * srow + l % w for l in range(32)]
        assert len({a % 32 for a in lanes}) == 32, (q, g, srow)
        assert _cuda.TiledRotation.supports(c, g, q)
    assert not _cuda.TiledRotation.supports(192, 16, 6)  # Q must be a multiple of 4 (float4 rows)
    assert not _cuda.TiledRotation.supports(12, 1, 12)  # C must be a multiple of 8 (units of 8 codes)
