"""How inversion-recovery images come about: echo-train T2 blurring, k-space truncation, noise.

Each effect is a switch and every random draw takes a seeded ``torch.Generator``. Images are torch
tensors (..., H, W); the phase-encode axis is ``pe_axis`` (default -2, the rows).

Conventions:
- Noise level: ``sigma`` is the std of the complex Gaussian noise per real channel (per coil).
  SNR = PD_ref / sigma with PD_ref = 1 (water); the synthesis scales PD so that water is 1.
- Rician (one coil): y = |s + n_r + i n_i|. Noncentral chi (root-sum-of-squares of n coils with
  uniform sensitivities 1/sqrt(n)): y = sqrt(sum_j |s/sqrt(n) + n_j|^2), so the noiseless RSS is |s|
  and E[y^2] = s^2 + 2 n sigma^2.
- Fast spin echo: each phase-encode line k_y is acquired at echo time t(k_y); a tissue with T2 then
  has its k-space multiplied by exp(-t(k_y)/T2). Centric ordering puts the first echo (TE = echo
  spacing) at the k-space centre, linear ordering puts echo ETL/2 there. The maps a method can
  identify contain the T2 weighting at the effective TE: PD_apparent = PD exp(-TE_eff/T2)
  (:func:`apparent_pd`), which the synthesis uses as the PD label.
- Gibbs ringing: the object is simulated on a finer grid and only the centre of its k-space (the
  acquired matrix) is kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .protocol import Protocol


# ---------------------------------------------------------------------------------------- noise
def add_rician_noise(signal: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Magnitude of (signal + complex Gaussian noise of std ``sigma`` per channel): Rician data.

    ``signal`` may be real (signed) or complex.
    """
    return add_ncchi_noise(signal, sigma, n_coils=1, generator=generator)


