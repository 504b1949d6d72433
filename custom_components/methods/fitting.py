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
2. Levenberg-Marquardt refinement of (a, c, log T1) with that polarity (and with the neighbouring
   pattern where it could win), from the grid point; the grid is coarse (48 values, 18 % apart) because
   the refinement converges from there in a few steps. A voxel leaves the loop once its step is below
   ``tol_ls`` (1e-4 in log T1: T1 to 0.01 %, far below any noise).
3. Optional maximum likelihood for magnitude noise (``noise="rician"``: one coil;
   ``noise="ncchi"``: root-sum-of-squares over ``n_coils``): majorize-minimize, replacing the data by
   y I_n(y mu / sigma^2) / I_{n-1}(y mu / sigma^2) (mu = current |s|, n = n_coils) before each
   Levenberg-Marquardt step; the stationary point is the ML estimate. This removes the noise-floor bias
   at low SNR and near the null. A voxel stops once a round moves it by less than ``tol_ml``.

Speed: every step is a handful of batched torch operations over a block of voxels, image-major, in
float32 (voxels whose float32 steps stall, a T1 the TIs barely see, are redone in float64), on the CPU
or a GPU (``device``). ``scripts/benchmark_fit.py`` measures it against a plain NumPy RD-NLS-PR
(:mod:`custom_components.methods.fitting_reference`) on the same voxels; docs/benchmark_fit.md.

Returns T1 (s), PD, B = c / a (2 = ideal inversion) and the RMS residual. Works on any array
(..., N) (a slice or a whole volume) in blocks, with one progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import special

from ..physics.protocol import Protocol

T1_GRID_RANGE_S = (0.004, 12.0)
#: Settings of a reproducible fit: 96 grid values, float64, every refinement run to its end. The default fit
#: (48 values, float32, early stopping) stops inside a flat valley (a T1 the TIs do not determine) at a point
#: that moves with the rounding of the input; what starts from the fit and was tuned on the earlier float64
#: fit (the learned models' condition, the TV fit's start) uses these: ``InversionRecoveryModel(p, **PRECISE_FIT)``.
PRECISE_FIT = {"n_grid": 96, "dtype": torch.float64, "tol_ls": 1e-9, "tol_ml": 1e-7}
#: voxels per block of the grid search (measured fastest on a 2-core CPU: 4096, 1.5 us per voxel; 16384: 2.2 us)
GRID_BLOCK_VOXELS = 4096


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


