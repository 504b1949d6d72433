"""Metrics that compare T1/PD map estimates with ground truth (plain numpy, no torch).

T1 is in seconds. Every function scores only the voxels selected by a boolean ``mask`` of the
same shape as the maps (2-D or 3-D), and raises ``ValueError`` if the shapes differ or the mask
selects no voxel. Sums and means below run over the mask voxels.

Definitions
-----------
nrmse
    ``sqrt(sum (pred - truth)^2) / sqrt(sum truth^2)``.
ssim
    Structural similarity of Wang et al. (2004), IEEE TIP 13:600:
    ``((2 mu_p mu_t + C1)(2 s_pt + C2)) / ((mu_p^2 + mu_t^2 + C1)(s_p^2 + s_t^2 + C2))`` with
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L`` the data range; local moments from a Gaussian
    window (sigma 1.5 px, truncated at 3.5 sigma, ``mode="reflect"``) per 2-D slice (3-D input:
    slices along the last axis), variances and covariance scaled by ``N/(N-1)`` with ``N`` the
    number of window pixels (scikit-image ``use_sample_covariance=True``); averaged over the mask.
    Both maps are set to 0 outside the mask before filtering.
tissue_bias
    Per tissue label: ``bias = mean(pred - truth)``, ``bias_percent = 100 bias / mean(truth)``.
coverage
    Fraction of voxels with ``|truth - mean| <= k std``, for each ``k``.
std_error_correlation
    Pearson and Spearman (Pearson of average-tie ranks) correlation of ``std`` and ``|error|``.
detection_auc
    ROC area of a score for ``is_bad``: Mann-Whitney ``U / (n_bad n_good)``, ties count 1/2.
detection_rates
    Sensitivity ``TP/n_bad``, specificity ``TN/n_good``, precision ``TP/n_flagged``.
calibration_factor
    The ``target`` quantile of ``|truth - mean| / std`` (voxels with ``std > 0``, all finite).
roi_mean_std
    Mean and sample standard deviation (``ddof=1``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats

__all__ = [
    "nrmse",
    "ssim",
    "ssim_map",
    "tissue_bias",
    "coverage",
    "std_error_correlation",
    "detection_auc",
    "detection_rates",
    "calibration_factor",
    "roi_mean_std",
]

SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_TRUNCATE = 3.5


def _check(mask, *arrays):
    """Return ``mask`` as a boolean array and ``arrays`` as float arrays, after the shape checks."""
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ValueError(f"mask must be boolean, got dtype {mask.dtype}")
    out = [np.asarray(a, dtype=float) for a in arrays]
    for a in out:
        if a.shape != mask.shape:
            raise ValueError(f"shape mismatch: array {a.shape} vs mask {mask.shape}")
    if not mask.any():
        raise ValueError("mask selects no voxel")
    return mask, out


def _pearson(a, b):
    """Pearson correlation; NaN if either input is constant."""
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / den) if den > 0 else float("nan")


def nrmse(pred, truth, mask) -> float:
    """Normalised root-mean-square error over the mask.

    ``nrmse = sqrt(sum (pred - truth)^2) / sqrt(sum truth^2)``, sums over the mask voxels.

    Raises
    ------
    ValueError
        If shapes differ, the mask is empty or ``truth`` is zero over the mask.
    """
    mask, (pred, truth) = _check(mask, pred, truth)
    p, t = pred[mask], truth[mask]
    norm = np.sqrt(np.sum(t * t))
    if norm == 0:
        raise ValueError("truth is zero over the mask; nrmse undefined")
    return float(np.sqrt(np.sum((p - t) ** 2)) / norm)


def ssim_map(pred, truth, mask, data_range=None, sigma: float = 1.5) -> np.ndarray:
    """Local SSIM (Wang et al. 2004) at every voxel; see :func:`ssim`.

    Returns
    -------
    ndarray
        SSIM map of the input shape (values outside the mask are computed but meaningless).
    """
    mask, (pred, truth) = _check(mask, pred, truth)
    if pred.ndim not in (2, 3):
        raise ValueError(f"ssim needs 2-D or 3-D maps, got {pred.ndim}-D")
    if data_range is None:
        t = truth[mask]
        data_range = float(t.max() - t.min())
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be positive and finite, got {data_range}; pass it explicitly")
    if not (np.all(np.isfinite(pred[mask])) and np.all(np.isfinite(truth[mask]))):
        raise ValueError("pred and truth must be finite inside the mask")
    x = np.where(mask, pred, 0.0)
    y = np.where(mask, truth, 0.0)

    sig = (sigma, sigma) if x.ndim == 2 else (sigma, sigma, 0.0)  # 3-D: each slice along the last axis

    def filt(a):
        return ndimage.gaussian_filter(a, sigma=sig, truncate=SSIM_TRUNCATE, mode="reflect")

    win = 2 * int(SSIM_TRUNCATE * sigma + 0.5) + 1  # window width as in scikit-image
    n = win * win
    cov_norm = n / (n - 1.0)
    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def ssim(pred, truth, mask, data_range=None, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) over the mask.

    K1 = 0.01, K2 = 0.03; Gaussian window of ``sigma`` px truncated at 3.5 sigma,
    ``scipy.ndimage.gaussian_filter(mode="reflect")`` per 2-D slice (3-D input: slices along the
    last axis); variances/covariance scaled by N/(N-1) (scikit-image ``use_sample_covariance``).
    ``pred`` and ``truth`` are set to 0 outside the mask before filtering so the background does
    not dominate the local statistics. ``data_range`` defaults to max - min of ``truth`` in the
    mask; pass it explicitly for a result symmetric in ``pred`` and ``truth``.

    Raises
    ------
    ValueError
        If shapes differ, the mask is empty, the maps are not 2-D/3-D or the data range is not
        positive.
    """
    smap = ssim_map(pred, truth, mask, data_range=data_range, sigma=sigma)
    return float(np.mean(smap[np.asarray(mask)]))