def add_ncchi_noise(signal: torch.Tensor, sigma: float | torch.Tensor, n_coils: int = 1,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Root-sum-of-squares over ``n_coils`` coils of uniform sensitivity 1/sqrt(n) (noncentral chi).

    Each coil sees signal / sqrt(n) plus complex Gaussian noise of std ``sigma`` per channel.
    n_coils = 1 gives Rician data.
    """
    if n_coils < 1:
        raise ValueError("n_coils must be >= 1")
    sig = signal if torch.is_complex(signal) else signal.to(torch.complex64 if signal.dtype != torch.float64 else torch.complex128)
    real_dtype = sig.real.dtype
    sigma = torch.as_tensor(sigma, dtype=real_dtype, device=sig.device)
    shape = (n_coils,) + tuple(sig.shape)
    nr = torch.randn(shape, generator=generator, dtype=real_dtype, device=sig.device)
    ni = torch.randn(shape, generator=generator, dtype=real_dtype, device=sig.device)
    coil = sig.unsqueeze(0) / math.sqrt(n_coils) + torch.complex(nr, ni) * sigma
    return torch.sqrt((coil.abs() ** 2).sum(0))


def rician_mean(nu: np.ndarray, sigma: float) -> np.ndarray:
    """E[y] of a Rician variable with noiseless amplitude nu: sigma sqrt(pi/2) L_{1/2}(-nu^2 / 2 sigma^2)."""
    from scipy import special

    x = -np.asarray(nu, dtype=float) ** 2 / (2 * sigma**2)
    # L_{1/2}(x) = e^{x/2} [(1 - x) I0(-x/2) - x I1(-x/2)], with exponentially scaled Bessels
    lag = (1 - x) * special.i0e(-x / 2) - x * special.i1e(-x / 2)  # i0e, i1e: ive(0), ive(1), much faster
    return sigma * np.sqrt(np.pi / 2) * lag


def ncchi_second_moment(nu: np.ndarray, sigma: float, n_coils: int) -> np.ndarray:
    """E[y^2] of the RSS of n coils (noncentral chi with 2n degrees of freedom): nu^2 + 2 n sigma^2."""
    return np.asarray(nu, dtype=float) ** 2 + 2 * n_coils * sigma**2


# ---------------------------------------------------------------------------------------- echo train
def echo_times_per_line(n_lines: int, protocol: Protocol) -> np.ndarray:
    """Echo time (s) at which each phase-encode line of an ``n_lines`` k-space is acquired.

    Lines are in FFT-shifted order (index n_lines // 2 is k_y = 0). With ETL echoes per excitation
    each echo fills n_lines / ETL lines; centric ordering fills from the centre outwards (echo 1 at
    the centre), linear from -k_max to +k_max. A spin echo (ETL 1) acquires every line at TE.
    """
    etl = protocol.echo_train_length
    esp = protocol.echo_spacing_s or protocol.echo_time_s
    if etl <= 1:
        return np.full(n_lines, protocol.echo_time_s)
    idx = np.arange(n_lines)
    centre = n_lines // 2
    if protocol.ordering == "centric":
        rank = np.argsort(np.argsort(np.abs(idx - centre) * 2 + (idx < centre), kind="stable"), kind="stable")
        echo = np.floor(rank * etl / n_lines).astype(int)
    else:
        echo = np.floor(idx * etl / n_lines).astype(int)
    return (echo + 1) * esp


def effective_echo_time_s(protocol: Protocol, n_lines: int = 256) -> float:
    """Echo time at the centre of k-space (what sets the T2 weighting of the contrast)."""
    return float(echo_times_per_line(n_lines, protocol)[n_lines // 2])


def apparent_pd(pd: torch.Tensor, t2_s: torch.Tensor, protocol: Protocol, n_lines: int = 256) -> torch.Tensor:
    """PD exp(-TE_eff / T2): the proton density a fit of the IR model can identify."""
    te = effective_echo_time_s(protocol, n_lines)
    return pd * torch.exp(-te / t2_s.clamp_min(1e-6))


def _t2_bins(t2_s: torch.Tensor, n_bins: int):
    """Log-spaced T2 bins and per-voxel linear weights between the two nearest bins (in log T2)."""
    lt = torch.log(t2_s.clamp(1e-4, 100.0))
    lo, hi = float(lt.min()), float(lt.max())
    if hi - lo < 1e-6:
        return torch.tensor([math.exp(lo)], dtype=t2_s.dtype), [torch.ones_like(t2_s)]
    centres = torch.linspace(lo, hi, n_bins, dtype=t2_s.dtype)
    pos = (lt - lo) / (hi - lo) * (n_bins - 1)
    i0 = pos.floor().clamp(0, n_bins - 2)
    w1 = pos - i0
    weights = []
    for b in range(n_bins):
        w = torch.where(i0 == b, 1 - w1, torch.zeros_like(w1)) + torch.where(i0 == b - 1, w1, torch.zeros_like(w1))
        weights.append(w)
    return torch.exp(centres), weights


def _fft_pe(x: torch.Tensor, pe_axis: int) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(x, dim=pe_axis), dim=pe_axis, norm="ortho"), dim=pe_axis)


def _ifft_pe(k: torch.Tensor, pe_axis: int) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(k, dim=pe_axis), dim=pe_axis, norm="ortho"), dim=pe_axis)


def fse_blur(images: torch.Tensor, t2_s: torch.Tensor, protocol: Protocol, pe_axis: int = -2,
             n_bins: int = 16, include_te_weighting: bool = False) -> torch.Tensor:
    """Apply the echo-train T2 modulation along the phase-encode axis (no change of matrix).

    ``images`` (..., H, W) are signed (or complex) images at each TI, ``t2_s`` (H, W) in s. The
    tissue with T2 is split into log-spaced T2 classes; each class's k-space line k_y is multiplied
    by exp(-(t(k_y) - TE_eff)/T2) (``include_te_weighting=False``: the k-space centre keeps its
    amplitude, so the result's contrast carries PD as given; pass apparent PD for realism) or by
    exp(-t(k_y)/T2). Returns complex images.
    """
    return acquire(images, t2_s, protocol, out_shape=None, echo_train=True, pe_axis=pe_axis, n_bins=n_bins,
                   include_te_weighting=include_te_weighting)


def acquire(images: torch.Tensor, t2_s: torch.Tensor | None, protocol: Protocol, out_shape=None,
            echo_train: bool = True, pe_axis: int = -2, n_bins: int = 16,
            include_te_weighting: bool = False) -> torch.Tensor:
    """k-space acquisition of signed images (..., H, W): echo-train T2 modulation and/or truncation.

    ``out_shape`` (h, w) <= (H, W) keeps only the centre of k-space (Gibbs ringing; the amplitude is
    preserved). ``echo_train`` applies, per T2 class, exp(-(t(k_y) - TE_eff)/T2) to each acquired
    phase-encode line (a no-op for a spin echo, ETL 1). Both are linear, so they act on the same
    k-space. Returns complex images of shape (..., h, w); with neither effect, the input as complex.
    """
    h_in, w_in = images.shape[-2:]
    oh, ow = out_shape if out_shape is not None else (h_in, w_in)
    blur = echo_train and protocol is not None and protocol.echo_train_length > 1 and t2_s is not None
    if not blur and (oh, ow) == (h_in, w_in):
        return images.to(torch.complex128 if images.dtype == torch.float64 else torch.complex64) if not torch.is_complex(images) else images
    if oh > h_in or ow > w_in:
        raise ValueError(f"cannot acquire a {(oh, ow)} k-space from a {(h_in, w_in)} object grid")
    pe = pe_axis % images.ndim
    if pe not in (images.ndim - 2, images.ndim - 1):
        raise ValueError("pe_axis must be one of the last two axes")
    n_lines = oh if pe == images.ndim - 2 else ow
    r0, c0 = h_in // 2 - oh // 2, w_in // 2 - ow // 2
    scale = math.sqrt((oh * ow) / (h_in * w_in))

    def kspace(x):
        k = torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))
        return k[..., r0:r0 + oh, c0:c0 + ow] * scale

    if blur:
        real_dtype = images.real.dtype if torch.is_complex(images) else images.dtype
        t_line = torch.as_tensor(echo_times_per_line(n_lines, protocol), dtype=real_dtype, device=images.device)
        te = 0.0 if include_te_weighting else effective_echo_time_s(protocol, n_lines)
        centres, weights = _t2_bins(t2_s.to(real_dtype), n_bins)
        shape = [1] * images.ndim
        shape[pe] = n_lines
        k = None
        for t2b, w in zip(centres, weights):
            if not torch.any(w > 0):
                continue
            filt = torch.exp(-(t_line - te) / t2b).reshape(shape)
            part = kspace(images * w.to(images.device)) * filt
            k = part if k is None else k + part
    else:
        k = kspace(images)
    return torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho")


# ---------------------------------------------------------------------------------------- k-space truncation
def truncate_kspace(images: torch.Tensor, out_shape: tuple[int, int]) -> torch.Tensor:
    """Keep the central ``out_shape`` of the 2D k-space of (..., H, W) images (Gibbs ringing).

    The amplitude is preserved (a constant image keeps its value). Returns complex images.
    """
    h, w = images.shape[-2:]
    if out_shape[0] > h or out_shape[1] > w:
        raise ValueError(f"cannot truncate k-space of {(h, w)} to a larger {tuple(out_shape)}")
    return acquire(images, None, None, out_shape=out_shape, echo_train=False)


def downsample_area(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool (..., H, W) by an integer factor (the ground truth of a super-sampled scene)."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    return x.reshape(*x.shape[:-2], h // factor, factor, w // factor, factor).mean(dim=(-3, -1))


# ---------------------------------------------------------------------------------------- inversion efficiency
def smooth_field(shape: tuple[int, int], generator: torch.Generator | None = None, order: int = 3,
                 dtype=torch.float64) -> torch.Tensor:
    """A random smooth field in [0, 1]: a sum of low-order 2D cosines with random coefficients."""
    h, w = shape
    y = torch.linspace(0, math.pi, h, dtype=dtype)[:, None]
    x = torch.linspace(0, math.pi, w, dtype=dtype)[None, :]
    f = torch.zeros(h, w, dtype=dtype)
    coef = torch.randn(order + 1, order + 1, generator=generator, dtype=dtype)
    for i in range(order + 1):
        for j in range(order + 1):
            f = f + coef[i, j] / (1 + i + j) * torch.cos(i * y) * torch.cos(j * x)
    f = f - f.min()
    return f / f.max().clamp_min(1e-12)


def smooth_inversion_efficiency(shape: tuple[int, int], generator: torch.Generator | None = None,
                                b_range: tuple[float, float] = (1.8, 2.0), min_span: float = 0.02,
                                dtype=torch.float64) -> torch.Tensor:
    """A smooth inversion-efficiency map B (2 = ideal) spanning a random sub-interval of ``b_range``.

    At 3 T the B1 inhomogeneity of a head gives B of about 1.8-2.0 (facts.md).
    """
    lo, hi = b_range
    u = torch.rand(2, generator=generator, dtype=dtype)
    span = min_span + (hi - lo - min_span) * u[0]
    start = lo + (hi - lo - span) * u[1]
    return start + span * smooth_field(shape, generator, dtype=dtype)


__all__ = ["add_rician_noise", "add_ncchi_noise", "rician_mean", "ncchi_second_moment", "echo_times_per_line",
           "effective_echo_time_s", "apparent_pd", "fse_blur", "acquire", "truncate_kspace", "downsample_area",
           "smooth_field", "smooth_inversion_efficiency"]
