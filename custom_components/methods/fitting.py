"""The classical fit: magnitude inversion-recovery maximum likelihood, vectorised over voxels.

Model (see :mod:`custom_components.physics.signal_model`): for a fixed T1 the signed signal is linear in
(a, c) = (PD, PD B):

    s_n = a f1_n(T1) + c f2_n(T1),  f1 = 1 - e^{-Trec_n/T1},  f2 = e^{-Trec_n/T1} - e^{-TI_n/T1}

(full recovery: f1 = 1, f2 = -e^{-TI_n/T1}). The data are magnitudes y_n = |s_n| + noise.

Algorithm (Barral et al. 2010, RD-NLS-PR, made exhaustive and vectorised):
1. Polarity restoration x log-T1 grid. s_n is monotone in TI (also when TR grows with TI), so the
   sign pattern of the signal is "the first k points negative", k = 0..N. For every k and every T1
   of a log grid the least-squares (a, c) are closed form; the residual of all (k, T1) pairs is one
   matrix product with an orthonormal basis. min over (k, T1) of the signed residual equals the
   global minimum of the magnitude least-squares cost on the grid, because |s - (+-y)| >= ||s| - y|.
2. Gauss-Newton / Levenberg-Marquardt refinement of (a, c, log T1) on the magnitude model.
3. Optional maximum likelihood for magnitude noise (``noise="rician"``: one coil;
   ``noise="ncchi"``: root-sum-of-squares over ``n_coils``): majorize-minimize, replacing the data by
   y I_n(y mu / sigma^2) / I_{n-1}(y mu / sigma^2) (mu = current |s|, n = n_coils) and refitting; the
   stationary point is the ML estimate. This removes the noise-floor bias at low SNR and near the null.

Returns T1 (s), PD, B = c / a (2 = ideal inversion) and the RMS residual. Works on any array
(..., N) in chunks with a progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import special

from ..physics.protocol import Protocol

T1_GRID_RANGE_S = (0.004, 12.0)


@dataclass
class IRFit:
    """Maps of a fit, each shaped like the data without its inversion axis."""

    t1: np.ndarray  # s
    pd: np.ndarray  # same units as the data
    b: np.ndarray  # inversion efficiency (2 = ideal)
    residual: np.ndarray  # RMS of |s(theta)| - y over the inversion times, data units
    mask: np.ndarray
    protocol: Protocol
    info: dict = field(default_factory=dict)

    @property
    def maps(self) -> dict[str, np.ndarray]:
        return {"T1": self.t1, "PD": self.pd, "B": self.b}

    def predict(self) -> np.ndarray:
        """Magnitude images re-synthesised from the maps, inversion on the last axis."""
        f1, f2 = _basis(self.t1[..., None], self.protocol)
        return np.abs(self.pd[..., None] * f1 + self.pd[..., None] * self.b[..., None] * f2)


def _basis(t1, protocol: Protocol):
    """f1, f2 of the linear-in-(a, c) form, broadcast over t1[..., None] x TI."""
    ti = protocol.tis
    rec = protocol.recovery_times_s()
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        e_ti = np.exp(-ti / t1)
        if rec is None:
            return np.ones_like(e_ti), -e_ti
        e_rec = np.exp(-rec / t1)
    return 1.0 - e_rec, e_rec - e_ti


def _basis_derivs(t1, protocol: Protocol):
    """(f1, f2, T1 df1/dT1, T1 df2/dT1) -- derivatives with respect to log T1."""
    ti = protocol.tis
    rec = protocol.recovery_times_s()
    e_ti = np.exp(-ti / t1)
    if rec is None:
        f1 = np.ones_like(e_ti)
        return f1, -e_ti, np.zeros_like(e_ti), -(ti / t1) * e_ti
    e_rec = np.exp(-rec / t1)
    return 1.0 - e_rec, e_rec - e_ti, -(rec / t1) * e_rec, (rec / t1) * e_rec - (ti / t1) * e_ti


def cofactors_sym3(h00, h01, h02, h11, h12, h22):
    """Cofactors (c00, c01, c02, c11, c12, c22) and determinant of symmetric 3x3 matrices, elementwise
    (numpy arrays or torch tensors): H^-1 = C / det."""
    c00 = h11 * h22 - h12 * h12
    c01 = h02 * h12 - h01 * h22
    c02 = h01 * h12 - h02 * h11
    c11 = h00 * h22 - h02 * h02
    c12 = h01 * h02 - h00 * h12
    c22 = h00 * h11 - h01 * h01
    return c00, c01, c02, c11, c12, c22, h00 * c00 + h01 * c01 + h02 * c02


def _solve_sym3(h00, h01, h02, h11, h12, h22, b0, b1, b2):
    """Solve the symmetric 3x3 systems H x = b voxel-wise by cofactors (no step where singular)."""
    c00, c01, c02, c11, c12, c22, det = cofactors_sym3(h00, h01, h02, h11, h12, h22)
    ok = np.abs(det) > 1e-300
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    x0 = (c00 * b0 + c01 * b1 + c02 * b2) * inv
    x1 = (c01 * b0 + c11 * b1 + c12 * b2) * inv
    x2 = (c02 * b0 + c12 * b1 + c22 * b2) * inv
    return np.nan_to_num(x0), np.nan_to_num(x1), np.nan_to_num(x2)


class InversionRecoveryModel:
    """``InversionRecoveryModel(protocol).fit(data)`` -> :class:`IRFit` (dipy-style).

    Args:
        protocol: the acquisition (inversion times in s, TR per image or None).
        n_grid: number of log-spaced T1 grid values in ``t1_range_s``.
        t1_range_s: (min, max) of the T1 grid in s.
        n_gauss_newton: refinement iterations after the grid search.
        b_range: physically admissible inversion efficiency for the grid search (2 = ideal; the
            refinement is unconstrained so noise can still push B slightly outside).
    """

    def __init__(self, protocol: Protocol, n_grid: int = 96, t1_range_s=T1_GRID_RANGE_S,
                 n_gauss_newton: int = 8, b_range: tuple[float, float] = (0.0, 3.0)):
        self.protocol = protocol
        self.n_grid = int(n_grid)
        self.t1_range_s = (float(t1_range_s[0]), float(t1_range_s[1]))
        self.n_gauss_newton = int(n_gauss_newton)
        self.b_range = (float(b_range[0]), float(b_range[1]))
        self.t1_grid = np.geomspace(*self.t1_range_s, self.n_grid)
        self._projector_t = torch.from_numpy(self._build_projector())

    # ------------------------------------------------------------------ grid search
    def _build_projector(self) -> np.ndarray:
        """W (N, 2*K*G): columns D_k Q_g[:, i] ordered (i, k, g), Q_g R_g = [f1 f2] at T1 = grid[g].

        Also keeps R_g^{-1} so that (a, c) = R_g^{-1} Q_g^T D_k y can be checked for a physical B.
        """
        n = self.protocol.n_images
        f1, f2 = _basis(self.t1_grid[:, None], self.protocol)  # (G, N)
        a = np.stack([f1, f2], axis=-1)  # (G, N, 2)
        q, r = np.linalg.qr(a)  # (G, N, 2), (G, 2, 2)
        # A grid T1 so far below the TIs that exp(-TI/T1) vanishes at every TI leaves [f1 f2] rank 1: the
        # images cannot tell that T1 from any shorter one, and R_g is singular. Such grid values get no
        # projection (zero energy: never chosen where another value explains any of the signal).
        degenerate = np.abs(r[:, 1, 1]) <= 1e-7 * np.abs(r[:, 0, 0])
        r = np.where(degenerate[:, None, None], np.eye(2), r)
        q = np.where(degenerate[:, None, None], 0.0, q)
        rinv = np.linalg.inv(r)  # upper triangular
        rinv = np.where(degenerate[:, None, None], 0.0, rinv)
        k1 = n + 1
        self._rinv_t = [torch.from_numpy(np.tile(rinv[:, i, j], k1).astype(np.float32)) for i, j in ((0, 0), (0, 1), (1, 1))]
        signs = np.ones((n + 1, n))
        for k in range(n + 1):
            signs[k, :k] = -1.0
        w = signs[:, None, :, None] * q[None]  # (K, G, N, 2)
        # columns ordered (component, k, g) so that the two halves are contiguous
        return np.ascontiguousarray(w.transpose(2, 3, 0, 1).reshape(n, -1)).astype(np.float32)

    def grid_search(self, y: np.ndarray):
        """Two polarity/T1 candidates per voxel from the exhaustive grid, for voxels y (V, N).

        For every pattern k (first k points negative) and grid T1 the projection energy
        ||Q_g^T D_k y||^2 is computed (the residual is ||y||^2 minus it). Candidate 1 is the global
        best (k1, T1); candidate 2 the best T1 of the better neighbouring pattern k1 -+ 1 (the null
        may sit on either side of the TI nearest to it, which a coarse grid can confuse).
        Candidates whose closed-form B = c / a lies outside ``b_range`` are excluded: without
        this, very short T1 (null before the first TI) has a near-degenerate twin with B >> 2.

        Candidate 2 is kept only where refinement could make it win: its grid residual exceeds the
        best one's by less than the energy drop to its grid neighbours (else k2 = k1).

        Returns (k1, t1_1, k2, t1_2), each (V,).
        """
        v, n = y.shape
        g = self.n_grid
        with torch.no_grad():
            yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
            p = yt @ self._projector_t  # (V, 2*K*G): Q_g^T D_k y
            half = p.shape[1] // 2
            p0, p1 = p[:, :half], p[:, half:]
            energy = (p0 * p0).addcmul_(p1, p1).view(v, n + 1, g)  # ||Q_g^T D_k y||^2
            e_best, g_best = energy.max(dim=2)
            k1, k2 = self._candidates(e_best)
            # B = c / a of the two candidates; (a, c) = R_g^{-1} Q_g^T D_k y
            r00, r01, r11 = self._rinv_t
            bmin, bmax = self.b_range

            def unphysical(k):
                col = g_best.gather(1, k[:, None]) + k[:, None] * g
                q0, q1 = p0.gather(1, col)[:, 0], p1.gather(1, col)[:, 0]
                col = col[:, 0]
                a = q0 * r00[col] + q1 * r01[col]
                c = q1 * r11[col]
                return (c - bmin * a) * (bmax * a - c) < 0

            # the second candidate only matters where its grid residual is comparable to the best one's
            y2 = (yt * yt).sum(1)
            r1 = y2 - e_best.gather(1, k1[:, None])[:, 0]
            r2 = y2 - e_best.gather(1, k2[:, None])[:, 0]
            # Refining candidate 2 can lower its grid residual by at most about the energy drop to its
            # grid neighbours (peak of a smooth function sampled on the grid): skip it where even that
            # cannot beat candidate 1.
            g2 = g_best.gather(1, k2[:, None])
            e2 = energy.view(v, -1)
            base = k2[:, None] * g
            lo = e2.gather(1, base + (g2 - 1).clamp(min=0))[:, 0]
            hi = e2.gather(1, base + (g2 + 1).clamp(max=g - 1))[:, 0]
            gain2 = (e_best.gather(1, k2[:, None])[:, 0] - torch.minimum(lo, hi)).clamp(min=0)
            bad = unphysical(k1) | unphysical(k2)
            k2 = torch.where(r2 - r1 <= gain2 + 1e-6 * y2, k2, k1)
            if bool(bad.any()):  # rare (T1 near or below the first TI): redo those voxels with the constraint
                idx = torch.nonzero(bad)[:, 0]
                pp0, pp1 = p0[idx], p1[idx]
                aa = pp0 * r00 + pp1 * r01
                cc = pp1 * r11
                ok = (cc - bmin * aa) * (bmax * aa - cc) >= 0
                en = torch.where(ok, energy[idx].reshape(len(idx), -1), torch.full_like(aa, -1.0)).view(len(idx), n + 1, g)
                eb, gb = en.max(dim=2)
                g_best[idx] = gb
                k1[idx], k2[idx] = self._candidates(eb)  # both refined for these voxels
            t1_1 = self.t1_grid[g_best.gather(1, k1[:, None])[:, 0].numpy()]
            t1_2 = self.t1_grid[g_best.gather(1, k2[:, None])[:, 0].numpy()]
        return k1.numpy(), t1_1, k2.numpy(), t1_2

    @staticmethod
    def _candidates(e_best: torch.Tensor):
        """k1 = argmax_k, k2 = the better of k1 - 1 and k1 + 1 (within 0..N)."""
        v, k = e_best.shape
        k1 = torch.argmax(e_best, dim=1)
        lo = torch.where(k1 > 0, e_best.gather(1, (k1 - 1).clamp(min=0)[:, None])[:, 0], torch.tensor(-np.inf))
        hi = torch.where(k1 < k - 1, e_best.gather(1, (k1 + 1).clamp(max=k - 1)[:, None])[:, 0], torch.tensor(-np.inf))
        k2 = torch.where(lo >= hi, k1 - 1, k1 + 1).clamp(0, k - 1)
        return k1, k2

    def _closed_form(self, ys: np.ndarray, t1: np.ndarray):
        """Least-squares (a, c) for signed data ys (V, N) at T1 (V,): 2x2 normal equations."""
        f1, f2 = _basis(t1[:, None], self.protocol)
        s11 = np.einsum("vn,vn->v", f1, f1)
        s12 = np.einsum("vn,vn->v", f1, f2)
        s22 = np.einsum("vn,vn->v", f2, f2)
        r1 = np.einsum("vn,vn->v", f1, ys)
        r2 = np.einsum("vn,vn->v", f2, ys)
        det = s11 * s22 - s12**2
        det = np.where(np.abs(det) < 1e-300, 1e-300, det)
        return (s22 * r1 - s12 * r2) / det, (s11 * r2 - s12 * r1) / det

    def _signs(self, k: np.ndarray) -> np.ndarray:
        return np.where(np.arange(self.protocol.n_images)[None, :] < k[:, None], -1.0, 1.0)

    # ------------------------------------------------------------------ refinement
    def _refine(self, y: np.ndarray, a, c, u, n_iter: int, signs: np.ndarray | None = None):
        """Levenberg-Marquardt on the least-squares cost in (a, c, u = log T1).

        With ``signs`` (V, N) the polarity is fixed (a smooth problem: sum (s - signs y)^2); without,
        the magnitude cost sum (|s| - y)^2 is used with the current model's signs.
        """
        lo, hi = np.log(self.t1_range_s[0] / 2), np.log(self.t1_range_s[1] * 2)
        lam = np.full(a.shape, 1e-3)
        cost = self._cost(y, a, c, u, signs)
        for _ in range(n_iter):
            t1 = np.exp(u)[:, None]
            f1, f2, d1, d2 = _basis_derivs(t1, self.protocol)
            s = a[:, None] * f1 + c[:, None] * f2
            if signs is None:
                sg = np.sign(s)
                sg[sg == 0] = 1.0
            else:
                sg = signs
            r = sg * s - y
            j0, j1, j2 = sg * f1, sg * f2, sg * (a[:, None] * d1 + c[:, None] * d2)  # Jacobian columns (V, N)
            damp = 1.0 + lam
            h00, h11, h22 = (j0 * j0).sum(1) * damp + 1e-18, (j1 * j1).sum(1) * damp + 1e-18, (j2 * j2).sum(1) * damp + 1e-18
            h01, h02, h12 = (j0 * j1).sum(1), (j0 * j2).sum(1), (j1 * j2).sum(1)
            g0, g1, g2 = (j0 * r).sum(1), (j1 * r).sum(1), (j2 * r).sum(1)
            step = _solve_sym3(h00, h01, h02, h11, h12, h22, -g0, -g1, -g2)
            a2, c2, u2 = a + step[0], c + step[1], np.clip(u + step[2], lo, hi)
            cost2 = self._cost(y, a2, c2, u2, signs)
            better = cost2 <= cost
            a = np.where(better, a2, a)
            c = np.where(better, c2, c)
            u = np.where(better, u2, u)
            cost = np.where(better, cost2, cost)
            lam = np.where(better, lam * 0.3, lam * 10.0)
            if np.all(np.abs(step[2]) < 1e-7) and np.all(np.abs(step[0]) <= 1e-7 * np.abs(a) + 1e-300):
                break  # converged everywhere
        return a, c, u

    def _cost(self, y, a, c, u, signs=None):
        f1, f2 = _basis(np.exp(u)[:, None], self.protocol)
        s = a[:, None] * f1 + c[:, None] * f2
        return np.sum(((np.abs(s) if signs is None else signs * s) - y) ** 2, axis=1)

    def _fit_voxels(self, y: np.ndarray, noise: str, sigma, n_coils: int, n_ml_iter: int):
        """Grid search, then fixed-polarity refinement of both candidates of :meth:`grid_search`;
        the one with the lower magnitude cost wins."""
        k1, t1_1, k2, t1_2 = self.grid_search(y)
        sg = self._signs(k1)
        a, c = self._closed_form(sg * y, t1_1)
        a, c, u = self._refine(y, a, c, np.log(t1_1), self.n_gauss_newton, signs=sg)
        best = [a, c, u, self._cost(y, a, c, u)]
        two = np.nonzero(k2 != k1)[0]
        if len(two):
            y2, sg2 = y[two], self._signs(k2[two])
            a, c = self._closed_form(sg2 * y2, t1_2[two])
            a, c, u = self._refine(y2, a, c, np.log(t1_2[two]), self.n_gauss_newton, signs=sg2)
            cost = self._cost(y2, a, c, u)
            take = cost < best[3][two]
            for arr, new in zip(best, (a, c, u, cost)):
                arr[two[take]] = new[take]
        a, c, u, _ = best
        if noise in ("rician", "ncchi"):
            a, c, u = self._ml_refine(y, a, c, u, sigma, n_coils if noise == "ncchi" else 1, n_ml_iter)
        t1 = np.exp(u)
        f1, f2 = _basis(t1[:, None], self.protocol)
        res = np.sqrt(np.mean((np.abs(a[:, None] * f1 + c[:, None] * f2) - y) ** 2, axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(np.abs(a) > 0, c / a, 0.0)
        # (a, c) and (-a, -c) give the same magnitude: report PD >= 0
        a = np.abs(a)
        return t1, a, b, res

    def _ml_refine(self, y, a, c, u, sigma, n_coils, n_iter):
        """Majorize-minimize for Rician (n_coils=1) / noncentral-chi (RSS of n_coils) likelihoods."""
        sigma = np.asarray(sigma, dtype=float)
        if sigma.ndim == 1:
            sigma = sigma[:, None]
        s2 = np.maximum(sigma, 1e-12) ** 2
        for _ in range(n_iter):
            f1, f2 = _basis(np.exp(u)[:, None], self.protocol)
            mu = np.abs(a[:, None] * f1 + c[:, None] * f2)
            z = y * mu / s2
            # ratio I_n(z) / I_{n-1}(z) with exponentially scaled Bessel functions (stable for large z)
            ratio = special.ive(n_coils, z) / np.maximum(special.ive(n_coils - 1, z), 1e-300)
            y_eff = y * ratio
            a, c, u = self._refine(y_eff, a, c, u, 2)
        return a, c, u

    # ------------------------------------------------------------------ public
    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, noise: str = "gaussian",
            sigma: float | np.ndarray | None = None, n_coils: int = 1, n_ml_iter: int = 15,
            chunk_size: int = 20000, progress: bool = False) -> IRFit:
        """Fit every voxel of ``data`` (..., N) (inversion on the last axis, magnitude).

        Args:
            mask: boolean (...) of voxels to fit (others get 0); default: all voxels.
            noise: "gaussian" (least squares), "rician" (one coil) or "ncchi" (RSS of ``n_coils``).
            sigma: noise std per real channel, needed for "rician"/"ncchi" (a scalar, or per voxel);
                see :func:`estimate_noise_sigma`.
        """
        data = np.asarray(data, dtype=float)
        n = self.protocol.n_images
        if data.shape[-1] != n:
            raise ValueError(f"data has {data.shape[-1]} images on its last axis, the protocol {n} inversion times")
        if noise not in ("gaussian", "rician", "ncchi"):
            raise ValueError(f"noise must be 'gaussian', 'rician' or 'ncchi', got {noise!r}")
        if noise != "gaussian" and sigma is None:
            raise ValueError(f"noise={noise!r} needs sigma (see estimate_noise_sigma)")
        shape = data.shape[:-1]
        if mask is None:
            mask = np.ones(shape, dtype=bool)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match the image shape {shape}")
        y = data[mask]
        sig = None
        if sigma is not None:
            sig = np.broadcast_to(np.asarray(sigma, dtype=float), shape)[mask]
        out = [np.zeros(len(y)) for _ in range(4)]
        starts = range(0, len(y), chunk_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="fit", unit="chunk", total=(len(y) + chunk_size - 1) // chunk_size)
        for s in starts:
            sl = slice(s, s + chunk_size)
            res = self._fit_voxels(y[sl], noise, None if sig is None else sig[sl], n_coils, n_ml_iter)
            for o, r in zip(out, res):
                o[sl] = r
        maps = []
        for o in out:
            m = np.zeros(shape)
            m[mask] = o
            maps.append(m)
        info = {"method": "mle" if noise != "gaussian" else "least_squares", "noise": noise,
                "n_coils": n_coils, "t1_grid_s": [self.t1_range_s[0], self.t1_range_s[1], self.n_grid]}
        if sigma is not None:
            info["sigma"] = float(np.median(sig)) if sig is not None and sig.size else None
        return IRFit(t1=maps[0], pd=maps[1], b=maps[2], residual=maps[3], mask=mask,
                     protocol=self.protocol, info=info)


def fit_ir(data, protocol: Protocol, **kw) -> IRFit:
    """Shorthand for ``InversionRecoveryModel(protocol).fit(data, **kw)``."""
    model_kw = {k: kw.pop(k) for k in ("n_grid", "t1_range_s", "n_gauss_newton", "b_range") if k in kw}
    return InversionRecoveryModel(protocol, **model_kw).fit(data, **kw)


def estimate_noise_sigma(data: np.ndarray, n_coils: int = 1, background: np.ndarray | None = None) -> float:
    """Noise std per real channel from signal-free background voxels of magnitude data (..., N).

    In the background the magnitude of an RSS over n coils has E[y^2] = 2 n sigma^2 (Rayleigh for
    n = 1), so sigma = sqrt(mean(y^2) / (2 n)). Without a given ``background`` mask, the background
    is taken as the voxels whose maximum over inversion times is below 3x the median of the lowest
    decile of that maximum (robust when a large part of the field of view is empty).
    """
    data = np.asarray(data, dtype=float)
    vmax = data.max(axis=-1)
    if background is None:
        low = np.quantile(vmax, 0.10)
        floor = np.median(vmax[vmax <= low]) if np.any(vmax <= low) else low
        background = (vmax <= 3.0 * floor) & (vmax > 0)
        if background.sum() < 50:
            raise ValueError("cannot estimate the noise level: no signal-free background found; give sigma")
    y = data[np.asarray(background, dtype=bool)]
    return float(np.sqrt(np.mean(y**2) / (2.0 * n_coils)))


def residual_noise_sigma(data: np.ndarray, protocol: Protocol, max_voxels: int = 20000, seed: int = 0) -> float:
    """Noise std of magnitude data (..., N) from the classical fit's residuals, where there is no background.

    The least-squares fit of a voxel with N >= 4 images leaves N - 3 degrees of freedom, so at high SNR
    (magnitude noise about Gaussian) E[N rms^2 / (N - 3)] = sigma^2 with rms the fit's RMS residual. The
    estimate is the median of N rms^2 / (N - 3) over the brightest fifth of the voxels (at most
    ``max_voxels``, drawn with ``seed``), divided by the median of chi2_k / k (k = N - 3), then the square
    root. Model errors (echo-train blurring, partial volume) add to the residual, so it errs on the high side. Raises
    ValueError for fewer than 4 images (no degree of freedom left) or fewer than 50 bright voxels."""
    from scipy import stats

    data = np.asarray(data, dtype=float)
    n = data.shape[-1]
    if n < 4:
        raise ValueError(f"cannot estimate the noise level from the fit's residuals with {n} images (need 4 or more); give sigma")
    y = data.reshape(-1, n)
    vmax = y.max(axis=1)
    bright = np.nonzero(vmax >= np.quantile(vmax, 0.8))[0]
    if bright.size < 50:
        raise ValueError("cannot estimate the noise level: too few voxels with signal; give sigma")
    if bright.size > max_voxels:
        bright = np.random.default_rng(seed).choice(bright, max_voxels, replace=False)
    fit = InversionRecoveryModel(protocol).fit(y[bright])
    k = n - 3
    ratio = n * np.asarray(fit.residual, float) ** 2 / k  # ~ sigma^2 chi2_k / k
    return float(np.sqrt(np.median(ratio) / (stats.chi2.median(k) / k)))


def noise_floor(n_coils: int = 1) -> float:
    """Mean magnitude of noise alone, in units of the per-channel std sigma: the mean of a chi
    distribution with 2 n_coils degrees of freedom, sqrt(2) Gamma(n + 1/2) / Gamma(n) (root-sum-of-squares
    of n_coils complex channels; 1 coil: the Rayleigh mean sqrt(pi / 2) = 1.2533; 8 coils: 3.99; 32: 7.98)."""
    n = int(n_coils)
    return float(np.sqrt(2.0) * np.exp(special.gammaln(n + 0.5) - special.gammaln(n)))


def signal_threshold(sigma: float, n_coils: int = 1, factor: float = 5.0) -> float:
    """The magnitude above which a voxel has signal: ``factor`` sigma for one coil, and for root-sum-of-squares
    data of ``n_coils`` coils the same margin above their higher noise floor, sigma (factor + noise_floor(n)
    - noise_floor(1)). A fixed 5 sigma would count the background of 8 or more coils as signal (its mean
    is 4-8 sigma)."""
    return float(sigma) * (float(factor) + noise_floor(n_coils) - noise_floor(1))


def signal_mask(data: np.ndarray, sigma: float | None = None, factor: float = 5.0, n_coils: int = 1) -> np.ndarray:
    """Voxels with signal: maximum over inversion times above :func:`signal_threshold` (``factor`` x sigma
    for one coil; the noise floor of ``n_coils`` root-sum-of-squares coils accounted for).

    Without ``sigma``, a fraction (5 %) of the robust maximum is used as the threshold.
    """
    data = np.asarray(data, dtype=float)
    vmax = data.max(axis=-1)
    if sigma is not None:
        thr = signal_threshold(sigma, n_coils, factor)
    else:
        thr = 0.05 * np.quantile(vmax, 0.99)
    return vmax > thr


__all__ = ["IRFit", "InversionRecoveryModel", "fit_ir", "estimate_noise_sigma", "noise_floor", "signal_mask",
           "signal_threshold", "T1_GRID_RANGE_S"]
