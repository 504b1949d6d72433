"""A regularised classical baseline: the maximum-likelihood fit with a total-variation prior.

What a physicist would try before a network: the plain fit (:mod:`custom_components.methods.fitting`)
is a per-voxel estimate; here the maps of a 2D slice are estimated together, with a penalty on the
differences between neighbouring voxels (edge-preserving: a smoothed total variation, ~ |jump|).

Model: the exact signal model of :mod:`custom_components.physics.signal_model` (finite TR and the echo
train's readout, Trec_n = TR_n - readout), s_n = PD (1 - B e^{-TI_n/T1} + (B - 1) e^{-Trec_n/T1}), and
the magnitude data y_n = |s_n| + noise.

Objective over the mask voxels v of one slice (x = (log T1, PD / PD_ref, B)):

    F(x) = sum_v sum_n NLL(y_vn | |s_n(x_v)|, sigma)
           + tv_weight * sum_c r_c sum_{edges (v, w)} phi((x_c,v - x_c,w) / d_c)

- NLL: Rician, (y - mu)^2 / (2 sigma^2) - log i0e(y mu / sigma^2) (the negative log-likelihood up to a
  constant; i0e the exponentially scaled Bessel function); noncentral chi of L coils (root-sum-of-squares),
  (y - mu)^2 / (2 sigma^2) + (L - 1) log mu - log ive(L - 1, y mu / sigma^2) (L = 1: the Rician); or
  Gaussian, (y - mu)^2 / (2 sigma^2);
- phi(t) = sqrt(t^2 + eps^2) - eps (eps = 0.1): a total variation smoothed below a tenth of d_c;
  anisotropic (horizontal and vertical neighbours), only between two mask voxels;
- d_c: the median over the mask of the Cramér-Rao bound of map c at the plain fit
  (:func:`custom_components.physics.signal_model.crlb` with ``sigma``): so ``tv_weight`` is relative to
  the noise level. A jump of one CRLB costs about ``tv_weight * r_c`` in units of the log-likelihood,
  and the same ``tv_weight`` smooths equally (in CRLBs) at every SNR;
- r_c = :data:`MAP_WEIGHTS`: B is smooth in space (the transmit field), so it gets the strongest
  weight; T1 is the map of interest; PD only lightly.

Optimisation: initialised from the plain fit (Rician ML where ``sigma`` is known), a projected L-BFGS
(:func:`_lbfgs_box`: two-loop recursion, Armijo backtracking, log T1 kept in 2 ms-24 s) on the
CRLB-scaled variables z_c = x_c / d_c, slice by slice (2D, the image's first two axes). F and its
gradient are evaluated in float64 numpy in closed form (:meth:`TVObjective.value_and_grad`: the analytic
Jacobian of the signal model, the score I_L/I_{L-1} (L = 1: Rician), phi'), and the L-BFGS runs on D z, D^2 the
diagonal of F's Gauss-Newton curvature at the start (:meth:`TVObjective.curvature`; diagonal, so the
bound on log T1 stays a box). The torch ``__call__`` is the reference definition of F (tests: the
closed-form gradient equals its autograd gradient and finite differences). It stops when an iteration
lowers F by less than ``tol`` = 1e-9 relative, or after ``n_iter`` = 300 iterations. Every iteration
decreases F (the Armijo condition); the objective per iteration is kept in ``info``. With
``tv_weight = 0`` the minimiser is the plain ML fit (the same likelihood). The previous solver (scipy's
L-BFGS-B, unpreconditioned, gradient by torch autograd) reached the same F or a higher one in about 40x
the time (docs/physics.md, "The TV-regularised fit"; F is not convex, so two solvers from the same
start can end in different local minima).

The default strength :data:`DEFAULT_TV_WEIGHT` = 0.5 was chosen on the validation half of the robustness
suite only (``scripts/tv_suite_validation.py``: 6 plates and 3 brains in the paper and nist15 protocols,
Rician and noncentral-chi scenes): of 0.25, 0.5, 1 and 2, the most determined 0.4-2 s spheres within the
issue-20 bias target (15 of 17; the plain fit 10). The earlier default, 1, came from two synthetic brain
slices (``scripts/tv_validation.py``; docs/physics.md, "The TV-regularised fit").
"""