def tissue_bias(pred, truth, labels, names: dict[int, str], mask=None) -> dict[str, dict]:
    """Bias of ``pred`` against ``truth`` per tissue label.

    For each ``label -> name`` in ``names``, over voxels with ``labels == label`` (and ``mask``):
    ``mean_truth``, ``mean_pred``, ``bias = mean(pred - truth)``,
    ``bias_percent = 100 (mean_pred - mean_truth) / mean_truth`` and the voxel count ``n``
    (means NaN when ``n == 0``).

    Raises
    ------
    ValueError
        If shapes differ or ``mask`` is given and empty.
    """
    labels = np.asarray(labels)
    if mask is None:
        mask = np.ones(labels.shape, dtype=bool)
    mask, (pred, truth) = _check(mask, pred, truth)
    if labels.shape != mask.shape:
        raise ValueError(f"shape mismatch: labels {labels.shape} vs mask {mask.shape}")
    out = {}
    for label, name in names.items():
        sel = mask & (labels == label)
        n = int(sel.sum())
        if n == 0:
            nan = float("nan")
            out[name] = dict(mean_truth=nan, mean_pred=nan, bias=nan, bias_percent=nan, n=0)
            continue
        mt, mp = float(truth[sel].mean()), float(pred[sel].mean())
        bias = float(np.mean(pred[sel] - truth[sel]))
        pct = 100.0 * (mp - mt) / mt if mt != 0 else float("nan")
        out[name] = dict(mean_truth=mt, mean_pred=mp, bias=bias, bias_percent=pct, n=n)
    return out


def coverage(truth, mean, std, mask, k=(1.0, 2.0)) -> dict[float, float]:
    """Fraction of mask voxels with ``|truth - mean| <= k * std``, for each ``k``.

    For Gaussian errors with correctly predicted ``std``: 0.683 (k=1) and 0.954 (k=2).
    Voxels with non-finite values count as not covered.

    Raises
    ------
    ValueError
        If shapes differ or the mask is empty.
    """
    mask, (truth, mean, std) = _check(mask, truth, mean, std)
    err = np.abs(truth[mask] - mean[mask])
    s = std[mask]
    ks = np.atleast_1d(np.asarray(k, dtype=float))
    return {float(kk): float(np.mean(err <= kk * s)) for kk in ks}


