"""The inversion-recovery signal model, its analytic Jacobian and the Cramér-Rao bound.

Signed longitudinal signal at inversion time TI_n (steady state of repeated TRs: the readout
saturates Mz, Mz recovers freely from the end of the readout to the next inversion, TR_n - TI_n -
readout, and again for TI_n until the next readout, so Trec_n = TR_n - readout; inversion efficiency
B: Mz -> (1 - B) Mz):

    s_n = PD (1 - B exp(-TI_n / T1) + (B - 1) exp(-Trec_n / T1))

With full recovery (``Protocol.repetition_time_s is None``) the last term vanishes and the magnitude
is the paper's model  S_n = |PD (1 - B exp(-TI_n / T1))|  (B = 2: ideal inversion). With a constant
TR the signal keeps the paper's form with *apparent* parameters (see :func:`apparent_parameters`;
:func:`physical_parameters` is its exact inverse).

Convention of every method's output maps (docs/physics.md, "Parameter convention"): the parameters
of this full model, i.e. the physical, TR-corrected PD and B (B a property of the inversion pulse,
not of the protocol); they exist for every protocol, a TR that varies per image included.

Parameters are stacked as channels (T1 [s], PD [a.u.], B [1]) along ``dim``; the images come back
with the inversion times along the same ``dim``. Everything is torch (differentiable, batched, any
device/dtype); numpy arrays are accepted and converted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .protocol import Protocol

PARAMETER_NAMES = ("T1", "PD", "B")
PARAMETER_UNITS = ("s", "a.u.", "1")


def _as_tensor(x, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    dtype = like.dtype if like is not None else torch.float64
    device = like.device if like is not None else None
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _protocol_axes(protocol: Protocol, ref: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TI and Trec as tensors shaped to broadcast along ``dim`` of a tensor like ``ref``."""
    nd = ref.ndim
    d = dim % nd
    shape = [1] * nd
    shape[d] = protocol.n_images
    ti = torch.as_tensor(protocol.tis, dtype=ref.dtype, device=ref.device).reshape(shape)
    rec = protocol.recovery_times_s()
    trec = None if rec is None else torch.as_tensor(rec, dtype=ref.dtype, device=ref.device).reshape(shape)
    return ti, trec


def _split(params: torch.Tensor, dim: int):
    if params.shape[dim] != 3:
        raise ValueError(f"expected 3 parameter channels (T1, PD, B) along dim {dim}, got shape {tuple(params.shape)}")
    t1, pd, b = (p for p in torch.split(params, 1, dim=dim))
    return t1, pd, b


def signed_signal(params, protocol: Protocol, dim: int = 0) -> torch.Tensor:
    """Signed signal s_n (before the magnitude), inversion times along ``dim``."""
    params = _as_tensor(params)
    t1, pd, b = _split(params, dim)
    ti, trec = _protocol_axes(protocol, params, dim)
    r1 = 1.0 / t1
    s = pd * (1.0 - b * torch.exp(-ti * r1))
    if trec is not None:
        s = s + pd * (b - 1.0) * torch.exp(-trec * r1)
    return s


def signal(params, protocol: Protocol, dim: int = 0) -> torch.Tensor:
    """Magnitude signal S_n = |s_n|, inversion times along ``dim``."""
    return signed_signal(params, protocol, dim).abs()


def signed_jacobian(params, protocol: Protocol, dim: int = 0) -> torch.Tensor:
    """Analytic d s_n / d(T1, PD, B) of the signed signal.

    Returns a tensor shaped like the signal with one trailing axis of length 3 (T1, PD, B):
        ds/dT1 = PD [-B TI/T1^2 e^{-TI/T1} + (B-1) Trec/T1^2 e^{-Trec/T1}]
        ds/dPD = 1 - B e^{-TI/T1} + (B-1) e^{-Trec/T1}
        ds/dB  = PD [-e^{-TI/T1} + e^{-Trec/T1}]
    """
    params = _as_tensor(params)
    t1, pd, b = _split(params, dim)
    ti, trec = _protocol_axes(protocol, params, dim)
    e_ti = torch.exp(-ti / t1)
    d_t1 = -pd * b * ti / t1**2 * e_ti
    d_pd = 1.0 - b * e_ti
    d_b = -pd * e_ti
    if trec is not None:
        e_tr = torch.exp(-trec / t1)
        d_t1 = d_t1 + pd * (b - 1.0) * trec / t1**2 * e_tr
        d_pd = d_pd + (b - 1.0) * e_tr
        d_b = d_b + pd * e_tr
    shape = torch.broadcast_shapes(d_t1.shape, d_pd.shape, d_b.shape)
    return torch.stack([d.expand(shape) for d in (d_t1, d_pd, d_b)], dim=-1)


