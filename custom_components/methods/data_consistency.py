"""Physics data-consistency for the Diffusor's samplers: a per-voxel proximal Gauss-Newton step.

At every step of a sampler the network gives an estimate x0_hat of the clean maps (the posterior
mean of the step). :class:`DataConsistency` moves it toward the measured images through the exact
signal model and the magnitude noise model, as in DiffPIR (Zhu et al. 2023) and the decomposed
diffusion sampler (Chung et al. 2024), but voxel by voxel, because the forward operator of T1
mapping is voxel-wise:

    q* = argmin_q  sum_n NLL(y_n | |s_n(q)|, sigma) + 1/2 sum_k ((q_k - q0_k) / delta_k)^2

with q = (a, c, u) = (PD, PD B, log T1), q0 the network's estimate and the prior widths

    delta_u = w,   delta_a = w a0',   delta_c = 2 w a0',   a0' = max(a0, sigma)

(``w`` = the ``strength``: the network's estimate is trusted to within a relative std w in T1, PD and
PD B; 2 a0 is the scale of PD B for B <= 2). ``w = 0`` leaves x0_hat unchanged (no data-consistency);
``w -> inf`` gives the per-voxel maximum-likelihood fit started from the network's estimate (the
polarity, the sign of each image's signal, taken from the estimate and again from the result:
:meth:`DataConsistency.prox`). In between, for a voxel whose data
determine T1 to a relative CRLB r, the result is about the precision-weighted mean of the network's
value and the ML value, with weight r^2 / (r^2 + w^2) on the network: its bias is cut by that factor
and the noise of the ML value is shrunk by w^2 / (r^2 + w^2).

The CRLB bound (``crlb_factor`` k > 0): where the images determine T1, the network may not outweigh
them. The prior is widened voxel by voxel to

    w_vox = max(w, k min(r, r_max)),   r = sqrt([F^-1]_uu),  F = J'J / sigma^2 at the network's estimate

(r the relative Cramér-Rao bound of T1 for Gaussian noise of std sigma; r_max = ``CRLB_DETERMINED`` = 10 %,
the issue-20 threshold above which T1 counts as not determined), all three widths scaled alike. The data's
precision of log T1, with PD and PD B free, is at least 1/r^2 (a Schur complement, which the prior on
(a, c) only raises), so where r <= r_max an error of the network in T1 alone reaches the result with a
weight of at most r^2 / (r^2 + k^2 r^2) = 1 / (1 + k^2), at any SNR; the price is that there the result's
noise is at least k / sqrt(1 + k^2) of the ML fit's. Where T1 is not determined (r > r_max) the prior's
width is max(w, k r_max) and the network's estimate leads, as it should: the data cannot.

Signal model: the training labels' own model (:func:`custom_components.data.synthesis.labels_are_apparent`):
for a constant finite TR the labels are apparent parameters of the full-recovery model, which
reproduces the finite-TR signal exactly (s_n = a - c e^{-TI_n/T1}); otherwise (full recovery, or TR
that varies between images) s_n = a (1 - e^{-Trec_n/T1}) + c (e^{-Trec_n/T1} - e^{-TI_n/T1}) with
Trec_n = TR_n - readout (the echo train's readout duration, :meth:`Protocol.recovery_times_s`). Echo-train
T2 blurring along the phase-encoding axis is a spatial effect, not part of this voxel-wise model.

Noise model: Rician (one coil) or noncentral chi (root-sum-of-squares of ``n_coils``), sigma the std
per channel (from the image background, or given). The likelihood is handled by majorize-minimize, as
in the classical fit (:mod:`custom_components.methods.fitting`): the data are replaced by
y I_n(z) / I_{n-1}(z), z = y |s| / sigma^2 at the network's estimate (with its polarity), and
``n_iter`` Gauss-Newton steps solve the resulting least-squares problem with the prior, each kept only
where it lowers that cost (a rejected step is retried at a quarter of its length). One majorization
per call (and one more for each voxel solved again with a new polarity): the sampler's next step
majorizes again at its own estimate, so over the steps of a sampler the majorize-minimize iteration
goes on. Voxels whose maximum over inversion times is below ``min_snr`` x sigma (background; for
noncentral chi that margin above the noise floor of the coils, whose mean is 4-8 sigma for 8-32 coils)
are left as the network gave them.

Everything is in the network's space at the boundary (y = 2 tanh(x) - 1 of
:mod:`custom_components.methods.scaling`) with images divided by the signal scale, so PD is in the
units of the scaled images and the signal scale cancels.
"""

