"""Per-row histograms read as piecewise-uniform distributions, and the MSE search on them.

Shared by :func:`quantpipe.quant.clipping.mse_range` (histograms of a raw array) and
:class:`quantpipe.quant.observer.BoundaryObserver` (streaming histograms), so that both search the
same candidates with the same score: the exact quantization MSE of
:func:`~quantpipe.quant.primitives.quantize` / :func:`~quantpipe.quant.primitives.dequantize` under
the assumption that values are uniform within a histogram bin.
"""

from __future__ import annotations

import numpy as np

from quantpipe.quant import primitives
from quantpipe.quant.primitives import check_bits

__all__ = ["MSE_HIST_BINS", "MSE_EXACT_BITS", "MSE_EXACT_COARSE_BITS", "BinnedRows", "histogram_rows", "mse_search"]

#: Bins of the per-row histogram that :func:`quantpipe.quant.clipping.mse_range` searches on.
MSE_HIST_BINS = 2048
#: Up to this bitwidth the MSE search's final rounds score every quantization cell exactly
#: (see BinnedRows.expected_mse); its coarse grid does so up to MSE_EXACT_COARSE_BITS.
MSE_EXACT_BITS = 6
MSE_EXACT_COARSE_BITS = 4


def histogram_rows(rows: np.ndarray, minimum: np.ndarray, maximum: np.ndarray, bins: int) -> np.ndarray:
    """Counts ``[K, bins]`` of each column of ``rows`` [N, K] over equal bins on ``[minimum, maximum]``.

    Like ``np.histogram`` per column (last bin closed), vectorised with one ``bincount``. A constant
    column puts everything in bin 0.
    """
    n, k = rows.shape
    span = maximum - minimum
    scale = np.where(span > 0, bins / np.where(span > 0, span, 1.0), 0.0)
    idx = np.floor((rows - minimum) * scale).astype(np.int64)
    np.clip(idx, 0, bins - 1, out=idx)
    idx += np.arange(k, dtype=np.int64) * bins
    return np.bincount(idx.ravel(), minlength=k * bins).reshape(k, bins).astype(np.float64)