def jacobian(params, protocol: Protocol, dim: int = 0) -> torch.Tensor:
    """Analytic Jacobian of the magnitude signal: sign(s_n) d s_n / d(T1, PD, B) (0 at a null)."""
    params = _as_tensor(params)
    return torch.sign(signed_signal(params, protocol, dim)).unsqueeze(-1) * signed_jacobian(params, protocol, dim)


def _constant_recovery_s(protocol: Protocol) -> float | None:
    """The recovery time Trec (s) shared by every image, None with full recovery; raises where TR
    varies between images (apparent parameters then do not exist)."""
    rec = protocol.recovery_times_s()
    if rec is None:
        return None
    if not protocol.has_constant_tr:
        raise ValueError("apparent parameters exist only for a constant TR")
    return float(rec[0])


def apparent_parameters(params, protocol: Protocol, dim: int = 0) -> torch.Tensor:
    """(T1, PD_app, B_app) for which the full-recovery model reproduces a constant-TR signal exactly.

    s = PD (1 + (B-1) e^{-Trec/T1}) (1 - B / (1 + (B-1) e^{-Trec/T1}) e^{-TI/T1}); with full recovery
    the parameters are returned unchanged. Raises for a protocol whose TR varies between images.
    """
    params = _as_tensor(params)
    trec = _constant_recovery_s(protocol)
    if trec is None:
        return params.clone()
    t1, pd, b = _split(params, dim)
    k = 1.0 + (b - 1.0) * torch.exp(-trec / t1)
    return torch.cat([t1, pd * k, b / k], dim=dim)


B_MAX = 2.0  # the largest B that :func:`physical_parameters` returns: B = 1 - cos(flip angle) <= 2 for any inversion


def physical_parameters(params, protocol: Protocol, dim: int = 0, b_max: float = B_MAX) -> torch.Tensor:
    """(T1, PD, B) of the full model from apparent (T1, PD_app, B_app): the exact inverse of
    :func:`apparent_parameters`.

    With E = exp(-Trec/T1) and k = 1 + (B - 1) E (so PD_app = PD k, B_app = B / k):

        B  = B_app (1 - E) / (1 - B_app E),    PD = PD_app (1 - B_app E) / (1 - E)   (= PD_app / k).

    B_app -> B is increasing, and B_app E < 1 for every B < inf, so B_app is first clipped to
    [0, b_max / (1 + (b_max - 1) E)] (the apparent value of B = b_max): beyond it no B <= b_max
    reproduces the signal (an estimate there is noise, not physics; no inversion pulse gives
    B > 2). Measured on the nist15 twin (SNR 50, fit-conditioned Diffusor, docs/physics.md): b_max 2
    against 3 took the mean B bias from +0.66 to +0.05 and the flagged fraction from 92 to 31 %,
    all of it in long T1 (2-2.7 s), where E is large. T1 is unchanged; T1 <= 0 (no
    tissue) and full recovery (``Protocol.repetition_time_s is None``) give E = 0: the parameters
    come back unchanged. Raises for a protocol whose TR varies between images.
    """
    params = _as_tensor(params)
    trec = _constant_recovery_s(protocol)
    if trec is None:
        return params.clone()
    t1, pd_app, b_app = _split(params, dim)
    pos = t1 > 0
    e = torch.where(pos, torch.exp(-trec / torch.where(pos, t1, torch.ones_like(t1))), torch.zeros_like(t1))
    b_app = torch.minimum(b_app.clamp_min(0.0), b_max / (1.0 + (b_max - 1.0) * e))
    k_inv = (1.0 - b_app * e) / (1.0 - e)  # 1 / k, in (0, 1 / (1 - E)]
    return torch.cat([t1, pd_app * k_inv, b_app / k_inv], dim=dim)