from __future__ import annotations

import numpy as np
import torch

from ..physics.protocol import Protocol
from .fitting import bessel_ratio, cofactors_sym3, signal_threshold, solve_sym3

#: The default strength (relative prior width) of ``qmri map --method diffusor``, chosen on the validation
#: half of the robustness suite only: docs/dc_validation.md (``scripts/dc_validation.py``; of 0.02-1, the
#: most 0.4-2 s spheres meeting the issue-20 targets).
DEFAULT_STRENGTH = 0.2
#: The default CRLB bound (0: none); chosen with the strength (docs/dc_validation.md).
DEFAULT_CRLB_FACTOR = 0.0
#: Relative CRLB of T1 above which the protocol does not determine T1 (issue 20; the reports' threshold).
CRLB_DETERMINED = 0.10
LOG_T1_BOUNDS = (np.log(0.002), np.log(24.0))  # s
NOISE_MODELS = ("rician", "ncchi", "gaussian")


class DataConsistency:
    """The proximal data-consistency step (module doc) for one protocol.

    Args:
        protocol: the acquisition of the measured images.
        strength: w, the relative width of the prior around the network's estimate (0: off).
        crlb_factor: k, the CRLB bound (module doc): the prior is at least k times the relative CRLB
            of T1 wide (up to ``CRLB_DETERMINED``); 0: no bound.
        noise: "rician", "ncchi" (root-sum-of-squares of ``n_coils``) or "gaussian".
        n_coils: coils of the noncentral-chi model.
        n_iter: majorize + Gauss-Newton iterations per call.
        polarity_rounds: how often the voxels whose signal changed polarity are solved again (:meth:`prox`).
        min_snr: voxels whose maximum image is below min_snr x sigma (for noncentral chi: that margin above
            the noise floor of the coils, :func:`custom_components.methods.fitting.signal_threshold`) are
            left unchanged.
        labels_apparent: whether the network's labels are apparent parameters of the full-recovery
            model (None: :func:`custom_components.data.synthesis.labels_are_apparent` of ``protocol``).
        dtype: of the computation (float32: the network's precision and half the memory traffic of
            float64; the step is a few Gauss-Newton iterations on a regularised 3-parameter problem).
    """

    def __init__(self, protocol: Protocol, strength: float = DEFAULT_STRENGTH, noise: str = "rician",
                 n_coils: int = 1, n_iter: int = 2, min_snr: float = 5.0, labels_apparent: bool | None = None,
                 dtype: torch.dtype = torch.float32, crlb_factor: float = DEFAULT_CRLB_FACTOR,
                 polarity_rounds: int = 2):
        if not np.isfinite(strength) or strength < 0:
            raise ValueError(f"data-consistency strength must be a number >= 0, got {strength!r}")
        if not np.isfinite(crlb_factor) or crlb_factor < 0:
            raise ValueError(f"data-consistency CRLB factor must be a number >= 0, got {crlb_factor!r}")
        if noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
        if int(n_coils) < 1:
            raise ValueError(f"n_coils must be at least 1, got {n_coils}")
        from ..data.synthesis import labels_are_apparent

        self.protocol = protocol
        self.strength = float(strength)
        self.crlb_factor = float(crlb_factor)
        self.noise = noise
        self.n_coils = int(n_coils) if noise == "ncchi" else 1
        self.n_iter = int(n_iter)
        self.polarity_rounds = int(polarity_rounds)
        self.dtype = dtype
        self.min_snr = float(min_snr)
        # the active voxels' threshold in sigma: min_snr above the noise floor of the coils (signal_threshold)
        self.threshold_factor = signal_threshold(1.0, self.n_coils, self.min_snr)
        self.apparent = labels_are_apparent(protocol) if labels_apparent is None else bool(labels_apparent)
        self.tis = np.asarray(protocol.tis, dtype=float)
        self.rec = None if self.apparent else protocol.recovery_times_s()

    # ------------------------------------------------------------------ the voxel-wise model
    # Inside the step every per-image array is image-major, (N, V): the sums over the N images are then
    # reductions over the outer axis, several times faster on a CPU than over an inner axis of length N.
    def _basis(self, u: torch.Tensor):
        """f1, f2 and their derivatives d1, d2 with respect to u = log T1, each (N, V); s = a f1 + c f2. For
        the apparent full-recovery model f1 = 1 and d1 = 0, returned as None (the step skips their
        products: :meth:`_lin`, :meth:`_fisher`)."""
        t1 = torch.exp(u)[None, :]
        tis = torch.as_tensor(self.tis, dtype=u.dtype, device=u.device)[:, None]
        e_ti = torch.exp(-tis / t1)
        d_ti = (tis / t1) * e_ti  # d e_ti / du
        if self.rec is None:
            return None, -e_ti, None, -d_ti
        rec = torch.as_tensor(self.rec, dtype=u.dtype, device=u.device)[:, None]
        e_rec = torch.exp(-rec / t1)
        d_rec = (rec / t1) * e_rec
        return 1.0 - e_rec, e_rec - e_ti, -d_rec, d_rec - d_ti

    def signal(self, q: torch.Tensor) -> torch.Tensor:
        """Signed signal (V, N) of q = (a, c, u) (V, 3)."""
        f1, f2, _, _ = self._basis(q[:, 2])
        return self._lin(q[:, 0], f1, q[:, 1], f2).T

    @staticmethod
    def _lin(a, f1, c, f2):
        """The signal a f1 + c f2 (N, V) for a, c (V,); f1 None means f1 = 1 (the apparent model)."""
        return (a if f1 is None else a * f1) + c * f2

    @staticmethod
    def _ds_du(a, d1, c, d2):
        """The Jacobian column ds/du = a d1 + c d2 (N, V); d1 None means d1 = 0 (the apparent model)."""
        return c * d2 if d1 is None else a * d1 + c * d2

    @staticmethod
    def _dsum(f1, r):
        """sum_n f1_n r_n (V,), f1 None meaning 1."""
        return (r if f1 is None else f1 * r).sum(0)

    def _effective_data(self, y, mu, sigma):
        """The majorize-minimize data y I_n(z)/I_{n-1}(z), z = y mu / sigma^2 (y itself for Gaussian noise)."""
        if self.noise == "gaussian":
            return y
        return y * bessel_ratio(self.n_coils, y * mu / sigma.clamp_min(1e-12) ** 2)

    def _prior_precision(self, a_ref: torch.Tensor, fisher=None, strength: float | None = None):
        """The prior's precisions of (a, c, u) in units of sigma: 1/delta^2 with delta = (w a', 2 w a', w),
        a' = max(|PD|, sigma) / sigma, and w widened to max(w, k min(r, r_max)) by the CRLB bound, r from
        ``fisher`` = the six entries of J'J (in units of sigma) at the estimate (module doc); ``strength``: w
        for this call (None: the step's own)."""
        w = torch.full_like(a_ref, self.strength if strength is None else float(strength))
        if self.crlb_factor > 0 and fisher is not None:
            *_, c22, det = cofactors_sym3(*fisher)
            r = torch.sqrt((c22 / det).clamp_min(0))  # sqrt([F^-1]_uu): relative CRLB of T1
            r = torch.where(torch.isfinite(r) & (det > 0), r, torch.full_like(r, np.inf)).clamp_max(CRLB_DETERMINED)
            w = torch.maximum(w, self.crlb_factor * r)
        return 1 / (w * a_ref) ** 2, 1 / (2 * w * a_ref) ** 2, 1 / w**2

    @staticmethod
    def _fisher(f1, f2, j2):
        """The six entries of J'J (h00, h01, h02, h11, h12, h22) for the Jacobian columns f1, f2, j2 (N, V)
        (f1 None: a column of ones)."""
        if f1 is None:
            h00, h01, h02 = torch.full_like(f2[0], f2.shape[0]), f2.sum(0), j2.sum(0)
        else:
            h00, h01, h02 = (f1 * f1).sum(0), (f1 * f2).sum(0), (f1 * j2).sum(0)
        return h00, h01, h02, (f2 * f2).sum(0), (f2 * j2).sum(0), (j2 * j2).sum(0)

    def prox(self, q0: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, strength: float | None = None) -> torch.Tensor:
        """The proximal step for voxels q0 (V, 3) = (a, c, log T1), data y (V, N), sigma (V,), computed in
        the dtype of ``q0`` (the sampler uses float32; tests float64); ``strength``: w for this call (None: the
        step's own; an annealed sampler passes one per step).

        Magnitude data carry no sign: the signed data are y with the polarity of the signal at the current
        estimate. A network that is far off in T1 puts the signal's null at the wrong inversion time, and
        with that polarity the data would pull toward a wrong answer. So after the Gauss-Newton
        iterations the polarity is taken again at the result, and the voxels where it changed are
        majorized and solved again from there (up to ``polarity_rounds`` times)."""
        sig = sigma.to(q0)[:, None]
        y = y.to(q0)
        a_ref = torch.maximum(q0[:, 0].abs(), sig[:, 0]) / sig[:, 0]
        # in units of sigma: a, c and the data divided by sigma, so the cost is sum r^2 + prior
        a0, c0, u0 = q0[:, 0] / sig[:, 0], q0[:, 1] / sig[:, 0], q0[:, 2]
        basis = self._basis(u0)
        f1, f2, d1, d2 = basis
        prec = self._prior_precision(a_ref, self._fisher(f1, f2, self._ds_du(a0, d1, c0, d2))
                                     if self.crlb_factor > 0 else None, strength)
        ys = (y / sig).T.contiguous()  # (N, V)
        a, c, u, used, now = self._gauss_newton(a0, c0, u0, (a0, c0, u0), prec, ys, basis)
        for _ in range(self.polarity_rounds):
            changed = (now != used).any(0)
            if not bool(changed.any()):
                break
            idx = changed.nonzero()[:, 0]
            res = self._gauss_newton(a[idx], c[idx], u[idx], (a0[idx], c0[idx], u0[idx]), tuple(p[idx] for p in prec),
                                     ys[:, idx])
            a, c, u, used, now = a.clone(), c.clone(), u.clone(), used.clone(), now.clone()
            a[idx], c[idx], u[idx], used[:, idx], now[:, idx] = res
        return torch.stack([a * sig[:, 0], c * sig[:, 0], u], dim=1)

    def _gauss_newton(self, a, c, u, anchor, prec, ys, basis=None):
        """``n_iter`` Gauss-Newton steps on sum_n (s_n - y~_n)^2 + prior from (a, c, u) (units of sigma), with
        y~ the majorize-minimize data of ``ys`` (magnitudes / sigma, (N, V)) at (a, c, u) with its polarity
        (``basis``: :meth:`_basis` of u, if already computed). Returns the new (a, c, u), the polarity used
        (signal < 0, (N, V)) and the polarity of the signal at the result."""
        a0, c0, u0 = anchor
        p0, p1, p2 = prec
        lo, hi = LOG_T1_BOUNDS
        f1, f2, d1, d2 = self._basis(u) if basis is None else basis
        s = self._lin(a, f1, c, f2)
        used = s < 0
        one = torch.ones((), dtype=s.dtype)
        ys = self._effective_data(ys, s.abs(), one) * torch.where(s < 0, -1.0, 1.0).to(s)
        r = s - ys
        cost = (r * r).sum(0)
        step = torch.ones_like(a)
        for it in range(self.n_iter):
            j2 = self._ds_du(a, d1, c, d2)
            g0 = self._dsum(f1, r) + p0 * (a - a0)
            g1 = (f2 * r).sum(0) + p1 * (c - c0)
            g2 = (j2 * r).sum(0) + p2 * (u - u0)
            h00, h01, h02, h11, h12, h22 = self._fisher(f1, f2, j2)
            st = solve_sym3(h00 + p0, h01, h02, h11 + p1, h12, h22 + p2, -g0, -g1, -g2)
            a2, c2, u2 = a + step * st[0], c + step * st[1], (u + step * st[2]).clamp(lo, hi)
            b2 = self._basis(u2)
            r2 = self._lin(a2, b2[0], c2, b2[1]) - ys
            cost2 = (r2 * r2).sum(0)
            better = torch.isfinite(cost2) & (cost2 + p0 * (a2 - a0) ** 2 + p1 * (c2 - c0) ** 2 + p2 * (u2 - u0) ** 2
                                              <= cost + p0 * (a - a0) ** 2 + p1 * (c - c0) ** 2 + p2 * (u - u0) ** 2)
            a, c, u = torch.where(better, a2, a), torch.where(better, c2, c), torch.where(better, u2, u)
            if it + 1 == self.n_iter:
                s = torch.where(better, r2, r) + ys  # the signal at the result (r = s - y~)
                break
            step = torch.where(better, torch.ones_like(step), step * 0.25)  # a rejected step is retried shorter
            r, cost = torch.where(better, r2, r), torch.where(better, cost2, cost)
            f1, f2, d1, d2 = (None if old is None else torch.where(better, new, old)
                              for new, old in zip(b2, (f1, f2, d1, d2)))
        return a, c, u, used, s < 0

    # ------------------------------------------------------------------ network space
    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, images: torch.Tensor, sigma: torch.Tensor | float,
                 strength: float | None = None) -> torch.Tensor:
        """x0 (M, 3, H, W) in network space (labels of the scaled images), images (M, N, H, W) divided
        by the signal scale, sigma (M,) or a number in the same units -> the corrected x0; ``strength``:
        w for this call (None: the step's own)."""
        if (self.strength if strength is None else strength) == 0:
            return x0
        from .scaling import decode_maps, encode_maps

        m = x0.shape[0]
        sig = torch.as_tensor(sigma, dtype=self.dtype).reshape(-1).expand(m) if torch.as_tensor(sigma).numel() == 1 \
            else torch.as_tensor(sigma, dtype=self.dtype).reshape(m)
        y = images.to(self.dtype)
        if y.shape[1] != len(self.tis):
            raise ValueError(f"data-consistency for {len(self.tis)} images got {y.shape[1]}")
        sig_map = sig[:, None, None].expand(m, *y.shape[-2:])
        active = (y.amax(dim=1) > self.threshold_factor * sig_map) & torch.isfinite(sig_map) & (sig_map > 0)
        if not bool(active.any()):
            return x0
        # only the active voxels are decoded, corrected and encoded again: (V, 3, 1, 1) for the scaling
        maps = decode_maps(x0.permute(0, 2, 3, 1)[active].to(self.dtype)[:, :, None, None], 1.0)[:, :, 0, 0]
        t1, pd, b = maps.unbind(1)  # T1 s, PD (scaled images' units), B
        q0 = torch.stack([pd, pd * b, torch.log(t1.clamp(float(np.exp(LOG_T1_BOUNDS[0])), float(np.exp(LOG_T1_BOUNDS[1]))))], dim=1)
        q = self.prox(q0, y.permute(0, 2, 3, 1)[active], sig_map[active], strength)
        a = q[:, 0].clamp_min(1e-12)
        new = torch.stack([torch.exp(q[:, 2]), a, (q[:, 1] / a).clamp(0.0, 4.0)], dim=1)
        out = x0.permute(0, 2, 3, 1).clone()
        out[active] = encode_maps(new[:, :, None, None], 1.0)[:, :, 0, 0].to(x0.dtype)
        return out.permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def posterior_std(self, labels: torch.Tensor, images: torch.Tensor, sigma: float) -> torch.Tensor:
        """The std of the proximal step's Gaussian (Laplace) posterior at ``labels`` (3, H, W) (T1 s, PD
        in the units of ``images``, B; the network's label convention), for images (N, H, W) with noise
        std ``sigma``: with the Hessian H = J'J / sigma^2 + P of the step's cost at q = (PD, PD B, log T1)
        (P the prior's precision around the estimate itself), cov(q) = H^-1 and, to first order,
        std(T1) = T1 sqrt(cov_uu), std(PD) = sqrt(cov_aa), std(B) from B = c / a. This is the part of the
        uncertainty that an ensemble whose members are all pulled toward the same images no longer
        shows: the noise of the images themselves, as far as the prior does not remove it. Voxels the
        step leaves alone (below ``min_snr`` sigma) get 0."""
        if self.strength == 0 or not (sigma is not None and np.isfinite(sigma) and sigma > 0):
            return torch.zeros_like(labels)
        lab = labels.to(torch.float64)
        y = images.to(torch.float64)
        active = y.amax(dim=0) > self.threshold_factor * sigma
        t1 = lab[0][active].clamp(float(np.exp(LOG_T1_BOUNDS[0])), float(np.exp(LOG_T1_BOUNDS[1])))
        a, c, u = lab[1][active] / sigma, lab[1][active] * lab[2][active] / sigma, torch.log(t1)
        f1, f2, d1, d2 = self._basis(u)
        fisher = self._fisher(f1, f2, self._ds_du(a, d1, c, d2))
        p0, p1, p2 = self._prior_precision(a.abs().clamp_min(1.0), fisher)
        h = [fisher[0] + p0, fisher[1], fisher[2], fisher[3] + p1, fisher[4], fisher[5] + p2]
        one, zero = torch.ones_like(a), torch.zeros_like(a)
        c_a = solve_sym3(*h, one, zero, zero)  # first column of H^-1
        c_c = solve_sym3(*h, zero, one, zero)
        c_u = solve_sym3(*h, zero, zero, one)
        var_a, cov_ac, var_c, var_u = c_a[0], c_a[1], c_c[1], c_u[2]
        aa = a.clamp_min(1e-12)
        var_b = (c / aa**2) ** 2 * var_a - 2 * c / aa**3 * cov_ac + var_c / aa**2
        out = torch.zeros_like(lab)
        out[0][active] = t1 * var_u.clamp_min(0).sqrt()
        out[1][active] = sigma * var_a.clamp_min(0).sqrt()
        out[2][active] = var_b.clamp_min(0).sqrt()
        return out.to(labels.dtype)

    def describe(self) -> dict:
        """What the output sidecars record about the step."""
        return {"strength": self.strength, "crlb_factor": self.crlb_factor, "noise": self.noise, "n_coils": self.n_coils, "iterations": self.n_iter,
                "model": "apparent full-recovery parameters (constant finite TR)" if self.apparent
                else "finite TR with the echo train's readout" if self.rec is not None else "full recovery"}


__all__ = ["DataConsistency", "DEFAULT_STRENGTH", "DEFAULT_CRLB_FACTOR", "CRLB_DETERMINED", "NOISE_MODELS"]
