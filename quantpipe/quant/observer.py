"""Streaming statistics of a boundary tensor, enough to compute every clip range afterwards.

Calibration forwards many images through a stage and feeds each boundary batch ``[B, tokens, C]`` to a
:class:`BoundaryObserver`. The observer keeps, in memory that does not grow with the number of images:

* exact statistics per channel: count, min, max, mean and the sum of squared deviations (merged with
  Chan et al.'s parallel update, so batches and observers combine without loss of precision);
* a fine histogram per channel and one over the whole tensor, on an *adaptive symmetric power-of-two
  grid*: ``bins`` equal bins over ``[-R, R)`` with ``R = 2**e`` the smallest power of two strictly above
  every ``|x|`` seen. A value goes to bin ``floor(x / w) + bins/2`` with ``w = 2R / bins`` a power of two,
  so the index is computed exactly. When a larger value arrives, ``R`` doubles (as often as needed) and
  adjacent bin pairs merge: ``floor(floor(x/w) / 2) == floor(x / 2w)``, so the histogram is exactly the
  one a single pass at the final ``R`` would have built. Hence :meth:`merge` equals a single pass
  whatever the order of the batches: histograms, min and max bit for bit, mean and variance to float64
  rounding.

From these, :meth:`ranges` computes every method of :data:`quantpipe.quant.clipping.METHODS`:

* ``naive`` (exact), ``aciq_gauss`` (exact mean and std);
* ``aciq``: exact mean; ``b = mean|x - mean|`` from the fine histogram, reading each bin as uniform
  over its width (bins straddling the mean are split), a relative error of order ``(w / b)^2``;
* ``ds_aciq``: the paper's 200-bin histogram over the exact ``[min, max]``, derived from the fine one by
  splitting each fine bin's count uniformly over the coarse bins it overlaps. Only coarse edges that fall
  inside a fine bin are approximate, by at most one fine bin's count. A channel has
  ``bins * (max - min) / 2R`` fine bins over its data, thousands for a channel centred near 0 but only
  ~100 for one whose values sit in a narrow band far from 0 (e.g. 5 +- 0.1); there the derived
  histogram is a smoothed version of the exact one. On DeiT-Tiny boundaries the resulting ``ds_aciq_pc``
  ranges were within 0.3 % of the raw-array ones;
* ``mse_pc``: the MSE search of :func:`quantpipe.quant.clipping.mse_search` run on the fine histogram,
  coarsened to the raw path's :data:`~quantpipe.quant.clipping.MSE_HIST_BINS` bins (the search's cost
  grows with the bins; its optimum is flat, so the MSE it reaches, not the range, is what matches).

The per-tensor statistics (the paper's methods) come from the per-tensor histogram, not from merging
channels, because the grids of different channels differ.
"""

from __future__ import annotations

import numpy as np

from quantpipe.errors import ConfigError
from quantpipe.quant import clipping
from quantpipe.quant.binned import BinnedRows
from quantpipe.quant.clipping import METHODS, PER_CHANNEL_METHODS, CalibrationDataError
from quantpipe.quant.primitives import check_bits

__all__ = ["BoundaryObserver", "STATE_FORMAT", "STATE_VERSION"]

STATE_FORMAT = "quantpipe.observer"
STATE_VERSION = 1
#: Smallest grid half-width ``2**EXP_MIN``: values below it in magnitude share the two central bins.
EXP_MIN = -24
#: Channels per chunk when ranges are derived (bounds the float64 working set of BinnedRows).
_CHUNK = 64


def _needed_exponent(amax: np.ndarray) -> np.ndarray:
    """Smallest ``e >= EXP_MIN`` with ``2**e > amax`` (frexp: ``amax = f * 2**e``, ``0.5 <= f < 1``)."""
    _, e = np.frexp(np.asarray(amax, dtype=np.float64))
    return np.maximum(np.where(amax > 0, e, EXP_MIN), EXP_MIN).astype(np.int64)


