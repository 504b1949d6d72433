"""Physics consistency of maps with the images they came from: a check that needs no ground truth.

Any mapping method (the classical fit, a learned network) returns maps (T1 [s], PD [data units],
B [1]) in one convention: the parameters of the full finite-TR model of
:mod:`custom_components.physics.signal_model`,
S_n = |PD (1 - B exp(-TI_n/T1) + (B - 1) exp(-Trec_n/T1))| (the last term vanishes with full
recovery), i.e. TR-corrected PD and B (docs/physics.md, "Parameter convention"; the learned
methods' apparent estimates are converted when decoded). Re-synthesising the images from the maps
with that model and comparing them with the measured magnitudes y_n tells whether the maps
*explain* the data:

- :func:`residual_rms`: r = sqrt(mean_n (y_n - E|S_n|)^2), in the units of the data. With the true
  maps and noise of std sigma per image, E[r^2] = sigma^2 (Gaussian noise on the magnitude).
- :func:`residual_flag`: the test statistic

      X^2 = sum_n ((y_n - E|S_n|) / sigma)^2,   n = 1..N inversion times,

  with E|S_n| the expected magnitude of the re-synthesised signal: the Rician mean
  sigma sqrt(pi/2) L_{1/2}(-S_n^2 / 2 sigma^2) for magnitude data of one coil (``noise="rician"``),
  or |S_n| itself for Gaussian noise added to the magnitude (``noise="gaussian"``). With the true
  maps and (near-)Gaussian noise of std sigma, X^2 follows a chi-square distribution with N degrees
  of freedom, so a voxel is flagged where X^2 > chi2.ppf(1 - alpha, N): the false-alarm rate is about
  alpha, and a flag is evidence, at level alpha, that the maps do not explain the images.

What it can and cannot see: the test measures a discrepancy in *signal space*. An error in the maps
that changes the images by much more than sigma (e.g. T1 wrong by 40 % within the range the TIs
sample) is flagged; an error the data cannot distinguish is not (a long T1 measured with short TIs,
where another (T1, PD, B) triple reproduces the same images to within the noise). A clean flag
therefore does not certify accurate maps; a raised flag does show that they are wrong (or that the
model, the protocol or sigma is).

Everything here is numpy in, numpy out: data arrays are (..., N) with the N inversion times on the
last axis in the order of ``protocol.inversion_times_s``; maps are shaped like the data without
that axis.
"""

from __future__ import annotations

import numpy as np
import torch

from ..physics.image_formation import rician_mean
from ..physics.protocol import Protocol
from ..physics.signal_model import signal

NOISE_MODELS = ("rician", "gaussian")