def std_error_correlation(std, abs_error, mask) -> dict[str, float]:
    """Pearson and Spearman correlation of a predicted ``std`` with ``|error|``.

    Spearman is the Pearson correlation of ranks (``scipy.stats.rankdata``, average ties).
    Voxels where either input is non-finite are dropped; NaN if an input is constant.

    Raises
    ------
    ValueError
        If shapes differ, the mask is empty or fewer than 2 finite voxels remain.
    """
    mask, (std, abs_error) = _check(mask, std, abs_error)
    s, e = std[mask], abs_error[mask]
    ok = np.isfinite(s) & np.isfinite(e)
    s, e = s[ok], e[ok]
    if s.size < 2:
        raise ValueError(f"need at least 2 finite voxels, got {s.size}")
    spearman = _pearson(stats.rankdata(s, method="average"), stats.rankdata(e, method="average"))
    return dict(pearson=_pearson(s, e), spearman=spearman)


def detection_auc(score, is_bad, mask) -> float:
    """ROC area of ``score`` (higher = more suspicious) for detecting ``is_bad`` voxels.

    Mann-Whitney: ``AUC = U / (n_bad n_good)`` with ``U`` the number of (bad, good) pairs where the
    bad voxel scores higher, ties counted 1/2. NaN if either class is empty.

    Raises
    ------
    ValueError
        If shapes differ, the mask is empty or a score in the mask is not finite.
    """
    mask, (score,) = _check(mask, score)
    bad = np.asarray(is_bad, dtype=bool)
    if bad.shape != mask.shape:
        raise ValueError(f"shape mismatch: is_bad {bad.shape} vs mask {mask.shape}")
    s, b = score[mask], bad[mask]
    if not np.all(np.isfinite(s)):
        raise ValueError("score must be finite inside the mask")
    n_bad = int(b.sum())
    n_good = b.size - n_bad
    if n_bad == 0 or n_good == 0:
        return float("nan")
    ranks = stats.rankdata(s, method="average")
    u = ranks[b].sum() - n_bad * (n_bad + 1) / 2.0
    return float(u / (n_bad * n_good))


def detection_rates(flag, is_bad, mask) -> dict:
    """Sensitivity, specificity and precision of a boolean ``flag`` for ``is_bad`` voxels.

    ``sensitivity = TP / n_bad``, ``specificity = TN / n_good``, ``precision = TP / n_flagged``
    (NaN when the denominator is 0); also the counts ``n_bad`` and ``n_flagged``.

    Raises
    ------
    ValueError
        If shapes differ or the mask is empty.
    """
    mask = np.asarray(mask)
    flag = np.asarray(flag, dtype=bool)
    bad = np.asarray(is_bad, dtype=bool)
    mask, _ = _check(mask, flag, bad)
    f, b = flag[mask], bad[mask]
    n_bad, n_flagged = int(b.sum()), int(f.sum())
    n_good = b.size - n_bad
    tp, tn = int(np.sum(f & b)), int(np.sum(~f & ~b))

    def ratio(a, d):
        return a / d if d > 0 else float("nan")

    return dict(
        sensitivity=ratio(tp, n_bad),
        specificity=ratio(tn, n_good),
        precision=ratio(tp, n_flagged),
        n_bad=n_bad,
        n_flagged=n_flagged,
    )


def calibration_factor(truth, mean, std, mask, target: float = 0.683) -> float:
    """Factor ``f`` such that a fraction ``target`` of voxels has ``|truth - mean| <= f * std``.

    The ``target`` quantile (``numpy.quantile``, linear) of ``|truth - mean| / std`` over mask
    voxels with finite values and ``std > 0``. ``f > 1`` means ``std`` is too small.

    Raises
    ------
    ValueError
        If shapes differ, the mask is empty, ``target`` is not in (0, 1) or no usable voxel
        remains.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target}")
    mask, (truth, mean, std) = _check(mask, truth, mean, std)
    t, m, s = truth[mask], mean[mask], std[mask]
    ok = np.isfinite(t) & np.isfinite(m) & np.isfinite(s) & (s > 0)
    if not ok.any():
        raise ValueError("no voxel with finite values and std > 0 in the mask")
    z = np.abs(t[ok] - m[ok]) / s[ok]
    return float(np.quantile(z, target))


def roi_mean_std(values, mask) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of ``values`` in the mask.

    The standard deviation is NaN for a single voxel.

    Raises
    ------
    ValueError
        If shapes differ or the mask is empty.
    """
    mask, (values,) = _check(mask, values)
    v = values[mask]
    std = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
    return float(np.mean(v)), std