def _grow(hist: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
    """Re-bin rows of ``hist`` [K, bins] in place from half-width ``2**old`` to ``2**new`` (``new >= old``).

    ``k = new - old`` doublings map bin ``j`` to ``floor((j - bins/2) / 2**k) + bins/2``; the targets are
    contiguous runs, so one ``add.reduceat`` per distinct ``k`` does every affected row at once.
    """
    bins = hist.shape[1]
    shift = new - old
    for k in np.unique(shift[shift > 0]):
        rows = np.flatnonzero(shift == k)
        j = np.arange(bins, dtype=np.int64)
        target = np.floor_divide(j - bins // 2, np.int64(2) ** min(int(k), 62)) + bins // 2
        starts = np.concatenate([[0], np.flatnonzero(np.diff(target)) + 1])
        sums = np.add.reduceat(hist[rows], starts, axis=1)
        block = np.zeros((rows.size, bins), dtype=hist.dtype)
        block[:, target[starts]] = sums
        hist[rows] = block


def _bin_index(values: np.ndarray, exponent: np.ndarray, bins: int) -> np.ndarray:
    """Exact bin index ``floor(x / w) + bins/2`` with ``w = 2**(e+1) / bins`` (a power of two)."""
    width = np.ldexp(np.float32(1.0), (exponent + 1 - int(np.log2(bins))).astype(np.int32)).astype(np.float32)
    idx = np.floor(values / width).astype(np.int64) + bins // 2
    # |x| < 2**e makes the index fall in [0, bins); the clip only guards float32 edge cases.
    np.clip(idx, 0, bins - 1, out=idx)
    return idx


class BoundaryObserver:
    """Single-pass statistics of one boundary tensor ``[..., C]`` for every clip method and bitwidth.

    Args:
        channels: ``C``, the size of the last axis (the hidden size, 192 for DeiT-Tiny).
        bins: fine bins per channel (a power of two >= 64); memory ``4 * C * bins`` bytes.
        tensor_bins: fine bins of the whole-tensor histogram (a power of two >= 64).

    Example:
        >>> obs = BoundaryObserver(192)
        >>> for batch in boundary_batches:      # each [B, 197, 192] float32
        ...     obs.update(batch)
        >>> lo, hi = obs.ranges("ds_aciq_pc", 4)
    """

    def __init__(self, channels: int, *, bins: int = 8192, tensor_bins: int = 65536):
        for name, value, least in (("channels", channels, 1), ("bins", bins, 64), ("tensor_bins", tensor_bins, 64)):
            if isinstance(value, bool) or int(value) != value or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name, value in (("bins", bins), ("tensor_bins", tensor_bins)):
            if int(value) & (int(value) - 1):
                raise ValueError(f"{name} must be a power of two (the grid merges bin pairs), got {value}")
        self.channels, self.bins, self.tensor_bins = int(channels), int(bins), int(tensor_bins)
        c = self.channels
        self._count = 0
        self._min = np.full(c, np.inf)
        self._max = np.full(c, -np.inf)
        self._mean = np.zeros(c)
        self._m2 = np.zeros(c)
        self._exp = np.full(c, EXP_MIN, dtype=np.int64)
        self._hist = np.zeros((c, self.bins), dtype=np.int32)
        self._texp = np.full(1, EXP_MIN, dtype=np.int64)
        self._thist = np.zeros((1, self.tensor_bins), dtype=np.int64)
        self._cache: dict = {}

    # ---------------------------------------------------------------------------------- collect

    @property
    def count(self) -> int:
        """Values seen per channel (images x tokens)."""
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics; independent of how many values were seen."""
        arrays = (self._min, self._max, self._mean, self._m2, self._exp, self._hist, self._texp, self._thist)
        return int(sum(a.nbytes for a in arrays))

    def update(self, x) -> None:
        """Add a batch ``x`` of shape ``[..., C]`` (e.g. ``[B, 197, C]``; other float dtypes are cast to
        float32, the boundary's wire type). Empty batches are no-ops.

        Raises:
            ValueError: the last axis is not ``C`` or ``x`` is not floating point.
            CalibrationDataError: ``x`` holds NaN or inf.
        """
        a = np.asarray(x)
        if a.dtype.kind != "f":
            raise ValueError(f"observer expects a floating-point tensor, got dtype {a.dtype}")
        if a.ndim == 0 or a.shape[-1] != self.channels:
            raise ValueError(f"observer for {self.channels} channels got a tensor of shape {a.shape}; the last axis must be the channels")
        if a.size == 0:
            return
        # float32 is what crosses the boundary; casting first also catches float64 values beyond its range
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            rows = np.ascontiguousarray(a.reshape(-1, self.channels), dtype=np.float32)
        if not np.isfinite(rows).all():
            raise CalibrationDataError(
                f"boundary batch holds {int(np.isnan(rows).sum())} NaN and {int(np.isinf(rows).sum())} inf value(s) "
                "(as float32): the model produced non-finite activations; check the inputs and the stage"
            )
        n = rows.shape[0]
        if self._count + n > np.iinfo(self._hist.dtype).max:
            self._hist = self._hist.astype(np.int64)  # keep counts exact past 2**31 values per channel
        bmin, bmax = rows.min(axis=0).astype(np.float64), rows.max(axis=0).astype(np.float64)
        bmean = rows.mean(axis=0, dtype=np.float64)
        dev = rows - bmean  # float64: the batch's squared deviations about its exact mean
        bm2 = np.einsum("ij,ij->j", dev, dev)
        del dev
        self._combine(n, bmin, bmax, bmean, bm2)
        # Per-channel grids first grow to cover the batch, then take its counts.
        need = np.maximum(self._exp, _needed_exponent(np.maximum(-bmin, bmax)))
        _grow(self._hist, self._exp, need)
        self._exp = need
        idx = _bin_index(rows, self._exp, self.bins)
        idx += np.arange(self.channels, dtype=np.int64) * self.bins
        self._hist += np.bincount(idx.ravel(), minlength=self.channels * self.bins).reshape(self.channels, self.bins).astype(self._hist.dtype)
        tneed = np.maximum(self._texp, _needed_exponent(np.array([max(-bmin.min(), bmax.max())])))
        _grow(self._thist, self._texp, tneed)
        self._texp = tneed
        tidx = _bin_index(rows.ravel(), self._texp, self.tensor_bins)
        self._thist[0] += np.bincount(tidx, minlength=self.tensor_bins)
        self._cache.clear()

    def _combine(self, n: int, bmin, bmax, bmean, bm2) -> None:
        """Chan et al.'s parallel update of count, mean and sum of squared deviations."""
        total = self._count + n
        delta = bmean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + bm2 + delta * delta * (self._count * n / total)
        self._min = np.minimum(self._min, bmin)
        self._max = np.maximum(self._max, bmax)
        self._count = total

    def merge(self, other: "BoundaryObserver") -> "BoundaryObserver":
        """Add another observer's statistics (e.g. from a second calibration worker); returns self.

        The histograms of the result equal those of one pass over both observers' data exactly.
        """
        if not isinstance(other, BoundaryObserver):
            raise ValueError(f"can only merge a BoundaryObserver, got {type(other).__name__}")
        if (other.channels, other.bins, other.tensor_bins) != (self.channels, self.bins, self.tensor_bins):
            raise ValueError(
                f"cannot merge observers of different layouts: {(self.channels, self.bins, self.tensor_bins)} "
                f"vs {(other.channels, other.bins, other.tensor_bins)} (channels, bins, tensor_bins)"
            )
        if other._count == 0:
            return self
        if self._count + other._count > np.iinfo(self._hist.dtype).max:
            self._hist = self._hist.astype(np.int64)
        theirs, ttheirs = other._hist.astype(self._hist.dtype), other._thist.copy()
        need = np.maximum(self._exp, other._exp)
        _grow(self._hist, self._exp, need)
        _grow(theirs, other._exp, need)
        self._hist += theirs
        self._exp = need
        tneed = np.maximum(self._texp, other._texp)
        _grow(self._thist, self._texp, tneed)
        _grow(ttheirs, other._texp, tneed)
        self._thist += ttheirs
        self._texp = tneed
        self._combine(other._count, other._min, other._max, other._mean, other._m2)
        self._cache.clear()
        return self

    # ---------------------------------------------------------------------------------- persist

    def state_dict(self) -> dict:
        """Everything needed to restore the observer: JSON-able scalars and numpy arrays."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "channels": self.channels,
            "bins": self.bins,
            "tensor_bins": self.tensor_bins,
            "count": self._count,
            "min": self._min.copy(),
            "max": self._max.copy(),
            "mean": self._mean.copy(),
            "m2": self._m2.copy(),
            "exp": self._exp.copy(),
            "hist": self._hist.copy(),
            "tensor_exp": int(self._texp[0]),
            "tensor_hist": self._thist[0].copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "BoundaryObserver":
        """Rebuild an observer from :meth:`state_dict` output (arrays may also be plain lists).

        Raises:
            ValueError: the state is not an observer state of this version or its arrays are inconsistent.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state dict")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"observer state version {state.get('version')!r} is not supported (expected {STATE_VERSION}); recollect the statistics")
        obs = cls(int(state["channels"]), bins=int(state["bins"]), tensor_bins=int(state["tensor_bins"]))
        c = obs.channels
        shapes = {"min": (c,), "max": (c,), "mean": (c,), "m2": (c,), "exp": (c,), "hist": (c, obs.bins), "tensor_hist": (obs.tensor_bins,)}
        arrays = {k: np.asarray(state[k]) for k in shapes}
        for key, shape in shapes.items():
            if arrays[key].shape != shape:
                raise ValueError(f"observer state field {key!r} has shape {arrays[key].shape}, expected {shape}")
        count = int(state["count"])
        if count < 0 or not np.all(arrays["hist"].sum(axis=1) == count) or int(arrays["tensor_hist"].sum()) != count * c:
            raise ValueError("observer state is inconsistent: histogram totals do not match its count")
        obs._count = count
        for key in ("min", "max", "mean", "m2"):
            setattr(obs, "_" + key, arrays[key].astype(np.float64))
        obs._exp = arrays["exp"].astype(np.int64)
        hist_dtype = np.int32 if count <= np.iinfo(np.int32).max else np.int64
        obs._hist = arrays["hist"].astype(hist_dtype)
        obs._texp = np.array([int(state["tensor_exp"])], dtype=np.int64)
        obs._thist = arrays["tensor_hist"].astype(np.int64).reshape(1, -1)
        return obs

    # ---------------------------------------------------------------------------------- solve

    def _binned(self, rows: slice | None, max_bins: int | None = None) -> BinnedRows:
        """The fine histogram as piecewise-uniform rows: channels ``rows``, or the tensor if None.

        ``max_bins`` merges aligned groups of adjacent bins (a coarser grid of the same family) for
        the MSE search, whose cost grows with the number of bins and which the raw-array path runs
        at :data:`~quantpipe.quant.clipping.MSE_HIST_BINS` bins too.
        """
        if rows is None:
            hist, exp, mn, mx, mean = self._thist, self._texp, self._min.min(), self._max.max(), np.array([self._mean.mean()])
        else:
            hist, exp, mn, mx, mean = self._hist[rows], self._exp[rows], self._min[rows], self._max[rows], self._mean[rows]
        if max_bins is not None and hist.shape[1] > max_bins:
            hist = hist.reshape(hist.shape[0], max_bins, -1).sum(axis=2)
        half = np.ldexp(1.0, exp)
        return BinnedRows(hist, -half, 2.0 * half / hist.shape[1], mn, mx, mean)

    def _chunks(self):
        return [slice(s, min(self.channels, s + _CHUNK)) for s in range(0, self.channels, _CHUNK)]

    def _stats(self, per_channel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """mean, std, min, max as [K] float64 (K = C, or 1 for the whole tensor)."""
        if per_channel:
            return self._mean, np.sqrt(self._m2 / self._count), self._min, self._max
        mean = self._mean.mean()  # every channel has the same count
        m2 = np.sum(self._m2 + self._count * (self._mean - mean) ** 2)
        std = np.sqrt(m2 / (self._count * self.channels))
        return np.array([mean]), np.array([std]), np.array([self._min.min()]), np.array([self._max.max()])

    def _mad(self, per_channel: bool) -> np.ndarray:
        key = ("mad", per_channel)
        if key not in self._cache:
            parts = [self._binned(s).mean_abs_dev() for s in self._chunks()] if per_channel else [self._binned(None).mean_abs_dev()]
            self._cache[key] = np.concatenate(parts)
        return self._cache[key]

    def ds_aciq_fit(self, per_channel: bool = False) -> clipping.DsAciqFit:
        """DS-ACIQ's search on the 200-bin histograms derived from the fine ones (see the module docstring)."""
        key = ("ds_aciq", per_channel)
        if key not in self._cache:
            self._require_data()
            mean, _, mn, mx = self._stats(per_channel)
            groups = self._chunks() if per_channel else [None]
            counts = np.concatenate([self._binned(s).rebin(clipping.DS_ACIQ_BINS) for s in groups])
            h = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-300)
            centres = mn[:, None] + (np.arange(clipping.DS_ACIQ_BINS) + 0.5) * ((mx - mn) / clipping.DS_ACIQ_BINS)[:, None]
            b0 = np.where(mx > mn, self._mad(per_channel), 0.0)
            self._cache[key] = clipping.ds_aciq_fit_hist(h, np.abs(centres - mean[:, None]), mean, b0)
        return self._cache[key]

    def _require_data(self) -> None:
        if self._count == 0:
            raise CalibrationDataError("the observer has seen no data: feed it at least one boundary batch before asking for ranges")

    def ranges(self, method: str, bits: int):
        """The clip range ``(lo, hi)`` of ``method`` at ``bits`` bits, as :func:`clipping.clip_range` would
        compute it on all the data seen (float32 scalars per tensor, ``[C]`` arrays per channel).

        Raises:
            ConfigError: unknown method.
            CalibrationDataError: nothing was observed yet.
        """
        if method not in METHODS:
            raise ConfigError(f"unknown clip method {method!r}: choose one of {', '.join(METHODS)}")
        bits = check_bits(bits)
        self._require_data()
        per_channel = method in PER_CHANNEL_METHODS
        base = method[:-3] if per_channel else method
        mean, std, mn, mx = self._stats(per_channel)
        if base == "naive":
            lo, hi = mn, mx
        elif base == "aciq":
            lo, hi = clipping.range_about(mean, clipping.laplace_factor(bits) * self._mad(per_channel), mn, mx)
        elif base == "aciq_gauss":
            lo, hi = clipping.range_about(mean, clipping.gaussian_factor(bits) * std, mn, mx)
        elif base == "ds_aciq":
            lo, hi = clipping.range_about(mean, clipping.laplace_factor(bits) * self.ds_aciq_fit(per_channel).b_star, mn, mx)
        else:
            key = ("mse", per_channel, bits)
            if key not in self._cache:
                groups = self._chunks() if per_channel else [None]
                parts = [clipping.mse_search(self._binned(s, clipping.MSE_HIST_BINS), bits) for s in groups]
                self._cache[key] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            lo, hi = self._cache[key]
        lo32, hi32 = np.asarray(lo).astype(np.float32), np.asarray(hi).astype(np.float32)
        return (lo32, hi32) if per_channel else (np.float32(lo32[0]), np.float32(hi32[0]))
