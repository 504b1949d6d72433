"""Scaling between physical maps/images and the network's space (the paper's f(x) = 2 tanh(x) - 1).

Images: divided by a robust signal scale ``s`` of the series (the 99.5th percentile over pixels of
the maximum over inversion times), so a network sees the same range whatever the scanner units.

Maps, per parameter, first normalised so that 0 is the physical lower bound and typical values
are O(1), then squashed by f(x) = 2 tanh(x) - 1 (range [-1, 1), the DDPM's data range):

    x_T1 = T1 / 2 s          (T1 in s;  T1 = 1 s -> x = 0.5 -> y = -0.08; 4.5 s -> y = 0.96)
    x_PD = PD / s            (PD relative to the image's signal scale; water ~ 1)
    x_B  = B / 2             (inversion efficiency; ideal B = 2 -> x = 1 -> y = 0.52)

Inverse: x = atanh((y + 1) / 2) with (y + 1)/2 clipped to [eps, 1 - eps], then the normalisation
undone. Because tanh compresses large x, long T1 (CSF) is coded with less resolution than
short T1 -- a property of the paper's design that the uncertainty maps inherit. The inverse is
steep at the top: y = 1 (the sampler's clip) decodes to T1 = 2 atanh(1 - 1e-6) s = 14.5 s, which is
why ``custom_components.methods.inferers.ensemble_statistics`` clamps outlying members before it
averages them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.transforms import InvertibleTransform, MapTransform

T1_SCALE_S = 2.0
B_SCALE = 2.0
EPS = 1e-6
PERCENTILE = 99.5


def signal_scale(images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Robust signal scale of images (..., N, H, W): 99.5th percentile of the max over TIs.

    Returns a tensor of shape (...) (one value per series), never below a tiny positive floor.
    """
    vmax = images.amax(dim=-3).flatten(-2)  # (..., H*W)
    if mask is not None:
        m = mask.flatten(-2).bool()
        vmax = torch.where(m, vmax, torch.full_like(vmax, float("nan")))
        s = torch.nanquantile(vmax.float(), PERCENTILE / 100, dim=-1)
    else:
        s = torch.quantile(vmax.float(), PERCENTILE / 100, dim=-1)
    return s.to(images.dtype).clamp_min(1e-12)


def map_scale(pd: torch.Tensor, mask: torch.Tensor | None = None, percentile: float = PERCENTILE) -> torch.Tensor:
    """The signal scale of a prior over maps (``map_prior`` Diffusor weights, issue 21): the 99.5th
    percentile of PD (..., H, W) over the voxels of ``mask`` (all where None), one value per map, never
    below a tiny positive floor. In training PD is the true map over the whole slice (``PriorMapsd``, no
    mask: the background's zeros push the percentile down the tissue's distribution); at inference the
    classical fit's, over the voxels with signal. The two differ by that share (a few % of PD for the
    training slices; not corrected in the shipped prior, 0.9.0). Unlike :func:`signal_scale` it does not depend on the protocol (how much
    of PD a short TR or short TIs leave in the images), so the prior's PD channel means the same for
    every protocol. ``percentile``: 99.5 (:data:`PERCENTILE`) for the prior; a protocol-free condition
    (:func:`custom_components.bundle.transforms.fit_crlb_condition`) takes the 90th over the fit's tissue voxels."""
    pd = torch.as_tensor(pd).abs().flatten(-2).float()
    if mask is not None:
        pd = torch.where(torch.as_tensor(mask).flatten(-2).bool(), pd, torch.full_like(pd, float("nan")))
        s = torch.nanquantile(pd, percentile / 100, dim=-1)
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    else:
        s = torch.quantile(pd, percentile / 100, dim=-1)
    return s.clamp_min(1e-12)


def _scales(scale, ref: torch.Tensor) -> torch.Tensor:
    """(T1, PD, B) normalisers of shape (..., 3, 1, 1) for a scale of shape (...)."""
    s = torch.as_tensor(scale, dtype=ref.dtype, device=ref.device)
    s = s.reshape(*s.shape, 1, 1, 1)
    return torch.cat([torch.full_like(s, T1_SCALE_S), s, torch.full_like(s, B_SCALE)], dim=-3)