from __future__ import annotations


import numpy as np
import torch
from scipy import special

from ..physics.protocol import Protocol
from ..physics.signal_model import crlb, signed_signal
from .fitting import PRECISE_FIT, IRFit, InversionRecoveryModel

#: Strength of the prior, in log-likelihood units per CRLB jump (see the module docstring).
DEFAULT_TV_WEIGHT = 0.5
#: Relative weight of each map's total variation: B strongest (smooth transmit field), PD lightest.
MAP_WEIGHTS = {"T1": 1.0, "PD": 0.25, "B": 4.0}
TV_EPS = 0.1  # smoothing of |t| in units of the map's median CRLB
LOG_T1_RANGE = (np.log(0.002), np.log(24.0))  # s: where the plain fit's log T1 is clipped for the start


NOISE_MODELS = ("rician", "ncchi", "gaussian")


def log_ive(order: int, k: np.ndarray, ive: np.ndarray | None = None) -> np.ndarray:
    """log ive(order, k) = log I_order(k) - k for k >= 0 (float64), with the small-k series
    order log(k / 2) - log order! - k where ive underflows (k^order below ~1e-300). ``ive``: the values
    ive(order, k) if the caller has them already."""
    k = np.asarray(k, dtype=np.float64)
    v = special.ive(order, k) if ive is None else ive
    with np.errstate(divide="ignore"):
        small = order * np.log(np.maximum(k, 1e-300) / 2) - special.gammaln(order + 1) - k
        return np.where(v > 0, np.log(np.maximum(v, 1e-300)), small)


