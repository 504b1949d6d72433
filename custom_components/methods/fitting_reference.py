"""A plain NumPy RD-NLS-PR fit: the baseline of ``scripts/benchmark_fit.py`` and an independent oracle in the
tests. Not used for mapping (:mod:`custom_components.methods.fitting` is the fit).

RD-NLS-PR (Barral et al. 2010, MRM 64:1057) as it is usually written, vectorised over voxels with NumPy in
float64 and nothing else:

1. Polarity restoration: for every k = 0..N the first k magnitudes are negated (the signed signal is
   monotone in TI, so its sign pattern is "the first k negative").
2. For every k and every T1 of a grid, the amplitudes (a, c) = (PD, PD B) of s = a f1(T1) + c f2(T1) are
   closed form (least squares with the pseudo-inverse of [f1 f2]); the (k, T1) of the lowest residual wins.
3. Gauss-Newton on (a, c, log T1) with that polarity; a step is kept only where it lowers the cost.
4. Rician / noncentral-chi maximum likelihood (optional): majorize-minimize, the data replaced by
   y I_n(y mu / sigma^2) / I_(n-1)(y mu / sigma^2) (scipy's i1e / i0e, or ive) and refitted by Gauss-Newton, round after round.

The signal model and the basis (f1, f2) are those of :mod:`custom_components.physics.signal_model`:
f1 = 1 - exp(-Trec/T1), f2 = exp(-Trec/T1) - exp(-TI/T1) (full recovery: 1, -exp(-TI/T1)).
"""

from __future__ import annotations

import numpy as np
from scipy import special

from ..physics.protocol import Protocol


def _basis(t1: np.ndarray, protocol: Protocol):
    """f1, f2 and their derivatives with respect to log T1, each t1.shape + (N,)."""
    ti = np.asarray(protocol.tis, dtype=float)
    rec = protocol.recovery_times_s()
    t1 = np.asarray(t1, dtype=float)[..., None]
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        e_ti = np.exp(-ti / t1)
        if rec is None:
            return np.ones_like(e_ti), -e_ti, np.zeros_like(e_ti), -(ti / t1) * e_ti
        e_rec = np.exp(-rec / t1)
        return 1.0 - e_rec, e_rec - e_ti, -(rec / t1) * e_rec, (rec / t1) * e_rec - (ti / t1) * e_ti


def _gauss_newton(z: np.ndarray, a, c, u, protocol: Protocol, n_iter: int):
    """Gauss-Newton on sum (a f1 + c f2 - z)^2 over (a, c, u = log T1), z signed (V, N)."""

    def cost(a, c, u):
        f1, f2, _, _ = _basis(np.exp(u), protocol)
        return np.sum((a[:, None] * f1 + c[:, None] * f2 - z) ** 2, axis=1)

    current = cost(a, c, u)
    for _ in range(n_iter):
        f1, f2, d1, d2 = _basis(np.exp(u), protocol)
        r = a[:, None] * f1 + c[:, None] * f2 - z
        jac = np.stack([f1, f2, a[:, None] * d1 + c[:, None] * d2], axis=-1)  # (V, N, 3)
        h = np.einsum("vni,vnj->vij", jac, jac) + 1e-12 * np.eye(3)
        g = np.einsum("vni,vn->vi", jac, r)
        with np.errstate(invalid="ignore", over="ignore"):
            step = np.nan_to_num(-np.linalg.solve(h, g[..., None])[..., 0])
        a2, c2, u2 = a + step[:, 0], c + step[:, 1], np.clip(u + step[:, 2], np.log(0.002), np.log(24.0))
        new = cost(a2, c2, u2)
        keep = new < current
        a, c, u = np.where(keep, a2, a), np.where(keep, c2, c), np.where(keep, u2, u)
        current = np.where(keep, new, current)
    return a, c, u


def reference_fit(y: np.ndarray, protocol: Protocol, t1_grid_s: np.ndarray | None = None, n_gauss_newton: int = 8,
                  noise: str = "gaussian", sigma: float | None = None, n_coils: int = 1, n_ml_iter: int = 15,
                  chunk_size: int = 4096) -> dict[str, np.ndarray]:
    """RD-NLS-PR of magnitude voxels y (V, N). Returns {"T1" (s), "PD", "B"}, each (V,).

    ``t1_grid_s`` defaults to 96 log-spaced values in 4 ms - 12 s (those of the package's fit);
    ``noise`` "gaussian" (least squares), "rician" or "ncchi" (with ``sigma``, ``n_coils``)."""
    y = np.asarray(y, dtype=float)
    n = protocol.n_images
    grid = np.geomspace(0.004, 12.0, 96) if t1_grid_s is None else np.asarray(t1_grid_s, dtype=float)
    f1, f2, _, _ = _basis(grid, protocol)
    basis = np.stack([f1, f2], axis=-1)  # (G, N, 2)
    pinv = np.linalg.pinv(basis)  # (G, 2, N)
    signs = np.where(np.arange(n)[None, :] < np.arange(n + 1)[:, None], -1.0, 1.0)  # (K, N)
    out = {k: np.zeros(len(y)) for k in ("T1", "PD", "B")}
    for s in range(0, len(y), chunk_size):
        yc = y[s:s + chunk_size]
        best = np.full(len(yc), np.inf)
        k_best = np.zeros(len(yc), dtype=int)
        g_best = np.zeros(len(yc), dtype=int)
        for k in range(n + 1):
            zk = yc * signs[k]
            amp = np.einsum("gin,vn->vgi", pinv, zk)  # closed-form (a, c) at every grid T1
            res = np.sum((zk[:, None, :] - np.einsum("gni,vgi->vgn", basis, amp)) ** 2, axis=2)  # (V, G)
            g = np.argmin(res, axis=1)
            r = res[np.arange(len(yc)), g]
            better = r < best
            best, k_best, g_best = np.where(better, r, best), np.where(better, k, k_best), np.where(better, g, g_best)
        z = yc * signs[k_best]
        amp = np.einsum("vin,vn->vi", pinv[g_best], z)
        a, c, u = _gauss_newton(z, amp[:, 0], amp[:, 1], np.log(grid[g_best]), protocol, n_gauss_newton)
        if noise in ("rician", "ncchi"):
            nc = n_coils if noise == "ncchi" else 1
            for _ in range(n_ml_iter):
                f1, f2, _, _ = _basis(np.exp(u), protocol)
                mu = a[:, None] * f1 + c[:, None] * f2
                x = yc * np.abs(mu) / sigma**2
                if nc == 1:  # scipy's order-0/1 functions (its general-order ive is some 30x slower)
                    y_eff = yc * special.i1e(x) / np.maximum(special.i0e(x), 1e-300)
                else:
                    y_eff = yc * special.ive(nc, x) / np.maximum(special.ive(nc - 1, x), 1e-300)
                a, c, u = _gauss_newton(np.where(mu < 0, -y_eff, y_eff), a, c, u, protocol, 2)
        out["T1"][s:s + chunk_size] = np.exp(u)
        out["PD"][s:s + chunk_size] = np.abs(a)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["B"][s:s + chunk_size] = np.where(a != 0, c / a, 0.0)
    return out