def encode_maps(maps: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Physical maps (..., 3, H, W) = (T1 s, PD, B) -> network space y = 2 tanh(x) - 1."""
    x = maps / _scales(torch.as_tensor(scale), maps)
    return 2.0 * torch.tanh(x.clamp_min(0.0)) - 1.0


def decode_maps(y: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Network space (..., 3, H, W) -> physical maps (T1 s, PD, B); inverse of :func:`encode_maps`."""
    u = ((y + 1.0) / 2.0).clamp(EPS, 1.0 - EPS)
    return torch.atanh(u) * _scales(torch.as_tensor(scale), y)


class QMRIScaled(MapTransform, InvertibleTransform):
    """Dictionary transform: image /= s, maps in ``keys`` -> tanh space; ``inverse`` maps back.

    ``s`` is :func:`signal_scale` of the image unless the data already hold ``scale_key``; it is
    stored in the data under ``scale_key`` (batched by the data loader like any tensor), and the
    inverse reads it from there, so it applies to any key holding network-space maps ("pred",
    samples, ...) of a single item or a batch.
    """

    def __init__(self, keys: Sequence[Hashable] = ("label",), image_key: str = "image", scale_key: str = "scale",
                 allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.scale_key = scale_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        img = torch.as_tensor(d[self.image_key])
        s = torch.as_tensor(d[self.scale_key]) if self.scale_key in d else signal_scale(img)
        d[self.image_key] = img / s.reshape(*s.shape, 1, 1, 1)
        for key in self.key_iterator(d):
            d[key] = encode_maps(torch.as_tensor(d[key]), s)
        d[self.scale_key] = s
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        s = torch.as_tensor(d[self.scale_key])
        for key in self.key_iterator(d):
            d[key] = decode_maps(torch.as_tensor(d[key]), s)
        return d


__all__ = ["T1_SCALE_S", "B_SCALE", "signal_scale", "map_scale", "encode_maps", "decode_maps", "QMRIScaled"]


#: The information channels of a protocol-free Diffusor's condition (``crlb_condition`` weights, issue 21
#: design (b)): log10 of each parameter's relative Cramér-Rao bound, clipped to this range (0.1 % to
#: 1000 %) and mapped linearly to [-1, 1] (a relative CRLB of 10 %, :data:`custom_components.reporting.robustness.CRLB_LIMIT`,
#: is at 0.5 of the range: y = 0).
CRLB_LOG10_RANGE = (-3.0, 1.0)


def encode_crlb(maps: torch.Tensor, protocol, sigma: float) -> torch.Tensor:
    """How well the images of ``protocol`` determine each voxel's parameters: (3, H, W) in [-1, 1] from
    the Cramér-Rao bound (:func:`custom_components.physics.signal_model.crlb`, Gaussian noise of std
    ``sigma``, the images' units) at the physical maps ``maps`` (3, H, W) = (T1 s, PD, B) (the classical
    fit's): y = 2 (log10(CRLB_k / |p_k|) - lo) / (hi - lo) - 1 for k = T1, PD, B, clipped to
    :data:`CRLB_LOG10_RANGE`. Voxels without signal (PD <= 0) and singular ones get 1 (not determined).
    Depends only on the ratio PD / sigma, so on neither the image units nor the map scale: the same
    number means the same precision in every protocol."""
    from ..physics.signal_model import crlb

    if not (sigma is not None and float(sigma) > 0 and torch.isfinite(torch.as_tensor(float(sigma)))):
        raise ValueError(f"the CRLB condition needs a finite noise std > 0, got {sigma!r}")
    m = torch.as_tensor(maps, dtype=torch.float64)
    bound = crlb(m, protocol, float(sigma), dim=-3).movedim(-1, -3)  # (3, H, W)
    rel = bound / m.abs().clamp_min(1e-12)
    lo, hi = CRLB_LOG10_RANGE
    lg = torch.log10(rel.clamp_min(1e-30))
    lg = torch.where(torch.isfinite(lg), lg, torch.full_like(lg, hi)).clamp(lo, hi)
    y = 2.0 * (lg - lo) / (hi - lo) - 1.0
    y = torch.where((m[..., 1:2, :, :] > 0) & (m[..., 0:1, :, :] > 0), y, torch.ones_like(y))
    dtype = torch.as_tensor(maps).dtype
    return y.to(dtype if dtype.is_floating_point else torch.float32)