class BinnedRows:
    """Per-row histograms on a regular grid, read as piecewise-uniform distributions.

    Row ``k`` has ``counts[k, j]`` values in bin ``[origin + j*width, origin + (j+1)*width)``, spread
    uniformly over that bin intersected with the row's exact ``[minimum, maximum]`` (so the end bins
    do not leak mass beyond the data). All moments are taken about the row's exact ``mean`` to keep
    float64 cancellation small. This one model serves the raw-array MSE search and every statistic the
    streaming observer derives from its fine histograms (DS-ACIQ's 200-bin histogram, ACIQ's mean
    absolute deviation, the MSE search), so raw and streaming ranges share one definition.

    Args:
        counts: ``[K, bins]`` non-negative counts.
        origin, width: ``[K]`` left edge of bin 0 and bin width (``> 0``).
        minimum, maximum, mean: ``[K]`` exact statistics of each row's data.
    """

    def __init__(self, counts, origin, width, minimum, maximum, mean):
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 2:
            raise ValueError(f"BinnedRows needs counts of shape [rows, bins], got {counts.shape}")
        k, nb = counts.shape
        self.rows, self.bins = k, nb
        self.origin = np.broadcast_to(np.asarray(origin, dtype=np.float64), (k,))
        self.width = np.broadcast_to(np.asarray(width, dtype=np.float64), (k,))
        self.minimum = np.broadcast_to(np.asarray(minimum, dtype=np.float64), (k,))
        self.maximum = np.broadcast_to(np.asarray(maximum, dtype=np.float64), (k,))
        self.mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), (k,))
        if np.any(self.width <= 0) or np.any(self.maximum < self.minimum):
            raise ValueError("BinnedRows needs width > 0 and minimum <= maximum for every row")
        edges = self.origin[:, None] + np.arange(nb + 1) * self.width[:, None]
        np.clip(edges, self.minimum[:, None], self.maximum[:, None], out=edges)
        edges -= self.mean[:, None]
        l, r = edges[:, :-1], edges[:, 1:]
        # One row of this table per bin holds everything a threshold needs from it (one gather in the
        # hot loop of the MSE search): bounds, count, and the count/sum/sum of squares of all bins
        # before it (exclusive prefix sums).
        table = np.empty((k, nb, 6))
        table[..., 0], table[..., 1], table[..., 2] = l, r, counts
        self._ends = np.empty((k, 3))  # count, sum and sum of squares of the whole row
        moments = (counts, counts * (l + r) / 2.0, counts * (l * l + l * r + r * r) / 3.0)
        for i, m in enumerate(moments):
            cs = np.cumsum(m, axis=1)
            table[:, 0, 3 + i] = 0.0
            table[:, 1:, 3 + i] = cs[:, :-1]
            self._ends[:, i] = cs[:, -1]
        self._table = table

    @classmethod
    def from_rows(cls, rows: np.ndarray, bins: int) -> "BinnedRows":
        """Histogram each column of ``rows`` [N, K] over its own ``[min, max]`` with ``bins`` bins."""
        mn, mx = rows.min(axis=0), rows.max(axis=0)
        counts = histogram_rows(rows, mn, mx, bins)
        width = np.where(mx > mn, (mx - mn) / bins, 1.0)  # a constant row: one point mass in bin 0
        return cls(counts, mn, width, mn, mx, rows.mean(axis=0))

    @property
    def total(self) -> np.ndarray:
        """``[K]`` number of values per row."""
        return self._ends[:, 0]

    def partial(self, t: np.ndarray, rows: np.ndarray | slice = slice(None)):
        """Count, sum and sum of squares (about the mean) of the values below ``t``.

        Args:
            t: ``[K', T]`` thresholds, in coordinates relative to each row's mean.
            rows: which rows ``t`` refers to (``K'`` of them).

        Returns:
            three ``[K', T]`` arrays.
        """
        nb = self.bins
        origin = (self.origin[rows] - self.mean[rows])[:, None]
        j = np.floor((t - origin) / self.width[rows][:, None])
        j = np.clip(j, 0, nb - 1).astype(np.intp)
        row_index = np.arange(self.rows)[rows][:, None]
        g = self._table[row_index, j]  # [K', T, 6]
        l, r, n, c0, c1, c2 = (g[..., i] for i in range(6))
        span = r - l
        u = np.clip(t, l, r)
        pos = span > 0
        dens = np.where(pos, n / np.where(pos, span, 1.0), 0.0)
        point = np.where(~pos & (t > l), n, 0.0)  # a degenerate bin is a point mass at l
        p0 = c0 + dens * (u - l) + point
        p1 = c1 + dens * (u * u - l * l) / 2.0 + point * l
        p2 = c2 + dens * (u * u * u - l * l * l) / 3.0 + point * l * l
        return p0, p1, p2

    def mean_abs_dev(self) -> np.ndarray:
        """``[K]`` mean of ``|x - mean|`` (ACIQ's and DS-ACIQ's ``b0``)."""
        _, p1, _ = self.partial(np.zeros((self.rows, 1)))
        return (self._ends[:, 1] - 2.0 * p1[:, 0]) / self.total

    def rebin(self, bins: int) -> np.ndarray:
        """``[K, bins]`` counts on equal bins over each row's exact ``[minimum, maximum]``."""
        k = self.rows
        frac = np.arange(bins + 1) / bins
        edges = (self.minimum - self.mean)[:, None] + (self.maximum - self.minimum)[:, None] * frac
        p0, _, _ = self.partial(edges)
        p0[:, 0], p0[:, -1] = 0.0, self.total  # the outer edges hold everything, closed at the top
        return np.diff(p0, axis=1).reshape(k, bins)

    def expected_mse(
        self, lo: np.ndarray, hi: np.ndarray, bits: int, rows: np.ndarray | slice = slice(None), *, exact: bool | None = None
    ) -> np.ndarray:
        """Mean squared quantization error of each candidate range ``[lo, hi]`` (relative to the mean).

        Uses the quantizer of :mod:`quantpipe.quant.primitives`: level ``k`` sits at ``lo + k*s`` and
        receives every value in ``[lo + (k-1/2)s, lo + (k+1/2)s)`` (the end levels also everything
        clipped), so the error is ``sum_k S2_k - 2 y_k S1_k + y_k^2 N_k`` over those cells, exact for
        piecewise-uniform data. With ``exact=False`` (the default above :data:`MSE_EXACT_BITS` bits)
        the in-range error is the uniform-noise value ``s^2 / 12`` plus the exact clipping error: with
        127 or more steps the density is close to linear within one step, where that value is
        accurate, and it saves the cost of evaluating every cell.

        Args:
            lo, hi: ``[K', T]`` candidate ranges with ``lo <= hi``.
            bits: the bitwidth.
            rows: the rows the candidates belong to.
            exact: score every cell (True) or use the uniform-noise value (False); None: by ``bits``.
        """
        n_levels = primitives.levels(bits)
        exact = bits <= MSE_EXACT_BITS if exact is None else exact
        step = (hi - lo) / n_levels
        total = self.total[rows][:, None]
        if exact:
            kk, tt = lo.shape
            cuts = lo[..., None] + (np.arange(n_levels) + 0.5) * step[..., None]  # [K', T, L]
            p = [a.reshape(kk, tt, n_levels) for a in self.partial(cuts.reshape(kk, -1), rows)]
            ends = (self._ends[rows, 0], self._ends[rows, 1], self._ends[rows, 2])
            cells = []
            for part, end in zip(p, ends):
                full = np.concatenate([np.zeros((kk, tt, 1)), part, np.broadcast_to(end[:, None, None], (kk, tt, 1))], axis=2)
                cells.append(np.diff(full, axis=2))
            y = lo[..., None] + np.arange(n_levels + 1) * step[..., None]
            err = (cells[2] - 2.0 * y * cells[1] + y * y * cells[0]).sum(axis=2)
        else:
            p0l, p1l, p2l = self.partial(lo, rows)
            p0h, p1h, p2h = self.partial(hi, rows)
            below = p2l - 2.0 * lo * p1l + lo * lo * p0l
            s1, s2 = self._ends[rows, 1][:, None], self._ends[rows, 2][:, None]
            above = (s2 - p2h) - 2.0 * hi * (s1 - p1h) + hi * hi * (total - p0h)
            err = below + above + (p0h - p0l) * step * step / 12.0
        return np.maximum(err, 0.0) / total

    def _best(self, lo: np.ndarray, hi: np.ndarray, bits: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the candidate of ``lo``/``hi`` [K, T] with the least expected MSE (chunked)."""
        k, t = lo.shape
        cells = (primitives.levels(bits) + 2) if exact else 2
        chunk = max(1, (1 << 19) // (t * cells))
        err = np.empty((k, t))
        for start in range(0, k, chunk):
            sl = slice(start, min(k, start + chunk))
            err[sl] = self.expected_mse(lo[sl], hi[sl], bits, sl, exact=exact)
        err = np.where(lo <= hi, err, np.inf)
        best = err.argmin(axis=1)
        pick = np.arange(k)
        return lo[pick, best], hi[pick, best]


#: Candidates of the MSE search (see :func:`mse_search`).
MSE_SYMMETRIC = 24
MSE_SIDE = 12
MSE_SIDE_RATIO = 0.73  # 12 fractions from 1 down to 0.73**11 ~ 1/32 of each side's extent
MSE_REFINE = (1.0, 1.0 / 3.0)


def mse_search(dist: BinnedRows, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Search the clip range with the least expected quantization MSE, per row of ``dist``.

    Coordinates are relative to the row's mean; ``umin < 0 < umax`` are the distances to the extremes.
    Why this grid: a unimodal channel's optimum is near-symmetric, but boundary channels with outlier
    tokens are strongly skewed (a bulk within +-1 and a few values at +12), and the 2-bit quantizer,
    which has no level at the centre, gains from asymmetry; a linear grid over ``[umin, umax]`` would
    be far too coarse for the bulk of such a channel. So the candidates are:

    1. symmetric about the mean: ``+-amax * i / 24``, ``i = 1..24``, clipped into ``[umin, umax]``
       (``amax = max(-umin, umax)``; ``i = 24`` is the naive min/max range);
    2. a 12 x 12 grid of ``(umin * g_i, umax * g_j)`` with each side's fraction ``g`` geometric from 1
       down to about 1/32;
    3. two rounds of a 5 x 5 grid moving ``lo`` and ``hi`` independently around the best so far, by
       steps of a fifth of the current distance from the mean and then of a fifteenth.

    218 candidates in all, each scored by :meth:`BinnedRows.expected_mse`: exactly, cell by cell, up to
    4 bits; at 5-6 bits the 168 coarse candidates use the cheap uniform-noise score (a 32-64-level
    quantizer's error is close to it, and the exact rounds that follow fix the detail) and the 50
    refinement candidates the exact one; above 6 bits all use the uniform-noise score. Every candidate
    lies within ``[min, max]``. Returns float64 ``(lo, hi)`` in data coordinates.
    """
    bits = check_bits(bits)
    k = dist.rows
    umin, umax = (dist.minimum - dist.mean)[:, None], (dist.maximum - dist.mean)[:, None]
    amax = np.maximum(np.maximum(-umin, umax), 0.0)
    a = amax * (np.arange(1, MSE_SYMMETRIC + 1) / MSE_SYMMETRIC)
    frac = MSE_SIDE_RATIO ** np.arange(MSE_SIDE)
    lo_grid = np.repeat(np.minimum(umin, 0.0) * frac, MSE_SIDE, axis=1)
    hi_grid = np.tile(np.maximum(umax, 0.0) * frac, (1, MSE_SIDE))
    lo_c = np.clip(np.concatenate([-a, lo_grid], axis=1), umin, umax)
    hi_c = np.clip(np.concatenate([a, hi_grid], axis=1), umin, umax)
    lo, hi = dist._best(lo_c, hi_c, bits, exact=bits <= MSE_EXACT_COARSE_BITS)
    offs = np.arange(-2, 3) / 5.0
    for scale in MSE_REFINE:
        # steps proportional to each end's distance from the mean (at least a 1/120 of amax, so an
        # end sitting at the mean can still move)
        step_lo = np.maximum(np.abs(lo), amax[:, 0] / 120.0) * scale
        step_hi = np.maximum(np.abs(hi), amax[:, 0] / 120.0) * scale
        lo_c = lo[:, None, None] + offs[None, :, None] * step_lo[:, None, None]
        hi_c = hi[:, None, None] + offs[None, None, :] * step_hi[:, None, None]
        lo_c, hi_c = np.broadcast_arrays(lo_c, hi_c)
        lo, hi = dist._best(np.clip(lo_c.reshape(k, -1), umin, umax), np.clip(hi_c.reshape(k, -1), umin, umax), bits, exact=bits <= MSE_EXACT_BITS)
    # lo <= hi holds for the chosen candidate, and clipping both ends into [min, max] keeps it so.
    return np.clip(dist.mean + lo, dist.minimum, dist.maximum), np.clip(dist.mean + hi, dist.minimum, dist.maximum)
