"""Clip ranges for boundary tensors: naive min/max, ACIQ, DS-ACIQ and an MSE search.

Every method returns ``(lo, hi)`` in float32: numpy scalars for the per-tensor methods, ``[C]``
arrays (over the last axis) for the per-channel ones. These are the ranges
:func:`quantpipe.quant.primitives.quantize` clips to.

* ``naive``: ``[min(x), max(x)]``, the paper's "PTQ" row.
* ``aciq`` / ``aciq_gauss``: ACIQ (Banner, Nahshan, Soudry, "Post training 4-bit quantization of
  convolutional networks for rapid-deployment", NeurIPS 2019). The tensor is modelled as
  Laplace(mu, b) or Gaussian(mu, sigma) with the reference estimators ``b = mean|x - mean|`` and
  ``sigma = std(x)``, and clipped at ``mu +- factor_M * b`` (factors: :func:`laplace_factor`,
  :func:`gaussian_factor`).
* ``ds_aciq``: directed-search ACIQ (QuantPipe, Wang et al. 2022): the Laplace scale whose density
  best fits the tensor's 200-bin histogram, found by a 101-point walk (:func:`ds_aciq_fit`).
* ``mse_pc``: per channel, the clip that minimises the quantization MSE itself, searched on
  histograms (:mod:`quantpipe.quant.binned`) so that it takes seconds, not minutes.

Design choice shared by ACIQ and DS-ACIQ: the analytical range ``mu +- a`` is intersected with the
observed ``[min, max]``. On the calibration data, a range reaching beyond the extremes removes no
clipping error but widens the step. Held-out data can exceed the calibration extremes, so this is a
bet on enough calibration data: on DeiT-Tiny's boundaries (16 calibration images, per channel) it
lowered the held-out MSE at 4 and 6 bits and raised it at 8 bits on one of the two boundaries.

The ``*_range`` functions work on raw arrays; :class:`quantpipe.quant.observer.BoundaryObserver`
computes the same ranges from streaming statistics through the histogram-level functions here
(:func:`ds_aciq_fit_hist`, :func:`mse_search`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from quantpipe.errors import ConfigError, QuantpipeError
from quantpipe.quant import primitives
from quantpipe.quant.primitives import check_bits
# Re-exported: the histogram machinery lives in quantpipe.quant.binned.
from quantpipe.quant.binned import MSE_HIST_BINS, BinnedRows, histogram_rows, mse_search

__all__ = [
    "METHODS",
    "PER_CHANNEL_METHODS",
    "DS_ACIQ_BINS",
    "DS_ACIQ_STEPS",
    "CalibrationDataError",
    "DsAciqFit",
    "lambert_w0",
    "laplace_factor",
    "gaussian_factor",
    "naive_range",
    "aciq_range",
    "ds_aciq_fit",
    "ds_aciq_fit_hist",
    "ds_aciq_scale",
    "ds_aciq_range",
    "BinnedRows",
    "mse_search",
    "histogram_rows",
    "mse_range",
    "clip_range",
    "quantization_mse",
    "range_about",
]

#: Method names of the clip table. Per tensor as in the paper, then per channel (``_pc``).
METHODS: tuple[str, ...] = ("naive", "aciq", "aciq_gauss", "ds_aciq", "naive_pc", "aciq_pc", "ds_aciq_pc", "mse_pc")
PER_CHANNEL_METHODS: frozenset[str] = frozenset(m for m in METHODS if m.endswith("_pc"))
#: DS-ACIQ's histogram resolution and number of walk steps (algorithms.md section 5).
DS_ACIQ_BINS = 200
DS_ACIQ_STEPS = 100


class CalibrationDataError(QuantpipeError, ValueError):
    """Calibration data is empty or holds NaN/inf, so no clip range can be computed from it."""


# --------------------------------------------------------------------------------------------
# ACIQ factors
# --------------------------------------------------------------------------------------------


def lambert_w0(x):
    """Principal branch ``W0`` of the Lambert W function (``w * exp(w) = x``, ``w >= -1``).

    Halley iteration from an asymptotic (large ``x``) or branch-point (near ``-1/e``) start; converges
    to float64 precision in a handful of steps. Used for ACIQ's Laplace factor ``W0(3 * 4**M)``.

    Args:
        x: scalar or array, every element ``>= -1/e``.

    Returns:
        float for scalar input, else a float64 array of the shape of ``x``.

    Raises:
        ValueError: an element is below ``-1/e``, or NaN.
    """
    xa = np.asarray(x, dtype=np.float64)
    branch = -1.0 / math.e
    # A tiny tolerance so that the float64 value of -1/e itself is accepted.
    if np.any(np.isnan(xa)) or np.any(xa < branch - 1e-15):
        raise ValueError("lambert_w0 is defined for x >= -1/e (and not NaN)")
    xa = np.maximum(xa, branch)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        big = np.log(np.maximum(xa, 3.0))
        w = np.where(xa >= 3.0, big - np.log(big) + np.log(big) / big, np.log1p(np.maximum(xa, 0.0)) * 0.7)
        p = np.sqrt(np.maximum(2.0 * (math.e * xa + 1.0), 0.0))
        w = np.where(xa < -0.25, -1.0 + p - p * p / 3.0 + 11.0 / 72.0 * p**3, w)
        w = np.where((xa >= -0.25) & (xa < 0.0), xa * (1.0 - xa), w)
        for _ in range(64):
            ew = np.exp(w)
            f = w * ew - xa
            denom = ew * (w + 1.0) - (w + 2.0) * f / (2.0 * w + 2.0)
            step = np.where((denom != 0) & np.isfinite(denom), f / denom, 0.0)
            w = w - step
            if np.all(np.abs(step) <= 1e-15 * np.maximum(1.0, np.abs(w))):
                break
    w = np.where(xa <= branch, -1.0, w)  # the branch point, where Halley's denominator vanishes
    return float(w) if np.ndim(x) == 0 else w


def _effective_bits(bits: int, one_sided: bool) -> int:
    # ACIQ: a one-sided (e.g. post-ReLU) tensor spends all 2**M levels on one half, like M+1 bits.
    return check_bits(bits) + (1 if one_sided else 0)


@functools.lru_cache(maxsize=64)
def laplace_factor(bits: int, one_sided: bool = False) -> float:
    """ACIQ's optimal clip ``a / b`` for a Laplace(b) tensor at ``bits`` bits: ``W0(3 * 4**M)``.

    Minimises ``2 b^2 exp(-a/b) + a^2 / (3 * 4**M)`` (Banner et al. 2019; algorithms.md section 4).
    ``one_sided`` uses ``M + 1``.
    """
    m = _effective_bits(bits, one_sided)
    return lambert_w0(3.0 * 4.0**m)


@functools.lru_cache(maxsize=64)
def gaussian_factor(bits: int, one_sided: bool = False) -> float:
    """ACIQ's optimal clip ``a / sigma`` for a Gaussian(sigma) tensor at ``bits`` bits.

    Minimises the ACIQ Gaussian expression (sigma = 1)::

        E(a) = (a^2 + 1) * erfc(a / sqrt 2) - sqrt(2/pi) * a * exp(-a^2 / 2) + a^2 / (3 * 4**M)

    ``E`` is convex (``E'' = 2 erfc(a / sqrt 2) + 2 / (3 * 4**M) > 0``), so its minimiser is the unique
    root of ``E'(a) = 2 a erfc(a / sqrt 2) - 2 sqrt(2/pi) exp(-a^2/2) + 2 a / (3 * 4**M)``, found by
    bisection to float64 precision. ``one_sided`` uses ``M + 1``.
    """
    m = _effective_bits(bits, one_sided)
    quant = 2.0 / (3.0 * 4.0**m)
    c = 2.0 * math.sqrt(2.0 / math.pi)

    def derivative(a: float) -> float:
        return 2.0 * a * math.erfc(a / math.sqrt(2.0)) - c * math.exp(-0.5 * a * a) + quant * a

    lo, hi = 0.0, 64.0  # E'(0) < 0 < E'(64) for every M <= 17
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if derivative(mid) < 0.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _rows(x, per_channel: bool) -> np.ndarray:
    """``x`` as float64 ``[N, K]``: K = channels (last axis) or 1. Refuses empty or non-finite data."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"clip ranges need a numeric tensor, got dtype {a.dtype}")
    if a.size == 0:
        raise CalibrationDataError(f"cannot compute a clip range from an empty tensor (shape {a.shape}); feed at least one value per channel")
    if per_channel and a.ndim == 0:
        raise ValueError("per-channel ranges need a tensor with a channel (last) axis, got a scalar")
    finite = np.isfinite(a)
    if not finite.all():
        n_nan = int(np.isnan(a).sum())
        n_inf = int(a.size - finite.sum()) - n_nan
        raise CalibrationDataError(
            f"calibration tensor holds {n_nan} NaN and {n_inf} inf value(s); clip ranges need finite data: "
            "check the model and the inputs that feed this boundary"
        )
    a = a.astype(np.float64, copy=False)
    if np.abs(a).max() > np.finfo(np.float32).max:
        raise CalibrationDataError("calibration tensor holds values beyond float32's range; boundary tensors are float32")
    return a.reshape(-1, a.shape[-1]) if per_channel else a.reshape(-1, 1)