class _LogIve(torch.autograd.Function):
    """log ive(order, k) for torch (float64, through scipy), d/dk = I_{order+1}/I_order + order/k - 1."""

    @staticmethod
    def forward(ctx, k, order):
        kn = k.detach().cpu().numpy()
        ctx.save_for_backward(k)
        ctx.order = order
        return torch.as_tensor(log_ive(order, kn), dtype=k.dtype, device=k.device)

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        kn = k.detach().cpu().numpy()
        ratio = special.ive(ctx.order + 1, kn) / np.maximum(special.ive(ctx.order, kn), 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = ratio + np.where(kn > 0, ctx.order / kn, 0.0) - 1.0
        return grad * torch.as_tensor(d, dtype=k.dtype, device=k.device), None


def negative_log_likelihood(y: torch.Tensor, s: torch.Tensor, sigma: float, noise: str = "rician",
                            n_coils: int = 1) -> torch.Tensor:
    """Per-sample NLL of magnitude data ``y`` given the signed model ``s`` (constants dropped).

    Rician: -log p(y | mu = |s|) = (y - mu)^2 / (2 sigma^2) - log i0e(y mu / sigma^2) + const (smooth in s,
    also at s = 0); noncentral chi of ``n_coils`` = L (root-sum-of-squares, sigma per channel):
    (y - mu)^2 / (2 sigma^2) + (L - 1) log mu - log ive(L - 1, y mu / sigma^2) + const (the density
    y^L / (sigma^2 mu^(L-1)) exp(-(y^2 + mu^2) / (2 sigma^2)) I_{L-1}(y mu / sigma^2); tests: against
    scipy.stats.ncx2); Gaussian: (y - mu)^2 / (2 sigma^2).
    """
    mu = s.abs()
    nll = (y - mu) ** 2 / (2.0 * sigma**2)
    if noise == "rician" or (noise == "ncchi" and int(n_coils) == 1):
        nll = nll - torch.log(torch.special.i0e(y * mu / sigma**2))
    elif noise == "ncchi":
        order = int(n_coils) - 1
        nll = nll + order * torch.log(mu.clamp_min(1e-300)) - _LogIve.apply(y * mu / sigma**2, order)
    elif noise != "gaussian":
        raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
    return nll


def _phi(t: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(t * t + TV_EPS**2) - TV_EPS


class TVObjective:
    """F(z) of one slice over the CRLB-scaled variables z (3, V) of the V mask voxels (see the module).

    ``data`` (V, N) magnitudes of the mask voxels, ``mask`` (H, W) bool, ``scale`` (3,) = d_c (log T1,
    PD / pd_ref, B), ``lam`` (3,) = tv_weight * r_c, ``n_coils``: of the noncentral-chi noise.
    """

    def __init__(self, data: np.ndarray, mask: np.ndarray, protocol: Protocol, sigma: float, noise: str,
                 pd_ref: float, scale, lam, n_coils: int = 1):
        if noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
        self.y = torch.as_tensor(np.asarray(data, dtype=np.float64))
        self.mask = torch.as_tensor(np.asarray(mask, dtype=bool))
        self.protocol = protocol
        self.sigma = float(sigma)
        # one coil of noncentral chi is the Rician
        self.noise = "rician" if noise == "ncchi" and int(n_coils) == 1 else noise
        self.n_coils = int(n_coils) if noise == "ncchi" else 1
        self.pd_ref = float(pd_ref)
        self.scale = torch.as_tensor(np.asarray(scale, dtype=np.float64))
        self.lam = torch.as_tensor(np.asarray(lam, dtype=np.float64))
        m = self.mask
        self.edge_x = m[1:, :] & m[:-1, :]
        self.edge_y = m[:, 1:] & m[:, :-1]
        # float64 numpy copies for value_and_grad (the solver's closed-form gradient)
        self._y = np.ascontiguousarray(self.y.numpy().T)  # (N, V)
        self._ti = np.asarray(protocol.tis, dtype=np.float64)[:, None]
        rec = protocol.recovery_times_s()
        rec = None if rec is None else np.asarray(rec, dtype=np.float64)
        # one exp(-Trec / T1) row serves every image when the recovery time is the same for all
        self._trec = None if rec is None else (rec[:1, None] if np.all(rec == rec[0]) else rec[:, None])
        idx = np.full(m.shape, -1, dtype=np.int64)
        mn = m.numpy()
        idx[mn] = np.arange(int(mn.sum()))
        ex, ey = self.edge_x.numpy(), self.edge_y.numpy()
        # edge (v, w) of neighbouring mask voxels, in the order of tv_term (vertical, then horizontal)
        self._edge_v = np.concatenate([idx[1:, :][ex], idx[:, 1:][ey]])
        self._edge_w = np.concatenate([idx[:-1, :][ex], idx[:, :-1][ey]])
        self._scale = self.scale.numpy()
        self._lam = self.lam.numpy()

    def params(self, z: torch.Tensor) -> torch.Tensor:
        """(T1, PD, B) (3, V) from z."""
        x = z * self.scale[:, None]
        return torch.stack([torch.exp(x[0]), x[1] * self.pd_ref, x[2]])

    def variables(self, t1, pd, b) -> torch.Tensor:
        """z (3, V) from maps of the mask voxels."""
        u = np.clip(np.log(np.maximum(np.asarray(t1, dtype=float), 1e-12)), *LOG_T1_RANGE)
        x = np.stack([u, np.asarray(pd, dtype=float) / self.pd_ref, np.asarray(b, dtype=float)])
        return torch.as_tensor(x) / self.scale[:, None]

    def data_term(self, z: torch.Tensor) -> torch.Tensor:
        s = signed_signal(self.params(z), self.protocol, dim=0)  # (N, V)
        return negative_log_likelihood(self.y.T, s, self.sigma, self.noise, self.n_coils).sum()

    def tv_term(self, z: torch.Tensor) -> torch.Tensor:
        total = z.new_zeros(())
        h, w = self.mask.shape
        for c in range(3):
            if float(self.lam[c]) == 0.0:
                continue
            img = z.new_zeros((h, w)).masked_scatter(self.mask, z[c])
            dx = (img[1:, :] - img[:-1, :])[self.edge_x]
            dy = (img[:, 1:] - img[:, :-1])[self.edge_y]
            total = total + self.lam[c] * (_phi(dx).sum() + _phi(dy).sum())
        return total

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.data_term(z) + self.tv_term(z)

    def _signal_and_jacobian(self, z: np.ndarray):
        """s (N, V) and ds/dz (3, N, V) in closed form (the Jacobian of signal_model.signed_jacobian
        times dT1/dz = T1 d_0, dPD/dz = pd_ref d_1, dB/dz = d_2)."""
        x = z * self._scale[:, None]
        r1 = np.exp(-x[0])  # 1 / T1
        pd = x[1] * self.pd_ref
        b = x[2]
        e_ti = np.exp(-self._ti * r1)
        shape = 1.0 - b * e_ti  # s / PD
        d_u = -b * self._ti * r1 * e_ti  # (ds/dlogT1) / PD
        d_b = -e_ti  # (ds/dB) / PD
        if self._trec is not None:
            e_tr = np.exp(-self._trec * r1)
            shape = shape + (b - 1.0) * e_tr
            d_u = d_u + (b - 1.0) * self._trec * r1 * e_tr
            d_b = d_b + e_tr
        s = pd * shape
        jac = (pd * d_u * self._scale[0], shape * (self.pd_ref * self._scale[1]), pd * d_b * self._scale[2])
        return s, jac

    def value_and_grad(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        """F(z) and its gradient (3, V) in float64 numpy, in closed form: the data term through the
        analytic Jacobian, dNLL/ds = (s - y sign(s) I_L(k) / I_{L-1}(k)) / sigma^2 (k = y |s| / sigma^2, L the
        coils, 1 for Rician; Gaussian: (s - y sign(s)) / sigma^2; for L > 1 the (L - 1)/mu of the log mu term
        cancels against the derivative of log I_{L-1}), and phi'(t) = t / sqrt(t^2 + eps^2) on every edge.
        The same F as ``__call__`` (tested against autograd and finite differences)."""
        z = np.asarray(z, dtype=np.float64).reshape(3, -1)
        s, jac = self._signal_and_jacobian(z)
        y, s2 = self._y, self.sigma**2
        mu = np.abs(s)
        f = float(np.sum((y - mu) ** 2)) / (2.0 * s2)
        if self.noise == "rician":
            k = y * mu / s2
            i0 = special.i0e(k)
            f -= float(np.sum(np.log(i0)))
            dfds = (s - y * np.sign(s) * (special.i1e(k) / i0)) / s2
        elif self.noise == "ncchi":
            k = y * mu / s2
            order = self.n_coils - 1
            v = special.ive(order, k)  # once: for the value and for the score's ratio
            f += float(np.sum(order * np.log(np.maximum(mu, 1e-300)) - log_ive(order, k, v)))
            ratio = special.ive(order + 1, k) / np.maximum(v, 1e-300)
            dfds = (s - y * np.sign(s) * ratio) / s2
        else:
            dfds = (s - y * np.sign(s)) / s2
        g = np.stack([np.sum(dfds * j, axis=0) for j in jac])
        n = z.shape[1]
        for c in range(3):
            if self._lam[c] == 0.0:
                continue
            t = z[c, self._edge_v] - z[c, self._edge_w]
            q = np.sqrt(t * t + TV_EPS**2)
            f += float(self._lam[c] * np.sum(q - TV_EPS))
            dq = self._lam[c] * t / q
            g[c] += np.bincount(self._edge_v, dq, n) - np.bincount(self._edge_w, dq, n)
        return f, g

    def curvature(self, z: np.ndarray) -> np.ndarray:
        """(3, V) diagonal of a Gauss-Newton approximation of F's Hessian at z: sum_n (ds_n/dz_c)^2 / sigma^2
        plus the prior's curvature at a zero jump, lam_c phi''(0) = lam_c / eps per edge; floored at
        1e-3 x the map's median (voxels without signal). The solver's diagonal preconditioner."""
        _, jac = self._signal_and_jacobian(np.asarray(z, dtype=np.float64).reshape(3, -1))
        h = np.stack([np.sum(j * j, axis=0) for j in jac]) / self.sigma**2
        n = h.shape[1]
        deg = np.bincount(self._edge_v, minlength=n) + np.bincount(self._edge_w, minlength=n)
        h = h + self._lam[:, None] * deg[None, :] / TV_EPS
        med = np.median(h, axis=1, keepdims=True) if n else np.ones((3, 1))
        return np.maximum(h, 1e-3 * np.where(med > 0, med, 1.0))


def _median_crlb(t1, pd, b, protocol: Protocol, sigma: float, pd_ref: float) -> np.ndarray:
    """Median over voxels of the CRLB of (log T1, PD / pd_ref, B) at the given maps."""
    p = torch.as_tensor(np.stack([t1, pd, b], axis=-1), dtype=torch.float64)
    with torch.no_grad():
        c = crlb(p, protocol, float(sigma), dim=-1).numpy()  # (V, 3)
    rel = np.stack([c[:, 0] / t1, c[:, 1] / pd_ref, c[:, 2]], axis=-1)
    out = np.empty(3)
    for k in range(3):
        v = rel[:, k][np.isfinite(rel[:, k]) & (rel[:, k] > 0)]
        out[k] = float(np.median(v)) if v.size else 1.0
    return out


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b without BLAS: OpenBLAS's threaded ddot made each product milliseconds long on a loaded 2-core
    machine (the L-BFGS's 40 products per iteration took 90 % of the time)."""
    return float(np.sum(a * b))


def _lbfgs_box(fun, x0: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_iter: int, tol: float,
               memory: int = 10) -> tuple[np.ndarray, list[float]]:
    """Minimise ``fun`` (x -> (f, gradient)) over the box [lo, hi] by projected L-BFGS.

    The direction is the two-loop L-BFGS product (the last ``memory`` pairs, initial scale s.y / y.y) on
    the variables not held at a bound by the gradient; the step is projected onto the box and halved
    until it meets the Armijo condition f(x_new) <= f + 1e-4 g.(x_new - x), so F decreases at every
    iteration. Stops when an iteration lowers f by less than ``tol`` x max(|f|, 1), after ``n_iter``
    iterations, or when no step of at least 1e-12 decreases f. O(memory x n) per iteration (scipy's
    L-BFGS-B took 0.1-0.4 s per iteration at 39,000 variables, scipy 1.17). Returns x and f per iteration.
    """
    x = np.minimum(np.maximum(np.asarray(x0, dtype=np.float64), lo), hi)
    f, g = fun(x)
    history = [f]
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(n_iter):
        held = ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))
        q = np.where(held, 0.0, g)
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * _dot(s, q)
            q -= a * y
            alphas.append(a)
        r = q * (_dot(pairs[-1][0], pairs[-1][1]) / _dot(pairs[-1][1], pairs[-1][1]) if pairs else 1.0)
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            r += s * (a - rho * _dot(y, r))
        d = -np.where(held, 0.0, r)
        if not _dot(g, d) < 0:  # not a descent direction: restart from the (preconditioned) gradient
            d, pairs = -np.where(held, 0.0, g), []
        t = 1.0
        while True:
            x_new = np.minimum(np.maximum(x + t * d, lo), hi)
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * _dot(g, x_new - x):
                break
            t *= 0.5
            if t < 1e-12:
                return x, history
        s, y = x_new - x, g_new - g
        if _dot(s, y) > 1e-12 * _dot(y, y):
            pairs = [*pairs[-(memory - 1):], (s, y, 1.0 / _dot(s, y))]
        decrease = (f - f_new) / max(abs(f), abs(f_new), 1.0)
        x, f, g = x_new, f_new, g_new
        history.append(f)
        if decrease <= tol:
            break
    return x, history


def fit_slice(data: np.ndarray, mask: np.ndarray, init: tuple, protocol: Protocol, sigma: float,
              noise: str = "rician", tv_weight: float = DEFAULT_TV_WEIGHT, n_iter: int = 300,
              tol: float = 1e-9, n_coils: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Regularised fit of one 2D slice.

    Args:
        data: (H, W, N) magnitudes; mask: (H, W) voxels to fit; init: (t1, pd, b) maps (H, W) to start from.
        tol: stop when an iteration lowers F by less than ``tol`` x max(|F|, 1).
        n_coils: of the noncentral-chi noise (``noise="ncchi"``).

    Returns (t1, pd, b) of the mask voxels (V,) each and a dict (objective per iteration, scales, iterations).
    """
    mask = np.asarray(mask, dtype=bool)
    t1, pd, b = (np.asarray(m, dtype=float)[mask] for m in init)
    pd_ref = float(np.median(np.abs(pd))) if pd.size else 1.0
    pd_ref = pd_ref if pd_ref > 0 else 1.0
    u0 = np.exp(np.clip(np.log(np.maximum(t1, 1e-12)), *LOG_T1_RANGE))
    scale = _median_crlb(u0, np.where(pd == 0, pd_ref, pd), b, protocol, sigma, pd_ref)
    lam = float(tv_weight) * np.array([MAP_WEIGHTS["T1"], MAP_WEIGHTS["PD"], MAP_WEIGHTS["B"]])
    obj = TVObjective(np.asarray(data, dtype=float)[mask], mask, protocol, sigma, noise, pd_ref, scale, lam, n_coils)
    z0 = obj.variables(t1, pd, b).numpy()
    shape = z0.shape
    # diagonal preconditioner: L-BFGS runs on w = D z, D^2 = F's Gauss-Newton curvature at the start
    dg = np.sqrt(obj.curvature(z0)).reshape(-1)
    evaluations = [0]

    def fun(w):
        evaluations[0] += 1
        f, g = obj.value_and_grad(w / dg)
        return f, g.reshape(-1) / dg

    # log T1 kept in LOG_T1_RANGE (a box; PD and B free); a diagonal D keeps it a box
    lo = np.concatenate([np.full(shape[1], LOG_T1_RANGE[0] / scale[0]), np.full(2 * shape[1], -np.inf)]) * dg
    hi = np.concatenate([np.full(shape[1], LOG_T1_RANGE[1] / scale[0]), np.full(2 * shape[1], np.inf)]) * dg
    w, history = _lbfgs_box(fun, z0.reshape(-1) * dg, lo, hi, int(n_iter), tol)
    z = torch.as_tensor(w / dg).reshape(shape)
    with torch.no_grad():
        p = obj.params(z).numpy()
    info = {"objective": history, "iterations": len(history) - 1, "evaluations": evaluations[0],
            "crlb_scale": scale.tolist(), "pd_ref": pd_ref}
    return p[0], np.abs(p[1]), p[2], info


class TVRegularisedModel:
    """``TVRegularisedModel(protocol).fit(data, sigma=...)`` -> :class:`custom_components.methods.fitting.IRFit` (the plain fit's result type).

    Args:
        protocol: the acquisition.
        tv_weight: strength of the prior (>= 0; 0: the plain ML fit), see the module docstring.
        n_iter: L-BFGS iterations per slice at most.
    """

    def __init__(self, protocol: Protocol, tv_weight: float = DEFAULT_TV_WEIGHT, n_iter: int = 300):
        if not np.isfinite(tv_weight) or tv_weight < 0:
            raise ValueError(f"tv_weight must be a number >= 0, got {tv_weight!r}")
        self.protocol = protocol
        self.tv_weight = float(tv_weight)
        self.n_iter = int(n_iter)

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None, noise: str = "rician",
            sigma: float | None = None, init: IRFit | None = None, progress: bool = False,
            n_coils: int = 1) -> IRFit:
        """Fit ``data`` (H, W, N) or (H, W, Z, N) (inversion last; slices along the third axis).

        ``noise``: "rician" (needs ``sigma``), "ncchi" (root-sum-of-squares of ``n_coils`` coils; needs
        ``sigma``, the std per channel) or "gaussian" (``sigma`` None: from the plain fit's residual,
        sqrt(N / (N - 3)) x its median RMS, only to set the prior's scale). ``init``: the plain fit to
        start from (default: computed here, ML with the same noise model, or least squares).
        """
        data = np.asarray(data, dtype=float)
        n = self.protocol.n_images
        if data.ndim not in (3, 4) or data.shape[-1] != n:
            raise ValueError(f"data must be (H, W, N) or (H, W, Z, N) with N = {n} inversion times, got {data.shape}")
        if noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
        if noise != "gaussian" and sigma is None:
            raise ValueError(f"noise={noise!r} needs sigma (see estimate_noise_sigma)")
        if int(n_coils) < 1:
            raise ValueError(f"n_coils must be at least 1, got {n_coils}")
        shape = data.shape[:-1]
        mask = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match the image shape {shape}")
        if init is None:
            init = InversionRecoveryModel(self.protocol, **PRECISE_FIT).fit(data, mask=mask, noise=noise, sigma=sigma,
                                                             n_coils=int(n_coils), progress=progress)
        info = {"method": "tv", "noise": noise, "n_coils": int(n_coils) if noise == "ncchi" else 1, "tv_weight": self.tv_weight,
                "tv_map_weights": dict(MAP_WEIGHTS), "tv_eps": TV_EPS, "init": init.info.get("method")}
        if sigma is None:
            res = init.residual[mask]
            sigma = float(np.median(res) * np.sqrt(n / max(n - 3, 1))) if res.size else 1.0
            info["sigma_source"] = "median residual of the plain fit (scale of the prior only)"
        info["sigma"] = float(sigma)
        d4 = data[:, :, None] if data.ndim == 3 else data
        m3 = mask[:, :, None] if mask.ndim == 2 else mask
        i3 = [(m[:, :, None] if m.ndim == 2 else m) for m in (init.t1, init.pd, init.b)]
        out = [np.zeros(m3.shape) for _ in range(3)]
        slices = range(d4.shape[2])
        if progress:
            from tqdm.auto import tqdm

            slices = tqdm(slices, desc="tv fit", unit="slice")
        per_slice = []
        for k in slices:
            mk = m3[:, :, k]
            if not mk.any():
                continue
            t1, pd, b, si = fit_slice(d4[:, :, k], mk, [m[:, :, k] for m in i3], self.protocol, sigma, noise,
                                      self.tv_weight, self.n_iter, n_coils=int(n_coils))
            for o, v in zip(out, (t1, pd, b)):
                o[:, :, k][mk] = v
            per_slice.append({"slice": k, "iterations": si["iterations"], "objective_start": si["objective"][0],
                              "objective_end": si["objective"][-1], "crlb_scale": si["crlb_scale"]})
        t1, pd, b = (o.reshape(shape) for o in out)
        pred = signed_signal(torch.as_tensor(np.stack([t1[mask], pd[mask], b[mask]])), self.protocol, dim=0)
        resid = np.zeros(shape)
        resid[mask] = np.sqrt(np.mean((pred.abs().numpy().T - data[mask]) ** 2, axis=1))
        info["slices"] = per_slice
        return IRFit(t1=t1, pd=pd, b=b, residual=resid, mask=mask, protocol=self.protocol, info=info)


def fit_tv(data, protocol: Protocol, tv_weight: float = DEFAULT_TV_WEIGHT, **kw) -> IRFit:
    """Shorthand for ``TVRegularisedModel(protocol, tv_weight).fit(data, **kw)``."""
    n_iter = kw.pop("n_iter", 300)
    return TVRegularisedModel(protocol, tv_weight, n_iter).fit(data, **kw)


__all__ = ["DEFAULT_TV_WEIGHT", "MAP_WEIGHTS", "NOISE_MODELS", "TV_EPS", "TVObjective", "TVRegularisedModel",
           "log_ive", "negative_log_likelihood", "fit_slice", "fit_tv"]