class IRSignalModel:
    """``model = IRSignalModel(protocol); images = model(params)``: a differentiable forward operator.

    Attributes mirror the module functions: :meth:`signed`, :meth:`jacobian`, :meth:`crlb`.
    """

    def __init__(self, protocol: Protocol, dim: int = 0):
        self.protocol = protocol
        self.dim = dim

    def __call__(self, params) -> torch.Tensor:
        return signal(params, self.protocol, self.dim)

    def signed(self, params) -> torch.Tensor:
        return signed_signal(params, self.protocol, self.dim)

    def jacobian(self, params) -> torch.Tensor:
        return jacobian(params, self.protocol, self.dim)

    def crlb(self, params, sigma) -> torch.Tensor:
        return crlb(params, self.protocol, sigma, self.dim)


def fisher_information(params, protocol: Protocol, sigma, dim: int = 0) -> torch.Tensor:
    """Fisher information J^T J / sigma^2 of (T1, PD, B) under i.i.d. Gaussian noise of std ``sigma``.

    Returns (..., 3, 3) where ... is the parameter tensor's shape without ``dim``.
    """
    params = _as_tensor(params)
    j = signed_jacobian(params, protocol, dim)  # sign of s does not change J^T J
    j = j.movedim(dim % params.ndim, -2)  # (..., N, 3)
    sigma = _as_tensor(sigma, like=params)
    f = j.transpose(-1, -2) @ j
    s2 = sigma**2
    if s2.ndim:
        s2 = s2.reshape(*s2.shape, 1, 1)
    return f / s2


def crlb(params, protocol: Protocol, sigma, dim: int = 0) -> torch.Tensor:
    """Cramér-Rao lower bound: standard deviations of unbiased (T1 [s], PD, B) estimates.

    Gaussian noise of std ``sigma`` on every image, all three parameters free. Returns a tensor of
    shape (..., 3) (the parameter tensor's shape without ``dim``, then T1, PD, B).
    Reference values (facts.md; PD 1, B 2, paper TIs, SNR 50): T1 1 s -> 46 ms, 0.5 s -> 16 ms.
    Where the Fisher information is singular (the images carry no information on some combination of
    the parameters: e.g. a T1 so short that every image has fully recovered, or no signal at all) the
    bound is infinite: inf for all three of that voxel.
    """
    f = fisher_information(params, protocol, sigma, dim)
    cov, info = torch.linalg.inv_ex(f)
    out = torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0))
    singular = (info != 0)[..., None] | ~torch.isfinite(out)
    return torch.where(singular, torch.full_like(out, float("inf")), out)


def crlb_t1_table(t1s_s, snrs, protocol: Protocol, b: float = 2.0) -> np.ndarray:
    """T1 CRLB in s for PD = 1 on a grid: rows T1 values, columns SNR = PD / sigma."""
    t1 = torch.as_tensor(np.asarray(t1s_s, dtype=float))
    p = torch.stack([t1, torch.ones_like(t1), torch.full_like(t1, b)], dim=-1)
    out = np.zeros((len(t1), len(snrs)))
    for j, snr in enumerate(snrs):
        out[:, j] = crlb(p, protocol, 1.0 / snr, dim=-1)[:, 0].numpy()
    return out


def null_time_s(t1_s: float, b: float = 2.0) -> float:
    """TI at which the full-recovery signal crosses zero: T1 ln(B)."""
    return float(t1_s * math.log(b))


__all__ = ["PARAMETER_NAMES", "PARAMETER_UNITS", "signed_signal", "signal", "signed_jacobian", "jacobian",
           "apparent_parameters", "physical_parameters", "B_MAX", "IRSignalModel", "fisher_information", "crlb", "crlb_t1_table", "null_time_s"]