def _out(lo: np.ndarray, hi: np.ndarray, per_channel: bool):
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    if per_channel:
        return lo32, hi32
    return np.float32(lo32[0]), np.float32(hi32[0])


def range_about(mu: np.ndarray, a: np.ndarray, minimum: np.ndarray, maximum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[mu - a, mu + a]`` intersected with ``[minimum, maximum]`` (why: see the module docstring).

    Clipping each end into ``[minimum, maximum]`` keeps ``lo <= hi`` even when ``mu`` is off by a rounding
    error from a constant row's value.
    """
    lo = np.clip(mu - a, minimum, maximum)
    hi = np.clip(mu + a, minimum, maximum)
    return lo, hi


# --------------------------------------------------------------------------------------------
# naive and ACIQ
# --------------------------------------------------------------------------------------------


def naive_range(x, per_channel: bool = False):
    """``(min(x), max(x))``, over the whole tensor or per channel (last axis)."""
    rows = _rows(x, per_channel)
    return _out(rows.min(axis=0), rows.max(axis=0), per_channel)


def aciq_range(x, bits: int, dist: str = "laplace", per_channel: bool = False):
    """ACIQ clip range (Banner et al., NeurIPS 2019) with the reference estimators.

    Laplace: ``b = mean|x - mean(x)|``, ``a = laplace_factor(bits) * b``; Gaussian: ``sigma = std(x)``,
    ``a = gaussian_factor(bits) * sigma``. The range is ``mean +- a`` intersected with ``[min, max]``.

    Args:
        x: tensor; per-channel statistics are over every axis but the last.
        bits: target bitwidth (1..8 or 16).
        dist: ``"laplace"`` or ``"gauss"``.
        per_channel: one range per channel of the last axis.
    """
    bits = check_bits(bits)
    rows = _rows(x, per_channel)
    mu = rows.mean(axis=0)
    if dist == "laplace":
        a = laplace_factor(bits) * np.abs(rows - mu).mean(axis=0)
    elif dist in ("gauss", "gaussian"):
        a = gaussian_factor(bits) * rows.std(axis=0)
    else:
        raise ValueError(f"unknown ACIQ distribution {dist!r}: choose 'laplace' or 'gauss'")
    lo, hi = range_about(mu, a, rows.min(axis=0), rows.max(axis=0))
    return _out(lo, hi, per_channel)


# --------------------------------------------------------------------------------------------
# DS-ACIQ
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DsAciqFit:
    """The outcome of DS-ACIQ's directed search, one entry per row (tensor or channel).

    Attributes:
        mean: the Laplace location (mean of the data).
        b0: the starting scale, the mean absolute deviation about the mean.
        b_peak: the scale whose normalised peak height equals the histogram's.
        b_star: the chosen scale (0 for a constant row).
        err_b0, err_star: mean squared difference between the normalised histogram and the normalised
            Laplace density at ``b0`` and at ``b_star``.
        sharper: the histogram's peak is higher than Laplace(b0)'s, so the walk went toward smaller b.
    """

    mean: np.ndarray
    b0: np.ndarray
    b_peak: np.ndarray
    b_star: np.ndarray
    err_b0: np.ndarray
    err_star: np.ndarray
    sharper: np.ndarray


def _laplace_shape(dist: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Laplace density at distances ``dist`` [..., bins] from the mean, normalised to sum 1 over bins.

    The distances are shifted by their minimum first so that the exponentials cannot all underflow
    for tiny ``b`` (the shift cancels in the normalisation).
    """
    d = dist - dist.min(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.exp(-d / b[..., None])
    return e / e.sum(axis=-1, keepdims=True)


def _peak_scale(dist: np.ndarray, target: np.ndarray, b_lo: np.ndarray, b_hi: np.ndarray) -> np.ndarray:
    """Per row, the ``b`` whose normalised Laplace peak height equals ``target`` (bisection in log b).

    The normalised peak ``1 / sum_i exp(-(d_i - d_min) / b)`` falls monotonically as ``b`` grows, so
    bisection is exact; targets outside what ``[b_lo, b_hi]`` can reach end at the bracket's end.
    """
    lo, hi = np.log(b_lo), np.log(b_hi)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        peak = _laplace_shape(dist, np.exp(mid)).max(axis=-1)
        too_peaked = peak > target  # b too small
        lo = np.where(too_peaked, mid, lo)
        hi = np.where(too_peaked, hi, mid)
    return np.exp(0.5 * (lo + hi))


def ds_aciq_fit_hist(h: np.ndarray, dist: np.ndarray, mean: np.ndarray, b0: np.ndarray, *, chunk: int = 64) -> DsAciqFit:
    """DS-ACIQ's directed search on given histograms (algorithms.md section 5, steps 3-6).

    Args:
        h: ``[K, bins]`` histograms normalised to sum 1.
        dist: ``[K, bins]`` absolute distance of each bin centre from the row's mean.
        mean: ``[K]`` row means (carried into the result).
        b0: ``[K]`` starting scales (mean absolute deviation about the mean); 0 marks a constant row,
            which is skipped.
        chunk: rows evaluated together (bounds memory at ``chunk * 101 * bins`` floats).

    Returns:
        The fit per row; ``b_star = 0`` where ``b0 == 0`` (a constant row).
    """
    h = np.asarray(h, dtype=np.float64)
    dist = np.asarray(dist, dtype=np.float64)
    b0 = np.asarray(b0, dtype=np.float64)
    k = h.shape[0]
    live = b0 > 0
    out = {name: np.zeros(k) for name in ("b_peak", "b_star", "err_b0", "err_star")}
    sharper = np.zeros(k, dtype=bool)
    idx = np.flatnonzero(live)
    for start in range(0, idx.size, chunk):
        rows = idx[start : start + chunk]
        hr, dr, b0r = h[rows], dist[rows], b0[rows]
        hmax = hr.max(axis=1)
        f0 = _laplace_shape(dr, b0r)
        sharper[rows] = hmax > f0.max(axis=1)
        width = dr.max(axis=1) + 1e-300
        b_peak = _peak_scale(dr, hmax, b0r * 1e-9, np.maximum(b0r, width) * 1e9)
        steps = np.arange(DS_ACIQ_STEPS + 1) / DS_ACIQ_STEPS
        cands = b0r[:, None] + (b_peak - b0r)[:, None] * steps  # [rows, 101], cands[:, 0] == b0
        cands = np.maximum(cands, 1e-300)
        fits = _laplace_shape(dr[:, None, :], cands)  # [rows, 101, bins]
        err = ((hr[:, None, :] - fits) ** 2).mean(axis=2)
        best = err.argmin(axis=1)
        out["b_peak"][rows] = b_peak
        out["b_star"][rows] = cands[np.arange(rows.size), best]
        out["err_b0"][rows] = err[:, 0]
        out["err_star"][rows] = err[np.arange(rows.size), best]
    return DsAciqFit(mean=np.asarray(mean, dtype=np.float64), b0=b0, sharper=sharper, **out)


def ds_aciq_fit(x, per_channel: bool = False) -> DsAciqFit:
    """DS-ACIQ (QuantPipe, Wang et al. 2022) on a raw tensor, exactly as algorithms.md section 5.

    1. ``h``: 200-bin histogram of x over ``[min, max]``, normalised to sum 1.
    2. ``b0 = mean|x - mean(x)|``.
    3. Laplace(mean, b) evaluated on the same bin centres, normalised to sum 1.
    4./5. Walk linearly from ``b0`` toward ``b_peak`` (normalised peak height == ``max(h)``) in 100
       steps; this walks toward smaller ``b`` exactly when ``max(h) > max(f_b0)`` (the peak is sharper).
    6. ``b*``: the candidate with the least mean squared difference to ``h``.
    """
    rows = _rows(x, per_channel)
    mu, mn, mx = rows.mean(axis=0), rows.min(axis=0), rows.max(axis=0)
    b0 = np.abs(rows - mu).mean(axis=0)
    counts = histogram_rows(rows, mn, mx, DS_ACIQ_BINS)
    h = counts / counts.sum(axis=1, keepdims=True)
    centres = mn[:, None] + (np.arange(DS_ACIQ_BINS) + 0.5) * ((mx - mn) / DS_ACIQ_BINS)[:, None]
    b0 = np.where(mx > mn, b0, 0.0)
    return ds_aciq_fit_hist(h, np.abs(centres - mu[:, None]), mu, b0)


def ds_aciq_scale(x, per_channel: bool = False):
    """DS-ACIQ's Laplace scale ``b*`` (float per tensor, ``[C]`` float64 per channel).

    ``b*`` does not depend on the bitwidth: one calibrated ``b*`` yields the clip for every M.
    """
    b = ds_aciq_fit(x, per_channel).b_star
    return b if per_channel else float(b[0])


def ds_aciq_range(x, bits: int, per_channel: bool = False):
    """DS-ACIQ clip range ``mean +- laplace_factor(bits) * b*``, intersected with ``[min, max]``."""
    bits = check_bits(bits)
    rows = _rows(x, per_channel)
    fit = ds_aciq_fit(rows, per_channel=True)  # rows is already [N, K]
    lo, hi = range_about(fit.mean, laplace_factor(bits) * fit.b_star, rows.min(axis=0), rows.max(axis=0))
    return _out(lo, hi, per_channel)


# --------------------------------------------------------------------------------------------
# MSE search
# --------------------------------------------------------------------------------------------


def mse_range(x, bits: int, per_channel: bool = True, *, bins: int = MSE_HIST_BINS):
    """The clip range that minimises the quantization MSE of ``x`` at ``bits`` bits.

    Each row (channel, or the whole tensor) is summarised by a ``bins``-bin histogram over its
    ``[min, max]``; :func:`mse_search` then searches candidate ranges, scoring
    each with the exact MSE of :func:`~quantpipe.quant.primitives.quantize` /
    :func:`~quantpipe.quant.primitives.dequantize` under the assumption that values are uniform within a
    histogram bin (see there for the grid).
    """
    bits = check_bits(bits)
    if isinstance(bins, bool) or int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    rows = _rows(x, per_channel)
    dist = BinnedRows.from_rows(rows, int(bins))
    lo, hi = mse_search(dist, bits)
    return _out(lo, hi, per_channel)


# --------------------------------------------------------------------------------------------
# dispatch and evaluation
# --------------------------------------------------------------------------------------------


def clip_range(x, method: str, bits: int):
    """The clip range of ``x`` by one of :data:`METHODS` at ``bits`` bits.

    Raises:
        ConfigError: ``method`` is not one of :data:`METHODS`.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown clip method {method!r}: choose one of {', '.join(METHODS)}")
    per_channel = method in PER_CHANNEL_METHODS
    base = method[:-3] if per_channel else method
    if base == "naive":
        return naive_range(x, per_channel)
    if base == "aciq":
        return aciq_range(x, bits, "laplace", per_channel)
    if base == "aciq_gauss":
        return aciq_range(x, bits, "gauss", per_channel)
    if base == "ds_aciq":
        return ds_aciq_range(x, bits, per_channel)
    return mse_range(x, bits, per_channel)


def quantization_mse(x, lo, hi, bits: int) -> float:
    """Mean squared error of ``dequantize(quantize(x, lo, hi, bits))`` against ``x`` (float64 sum).

    ``x`` is taken as float32 (the boundary's type); a NaN in ``x`` makes the result NaN.
    """
    x32 = np.asarray(x, dtype=np.float32)
    xh = primitives.dequantize(primitives.quantize(x32, lo, hi, bits), lo, hi, bits)
    diff = xh.astype(np.float64) - x32
    return float(np.mean(diff * diff))