def solve_sym3(h00, h01, h02, h11, h12, h22, b0, b1, b2):
    """Solve the symmetric 3x3 systems H x = b voxel-wise by cofactors (torch tensors; x = 0 where H is
    singular). The fit's Levenberg-Marquardt steps and the Diffusor's data-consistency step use it."""
    c00, c01, c02, c11, c12, c22, det = cofactors_sym3(h00, h01, h02, h11, h12, h22)
    ok = det.abs() > torch.finfo(det.dtype).tiny
    inv = torch.where(ok, 1.0 / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    x0 = (c00 * b0 + c01 * b1 + c02 * b2) * inv
    x1 = (c01 * b0 + c11 * b1 + c12 * b2) * inv
    x2 = (c02 * b0 + c12 * b1 + c22 * b2) * inv
    return torch.nan_to_num(x0), torch.nan_to_num(x1), torch.nan_to_num(x2)


#: above it :func:`bessel_ratio` (n = 1) uses its asymptotic series instead of torch's Bessel functions
RICIAN_ASYMPTOTIC_Z = 20.0


def bessel_ratio(n: int, z: torch.Tensor, k: int = 16) -> torch.Tensor:
    """I_n(z) / I_(n-1)(z) elementwise for z >= 0 (the factor of the Rician / noncentral-chi majorizer, in the
    fit and in the Diffusor's data-consistency step).

    n = 1 (Rician): torch's exponentially scaled i1e / i0e for z < ``RICIAN_ASYMPTOTIC_Z`` and the asymptotic
    series 1 - 1/(2z) - 1/(8z^2) - 1/(8z^3) - 25/(128z^4) - 13/(32z^5) above (relative error below 2e-8
    there, under float32's resolution; torch's i0e is several times slower than i1e, and the signal voxels
    of an image have z = y |s| / sigma^2 of order SNR^2, so most need no Bessel function). n > 1
    (noncentral chi): where z > n^2 / 2, the upward recurrence r_(m+1) = 1 / r_m - 2 m / z from r_1 (stable
    there: |r| near 1); elsewhere the backward recurrence r_m = z / (2 m + z r_(m+1)) from the Amos-type
    start r_(n+k) = z / (n + k - 1/2 + sqrt((n + k + 1/2)^2 + z^2)) (contracting for small z). Relative
    error against scipy's ive below 1e-5 for n <= 32 and 1e-4 <= z <= 1e6 (tests/test_fitting.py,
    tests/test_data_consistency.py)."""
    x = 1.0 / z.clamp_min(RICIAN_ASYMPTOTIC_Z)
    r1 = 1 - x * (0.5 + x * (0.125 + x * (0.125 + x * (25 / 128 + x * (13 / 32)))))
    small = z < RICIAN_ASYMPTOTIC_Z
    if bool(small.any()):
        zs = z[small]
        r1 = r1.masked_scatter(small, torch.special.i1e(zs) / torch.special.i0e(zs).clamp_min(1e-30))
    if n == 1:
        return r1
    v = n + k
    rb = z / (v - 0.5 + torch.sqrt((v + 0.5) ** 2 + z * z))
    for m in range(v - 1, n - 1, -1):
        rb = z / (2 * m + z * rb)
    zs = z.clamp(min=torch.finfo(z.dtype).tiny)
    ru = r1
    for m in range(1, n):
        ru = 1.0 / ru - 2 * m / zs
    return torch.where(z > 0.5 * n * n, ru, rb)


class InversionRecoveryModel:
    """``InversionRecoveryModel(protocol).fit(data)`` -> :class:`IRFit` (dipy-style).

    Args:
        protocol: the acquisition (inversion times in s, TR per image or None).
        n_grid: number of log-spaced T1 grid values in ``t1_range_s``.
        t1_range_s: (min, max) of the T1 grid in s.
        n_gauss_newton: at most this many refinement iterations after the grid search.
        b_range: physically admissible inversion efficiency for the grid search (2 = ideal; the
            refinement is unconstrained so noise can still push B slightly outside).
        device: where the fit runs (cpu, cuda, cuda:N).
        dtype: torch.float32 (default; stalled voxels are redone in float64) or torch.float64.
        tol_ls, tol_ml: a voxel's least-squares refinement (its ML rounds) stop once a step moves log T1
            by less than this and PD, PD B by less than this relative.
    """

    def __init__(self, protocol: Protocol, n_grid: int = 48, t1_range_s=T1_GRID_RANGE_S,
                 n_gauss_newton: int = 8, b_range: tuple[float, float] = (0.0, 3.0), device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, tol_ls: float = 1e-4, tol_ml: float = 1e-4):
        self.protocol = protocol
        self.n_grid = int(n_grid)
        self.t1_range_s = (float(t1_range_s[0]), float(t1_range_s[1]))
        self.n_gauss_newton = int(n_gauss_newton)
        self.tol_ls, self.tol_ml = float(tol_ls), float(tol_ml)
        self.b_range = (float(b_range[0]), float(b_range[1]))
        self.device = torch.device(device)
        self.dtype = dtype
        self.t1_grid = np.geomspace(*self.t1_range_s, self.n_grid)
        self._projector_t = torch.from_numpy(self._build_projector()).to(self.device, self.dtype)
        self._rinv_t = [x.to(self.device, self.dtype) for x in self._rinv_t]
        self._grid_u_t = torch.as_tensor(np.log(self.t1_grid), dtype=self.dtype, device=self.device)
        self._u_bounds = (float(np.log(self.t1_range_s[0] / 2)), float(np.log(self.t1_range_s[1] * 2)))
        self._ti_t = torch.as_tensor(protocol.tis, dtype=self.dtype, device=self.device)[:, None]
        rec = protocol.recovery_times_s()
        self._rec_t = None if rec is None else torch.as_tensor(rec, dtype=self.dtype, device=self.device)[:, None]

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
        self._rinv_t = [torch.from_numpy(np.tile(rinv[:, i, j], k1)) for i, j in ((0, 0), (0, 1), (1, 1))]
        signs = np.ones((n + 1, n))
        for k in range(n + 1):
            signs[k, :k] = -1.0
        w = signs[:, None, :, None] * q[None]  # (K, G, N, 2)
        # columns ordered (component, k, g) so that the two halves are contiguous
        return np.ascontiguousarray(w.transpose(2, 3, 0, 1).reshape(n, -1))

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
        with torch.no_grad():
            yt = torch.as_tensor(np.ascontiguousarray(y), dtype=self.dtype, device=self.device)
            k1, g1, k2, g2 = self._grid_search_t(yt)
        grid = self.t1_grid
        return k1.cpu().numpy(), grid[g1.cpu().numpy()], k2.cpu().numpy(), grid[g2.cpu().numpy()]

    def _grid_search_t(self, yt: torch.Tensor):
        """:meth:`grid_search` on a tensor yt (V, N); returns (k1, grid index 1, k2, grid index 2) tensors."""
        v, n = yt.shape
        g = self.n_grid
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
        return k1, g_best.gather(1, k1[:, None])[:, 0], k2, g_best.gather(1, k2[:, None])[:, 0]

    @staticmethod
    def _candidates(e_best: torch.Tensor):
        """k1 = argmax_k, k2 = the better of k1 - 1 and k1 + 1 (within 0..N)."""
        v, k = e_best.shape
        k1 = torch.argmax(e_best, dim=1)
        ninf = torch.tensor(-np.inf, dtype=e_best.dtype, device=e_best.device)
        lo = torch.where(k1 > 0, e_best.gather(1, (k1 - 1).clamp(min=0)[:, None])[:, 0], ninf)
        hi = torch.where(k1 < k - 1, e_best.gather(1, (k1 + 1).clamp(max=k - 1)[:, None])[:, 0], ninf)
        k2 = torch.where(lo >= hi, k1 - 1, k1 + 1).clamp(0, k - 1)
        return k1, k2

    # ------------------------------------------------------------------ refinement (torch, image-major)
    # Every per-image array below is image-major, (N, V): sums over the N images are reductions over the
    # outer axis, several times faster on a CPU than over an inner axis of length N. The arithmetic is in
    # ``self.dtype`` (float32 by default: T1 to 1e-6 relative, far below any noise) on ``self.device``.
    def _basis_t(self, u: torch.Tensor, derivs: bool = True):
        """f1, f2 (and d1, d2 = their derivatives with respect to u = log T1), each (N, V), for u (V,)."""
        inv = torch.exp(-u)[None, :]  # 1 / T1
        ti, rec = self._timing(u.dtype)
        x_ti = ti * inv
        e_ti = torch.exp(-x_ti)
        if rec is None:  # full recovery: f1 = 1, f2 = -e^{-TI/T1}
            f1 = torch.ones_like(e_ti)
            return (f1, -e_ti, torch.zeros_like(e_ti), -x_ti * e_ti) if derivs else (f1, -e_ti)
        x_rec = rec * inv
        e_rec = torch.exp(-x_rec)
        f1, f2 = -torch.expm1(-x_rec), e_rec - e_ti  # 1 - e^{-x} without cancellation for long T1
        if not derivs:
            return f1, f2
        d_rec = x_rec * e_rec
        return f1, f2, -d_rec, d_rec - x_ti * e_ti

    def _timing(self, dtype: torch.dtype):
        """The TIs and recovery times (N, 1) (s) in ``dtype`` (float64 copies for the stalled voxels' redo)."""
        if dtype == self.dtype:
            return self._ti_t, self._rec_t
        return self._ti_t.to(dtype), None if self._rec_t is None else self._rec_t.to(dtype)

    def _signs_t(self, k: torch.Tensor) -> torch.Tensor:
        """Polarity (N, V): the first k[v] images negative."""
        n = self.protocol.n_images
        idx = torch.arange(n, device=k.device)[:, None]
        one = torch.ones((), dtype=self.dtype, device=k.device)
        return torch.where(idx < k[None, :], -one, one)

    def _closed_form_t(self, z: torch.Tensor, u: torch.Tensor):
        """Least-squares (a, c) of signed data z (N, V) at u = log T1 (V,): 2x2 normal equations."""
        f1, f2 = self._basis_t(u, derivs=False)
        s11, s12, s22 = (f1 * f1).sum(0), (f1 * f2).sum(0), (f2 * f2).sum(0)
        r1, r2 = (f1 * z).sum(0), (f2 * z).sum(0)
        det = s11 * s22 - s12 * s12
        tiny = torch.finfo(self.dtype).tiny
        det = torch.where(det.abs() < tiny, torch.full_like(det, tiny), det)
        return (s22 * r1 - s12 * r2) / det, (s11 * r2 - s12 * r1) / det

    def _lm_t(self, z, a, c, u, n_iter: int, basis=None, tol: float = 1e-6, ml=None):
        """Levenberg-Marquardt on sum_n (a f1 + c f2 - z)^2 in (a, c, u = log T1) for signed data z (N, V)
        (a fixed polarity: a smooth problem), at most ``n_iter`` iterations. A voxel leaves the loop once a
        step moves u by at most ``tol`` and a, c by at most ``tol`` relative. Returns (a, c, u, basis at u,
        stalled): ``stalled`` marks voxels whose steps were still being rejected at the end (damping above
        10: in float32, an ill-conditioned normal matrix of a T1 the TIs barely see), for
        :meth:`_refine_t` to redo in float64.

        ``ml = (y, sigma^2, n_coils)`` (y the magnitudes (N, V), sigma^2 (1, V) or (1, 1)) makes it the
        maximum-likelihood fit for Rician (n_coils = 1) or noncentral-chi (root-sum-of-squares) noise by
        majorize-minimize: before every step the data are replaced by y I_n(x) / I_(n-1)(x), x = y |s| /
        sigma^2, with the polarity of the current signal s (z is then ignored). Each step lowers the
        majorizer, so the likelihood never decreases; its stationary point is the ML estimate."""
        lo, hi = self._u_bounds
        basis = self._basis_t(u) if basis is None else basis
        out_a, out_c, out_u = a.clone(), c.clone(), u.clone()
        out_basis = tuple(x.clone() for x in basis)
        out_lam = torch.full_like(a, 1e-3)
        act = None  # indices of the working set into the outputs (None: all)
        f1, f2, d1, d2 = basis
        if ml is not None:
            y, s2, n_coils = ml
            z = torch.zeros_like(f1)
        r = torch.addcmul(torch.addcmul(-z, a, f1), c, f2)
        cost = (r * r).sum(0)
        lam = out_lam.clone()
        eps = torch.finfo(a.dtype).tiny
        for it in range(n_iter):
            if ml is not None:  # the majorizer at the current maps: new effective data
                s = r + z
                z = torch.where(s < 0, -y, y) * bessel_ratio(n_coils, y * s.abs() / s2)
                r = s - z
                cost = (r * r).sum(0)
            j2 = torch.addcmul(c * d2, a, d1)
            damp = 1.0 + lam
            h00 = (f1 * f1).sum(0) * damp + eps
            h11 = (f2 * f2).sum(0) * damp + eps
            h22 = (j2 * j2).sum(0) * damp + eps
            h01, h02, h12 = (f1 * f2).sum(0), (f1 * j2).sum(0), (f2 * j2).sum(0)
            g0, g1, g2 = (f1 * r).sum(0), (f2 * r).sum(0), (j2 * r).sum(0)
            da, dc, du = solve_sym3(h00, h01, h02, h11, h12, h22, -g0, -g1, -g2)
            a2, c2, u2 = a + da, c + dc, (u + du).clamp(lo, hi)
            nb = self._basis_t(u2)
            r2 = torch.addcmul(torch.addcmul(-z, a2, nb[0]), c2, nb[1])
            cost2 = (r2 * r2).sum(0)
            better = cost2 <= cost
            a, c, u = torch.where(better, a2, a), torch.where(better, c2, c), torch.where(better, u2, u)
            cost = torch.where(better, cost2, cost)
            bb = better[None, :]
            f1, f2, d1, d2 = (torch.where(bb, x2, x) for x2, x in zip(nb, (f1, f2, d1, d2)))
            r = torch.where(bb, r2, r)
            lam = torch.where(better, lam * 0.3, lam * 10.0)
            moving = (du.abs() > tol) | (da.abs() > tol * a.abs() + eps) | (dc.abs() > tol * c.abs() + eps)
            last = it == n_iter - 1
            n_moving = int(moving.sum())
            if last or n_moving < 0.5 * moving.numel():  # write the settled voxels back, go on with the rest
                done = torch.ones_like(moving) if last else ~moving
                idx = torch.nonzero(done)[:, 0]
                tgt = idx if act is None else act[idx]
                out_a[tgt], out_c[tgt], out_u[tgt], out_lam[tgt] = a[idx], c[idx], u[idx], lam[idx]
                for o, x in zip(out_basis, (f1, f2, d1, d2)):
                    o[:, tgt] = x[:, idx]
                if last or n_moving == 0:
                    break
                keep = torch.nonzero(moving)[:, 0]
                act = keep if act is None else act[keep]
                z, a, c, u, lam, cost = z[:, keep], a[keep], c[keep], u[keep], lam[keep], cost[keep]
                f1, f2, d1, d2, r = (x[:, keep] for x in (f1, f2, d1, d2, r))
                if ml is not None:
                    y, s2 = y[:, keep], (s2 if s2.shape[1] == 1 else s2[:, keep])
        return out_a, out_c, out_u, out_basis, out_lam > 10.0

    def _refine_t(self, z, a, c, u, n_iter: int, basis=None, ml=None, tol: float = 1e-6):
        """:meth:`_lm_t`, with the voxels it leaves stalled in float32 redone in float64."""
        a, c, u, basis, stalled = self._lm_t(z, a, c, u, n_iter, basis, tol, ml)
        if self.dtype == torch.float64 or not bool(stalled.any()):
            return a, c, u, basis
        idx = torch.nonzero(stalled)[:, 0]
        d = torch.float64
        ml2 = None if ml is None else (ml[0][:, idx].to(d), (ml[1] if ml[1].shape[1] == 1 else ml[1][:, idx]).to(d), ml[2])
        z2 = None if z is None else z[:, idx].to(d)
        a2, c2, u2, _, _ = self._lm_t(z2, a[idx].to(d), c[idx].to(d), u[idx].to(d), max(n_iter, 20), None, tol, ml2)
        a[idx], c[idx], u[idx] = a2.to(a.dtype), c2.to(a.dtype), u2.to(a.dtype)
        fresh = self._basis_t(u[idx])
        for x, x2 in zip(basis, fresh):
            x[:, idx] = x2
        return a, c, u, basis

    def _fit_voxels(self, y: np.ndarray, noise: str, sigma, n_coils: int, n_ml_iter: int):
        """Grid search, then fixed-polarity refinement of both candidates of :meth:`grid_search`; the one
        with the lower magnitude cost wins; then the noise model's maximum likelihood. y (V, N) -> numpy
        (t1, pd, b, rms residual), each (V,)."""
        dev, dt = self.device, self.dtype
        with torch.no_grad():
            yv = torch.as_tensor(np.ascontiguousarray(y), dtype=dt, device=dev)
            # every voxel in units of its own brightest image: float32 works on numbers near 1, and the
            # maps do not depend on the units of the data (PD and the residual are scaled back at the end)
            scale = yv.abs().amax(dim=1)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            yv = yv / scale[:, None]
            # the grid search in blocks small enough for the projections (block x 2 (N + 1) n_grid) to stay in cache
            parts = [self._grid_search_t(yv[i:i + GRID_BLOCK_VOXELS]) for i in range(0, len(yv), GRID_BLOCK_VOXELS)]
            k1, g1, k2, g2 = (torch.cat(x) for x in zip(*parts))
            yt = yv.T.contiguous()  # (N, V)
            grid_u = self._grid_u_t
            sg = self._signs_t(k1)
            u = grid_u[g1]
            a, c = self._closed_form_t(sg * yt, u)
            a, c, u, basis = self._refine_t(sg * yt, a, c, u, self.n_gauss_newton, tol=self.tol_ls)
            two = torch.nonzero(k2 != k1)[:, 0]
            if len(two):
                y2, sg2, u2 = yt[:, two], self._signs_t(k2[two]), grid_u[g2[two]]
                a2, c2 = self._closed_form_t(sg2 * y2, u2)
                a2, c2, u2, b2 = self._refine_t(sg2 * y2, a2, c2, u2, self.n_gauss_newton, tol=self.tol_ls)
                # compare the magnitude costs (the fixed-polarity cost of candidate 1 may exceed it)
                cost1 = ((a[two] * basis[0][:, two] + c[two] * basis[1][:, two]).abs() - y2).square().sum(0)
                cost2 = ((a2 * b2[0] + c2 * b2[1]).abs() - y2).square().sum(0)
                take = cost2 < cost1
                idx = two[take]
                a[idx], c[idx], u[idx] = a2[take], c2[take], u2[take]
                basis = tuple(x.index_copy(1, idx, x2[:, take]) for x, x2 in zip(basis, b2))
            if noise in ("rician", "ncchi"):
                sig = torch.as_tensor(np.asarray(sigma, dtype=float), dtype=dt, device=dev) / scale
                s2 = sig.clamp(min=1e-12).square().reshape(1, -1)
                ml = (yt, s2, n_coils if noise == "ncchi" else 1)
                a, c, u, basis = self._refine_t(None, a, c, u, n_ml_iter, basis, ml=ml, tol=self.tol_ml)
            s = a * basis[0] + c * basis[1]
            res = ((s.abs() - yt).square().mean(0)).sqrt()
            b = torch.where(a != 0, c / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(a))
            # (a, c) and (-a, -c) give the same magnitude: report PD >= 0
            out = [x.double().cpu().numpy() for x in (torch.exp(u), a.abs() * scale, b, res * scale)]
        return tuple(out)

    # ------------------------------------------------------------------ public
    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, noise: str = "gaussian",
            sigma: float | np.ndarray | None = None, n_coils: int = 1, n_ml_iter: int = 30,
            chunk_size: int = 131072, progress: bool = False) -> IRFit:
        """Fit every voxel of ``data`` (..., N) (inversion on the last axis, magnitude): a slice or a whole
        volume, in blocks of ``chunk_size`` voxels (memory: the data, the maps and a few MB per block).

        Args:
            mask: boolean (...) of voxels to fit (others get 0); default: all voxels.
            noise: "gaussian" (least squares), "rician" (one coil) or "ncchi" (RSS of ``n_coils``).
            sigma: noise std per real channel, needed for "rician"/"ncchi" (a scalar, or per voxel);
                see :func:`estimate_noise_sigma`.
            n_ml_iter: at most this many majorize-minimize rounds (one Levenberg-Marquardt step each)
                for "rician"/"ncchi"; a voxel stops once a round moves it by less than ``tol_ml``.
            progress: one progress bar over the voxels.
        """
        data = np.asarray(data)
        if not np.issubdtype(data.dtype, np.floating):
            data = data.astype(np.float32)  # no float64 copy of a whole volume: chunks are cast as they are fitted
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
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(y), desc="fit", unit="voxel", unit_scale=True)
        for s in range(0, len(y), chunk_size):
            sl = slice(s, s + chunk_size)
            res = self._fit_voxels(y[sl], noise, None if sig is None else sig[sl], n_coils, n_ml_iter)
            for o, r in zip(out, res):
                o[sl] = r
            if bar is not None:
                bar.update(len(res[0]))
        if bar is not None:
            bar.close()
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


__all__ = ["IRFit", "InversionRecoveryModel", "PRECISE_FIT", "bessel_ratio", "solve_sym3", "fit_ir", "estimate_noise_sigma", "noise_floor", "signal_mask",
           "signal_threshold", "T1_GRID_RANGE_S"]