def _maps(t1_s, pd, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t1, p, bb = (np.asarray(x, dtype=np.float64) for x in (t1_s, pd, b))
    return tuple(np.broadcast_arrays(t1, p, bb))


def resynthesize(t1_s, pd, b, protocol: Protocol) -> np.ndarray:
    """Noiseless magnitude images |S_n| (..., N) from maps T1 (s), PD (data units) and B (1).

    Uses the protocol's full signal model (full recovery or finite TR), in which every method's
    maps are defined (TR-corrected PD and B; see the module doc). Voxels with a non-finite map
    value (NaN or inf in T1, PD or B) get NaN images.
    """
    t1, pd, b = _maps(t1_s, pd, b)
    bad = ~(np.isfinite(t1) & np.isfinite(pd) & np.isfinite(b))
    if bad.any():
        t1, pd, b = np.where(bad, 1.0, t1), np.where(bad, 0.0, pd), np.where(bad, 0.0, b)
    params = torch.from_numpy(np.ascontiguousarray(np.stack([t1, pd, b], axis=-1)))
    with np.errstate(all="ignore"):
        s = signal(params, protocol, dim=-1).numpy()
    if bad.any():
        s[bad] = np.nan
    return s


def _check_sigma(sigma, shape) -> np.ndarray:
    sig = np.asarray(sigma, dtype=np.float64)
    if not np.all(np.isfinite(sig)) or np.any(sig <= 0):
        raise ValueError(f"sigma (noise std per channel, data units) must be finite and > 0, got {sigma!r}")
    return np.broadcast_to(sig, shape)[..., None]


def expected_magnitude(t1_s, pd, b, protocol: Protocol, sigma=None, noise: str = "rician") -> np.ndarray:
    """E|S_n| (..., N): the expected measured magnitude given the maps, in data units.

    ``sigma`` None: the noiseless |S_n|. Otherwise (noise std per real channel, data units; a scalar
    or an array shaped like the maps) with ``noise="rician"`` the Rician mean of |S_n| (one coil),
    with ``noise="gaussian"`` |S_n| (Gaussian noise added to the magnitude has zero mean).
    """
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
    s = resynthesize(t1_s, pd, b, protocol)
    if sigma is None or noise == "gaussian":
        return s
    sig = _check_sigma(sigma, s.shape[:-1])
    with np.errstate(all="ignore"):
        return rician_mean(s, sig)


def _difference(data, t1_s, pd, b, protocol, sigma, noise) -> np.ndarray:
    data = np.asarray(data, dtype=np.float64)
    n = protocol.n_images
    if data.ndim < 1 or data.shape[-1] != n:
        raise ValueError(f"data must have the {n} inversion times of the protocol on its last axis, got shape {data.shape}")
    t1, pd, b = _maps(t1_s, pd, b)
    if t1.shape != data.shape[:-1]:
        t1, pd, b = (np.broadcast_to(x, data.shape[:-1]) for x in (t1, pd, b))
    return data - expected_magnitude(t1, pd, b, protocol, sigma=sigma, noise=noise)


def residual_rms(data, t1_s, pd, b, protocol: Protocol, sigma=None, noise: str = "rician") -> np.ndarray:
    """RMS over the inversion times of data - E|S| (...), in the units of the data.

    Args:
        data: measured magnitude images (..., N), N = protocol.n_images (last axis = inversion).
        t1_s, pd, b: maps (...): T1 in s, PD in data units, inversion efficiency B (2 = ideal).
        protocol: the acquisition (inversion times and TR in s).
        sigma: noise std per real channel in data units (scalar or per voxel). Given, E|S| is the
            Rician mean of the re-synthesised magnitude (``noise="rician"``); None: E|S| = |S|.
        noise: "rician" (magnitude of one coil) or "gaussian" (noise added to the magnitude).

    With the true maps and noise of std sigma on each image the mean of r^2 is sigma^2. Voxels
    with a non-finite map value get NaN.
    """
    d = _difference(data, t1_s, pd, b, protocol, sigma, noise)
    return np.sqrt(np.mean(d**2, axis=-1))


def residual_chi2(data, t1_s, pd, b, protocol: Protocol, sigma, noise: str = "rician") -> np.ndarray:
    """The test statistic X^2 = sum over TIs of ((data - E|S|) / sigma)^2 (...), dimensionless.

    ``sigma`` (required) is the noise std per real channel in data units. NaN where a map value is
    not finite. See :func:`residual_flag`.
    """
    if sigma is None:
        raise ValueError("residual_chi2 needs sigma (noise std per channel, data units)")
    d = _difference(data, t1_s, pd, b, protocol, sigma, noise)
    sig = _check_sigma(sigma, d.shape[:-1])
    return np.sum((d / sig) ** 2, axis=-1)


def flag_threshold(n_images: int, alpha: float = 1e-3) -> float:
    """chi2.ppf(1 - alpha, N): the X^2 above which a voxel is flagged (dimensionless), as 2 P^-1(N / 2, 1 - alpha)
    with the inverse regularised lower incomplete gamma function (scipy.special: no scipy.stats import, which
    costs a command line 0.6 s)."""
    from scipy import special

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(2.0 * special.gammaincinv(0.5 * int(n_images), 1.0 - alpha))


def residual_flag(data, t1_s, pd, b, protocol: Protocol, sigma, alpha: float = 1e-3,
                  noise: str = "rician") -> np.ndarray:
    """True where the maps are inconsistent with the data (bool array shaped like the maps).

    A voxel is flagged where X^2 = sum_n ((data_n - E|S_n|) / sigma)^2 exceeds the chi-square
    quantile with N = protocol.n_images degrees of freedom at 1 - alpha (``scipy.stats.chi2.ppf``).

    Args:
        data: measured magnitude images (..., N), last axis = inversion, in data units.
        t1_s, pd, b: maps (...): T1 in s, PD in data units, B (1).
        protocol: the acquisition (inversion times and TR in s).
        sigma: noise std per real channel in data units (scalar or per voxel), e.g. from
            :func:`custom_components.methods.fitting.estimate_noise_sigma`.
        alpha: false-alarm rate the threshold is set for (dimensionless, 0 < alpha < 1).
        noise: "rician" (magnitude data of one coil: E|S| is the Rician mean) or "gaussian"
            (Gaussian noise added to the magnitude: E|S| = |S|).

    Statistics: under the model, with the true maps and Gaussian-like noise of std sigma, X^2 is
    chi-square with N degrees of freedom and the false-alarm rate is about ``alpha``. Rician noise is
    not Gaussian near the null point of an inversion time (|S| of a few sigma or less: skewed, and
    its variance drops to (2 - pi/2) sigma^2 = 0.43 sigma^2 at |S| = 0), which moves the rate off
    ``alpha``, the more so the lower the SNR. Measured (T1 log-uniform 0.2-3 s, PD 1, B 2, true
    maps, 4e5 voxels, alpha 0.01): paper protocol 0.93 alpha at SNR 50, 0.64 alpha at SNR 10;
    nist15 0.83 alpha at SNR 50. Comparing Gaussian-noise data with the Rician mean (the wrong noise
    model) raises it instead (up to 1.5 alpha at SNR 20). Maps fitted to the same data absorb part of the noise
    (3 parameters: roughly chi-square with N - 3 degrees of freedom), so for a good fit the flag is
    conservative (fewer false alarms than alpha). An error in sigma scales X^2 by its square.

    Blind spots: the flag sees only what changes the images by more than the noise. Errors the data
    cannot distinguish pass unflagged, e.g. a long T1 when the protocol's TIs are all short compared
    with it (another T1 with adjusted PD and B gives the same images within the noise). So no flag
    does not mean accurate maps; a flag means the maps (or the model, protocol or sigma) are wrong.

    Voxels with a non-finite statistic (a NaN/inf map value) are flagged: such maps explain nothing.
    """
    x2 = residual_chi2(data, t1_s, pd, b, protocol, sigma, noise=noise)
    return ~(x2 <= flag_threshold(protocol.n_images, alpha))


__all__ = ["resynthesize", "expected_magnitude", "residual_rms", "residual_chi2", "flag_threshold", "residual_flag",
           "NOISE_MODELS"]
