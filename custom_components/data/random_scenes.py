"""Random label scenes for training: maps that are not a brain and not a phantom (issue 21, item 2).

In the spirit of SynthSeg (Billot et al. 2023): a network that sees only brains learns the brain's
T1 distribution and layout as well as the physics, and on a phantom it was not trained on it reads
that context (issue 20: the fit-conditioned Diffusor read 6-10 % low on an independent NIST twin).
Here every scene is drawn from scratch:

- a label map: the argmax of ``n_labels`` independent smooth Gaussian random fields (white noise
  low-passed by a Gaussian of length ``correlation_px`` in k-space), so regions are random blobs of
  random size, with no anatomy;
- per label, T1 log-uniform in ``t1_range_s`` (0.02-5 s, the range of issue 21), T2 = T1 x
  U(``t2_fraction``) capped at ``t2_max_s`` (so T2 < T1), PD uniform in ``pd_range``; with probability
  ``background_probability`` one label is signal-free (PD 0: air or plastic);
- within every label a smooth relative variation of T1 and PD (std ``texture`` x a unit field);
- ``n_objects`` phantom-like disks (spheres of the NIST/ISMRM phantom, vials) on top, each with its
  own T1/T2/PD drawn as for a label and, with probability ``wall_probability``, a signal-free wall
  ``wall_px`` pixels thick around it.

The B map, noise, echo train and partial volume come from the dataset's rendering
(:class:`custom_components.data.synthesis.SyntheticIRDataset`), as for any scene. Select it in a
:class:`custom_components.data.synthesis.SynthesisConfig` with ``scene="random_labels"`` and the
fields below in ``random_scenes``. The ranges are modelling choices (where the issue names one, its
value), not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .tissues import PD_MASK_THRESHOLD


def _pair(name: str, value, lo: float = 0.0) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and lo <= a <= b):
        raise ValueError(f"{name} must satisfy {lo:g} <= low <= high, got {value!r}")
    return a, b


def gaussian_random_field(shape: tuple[int, int], correlation_px: float, rng: np.random.Generator) -> np.ndarray:
    """A zero-mean, unit-std smooth random field (H, W): white noise filtered by a Gaussian of std
    ``correlation_px`` pixels (multiplication by its transform in k-space; periodic boundaries)."""
    h, w = shape
    noise = rng.standard_normal((h, w))
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    filt = np.exp(-2.0 * (math.pi * correlation_px) ** 2 * (ky**2 + kx**2))
    f = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=(h, w))
    sd = f.std()
    return (f - f.mean()) / (sd if sd > 0 else 1.0)


@dataclass(frozen=True)
class RandomLabelScenes:
    """A scene function (``scene(rng, slice_index, realisation, shape)`` -> T1, T2, PD, mask, labels)
    drawing random label scenes (module doc). All draws come from ``rng``."""

    n_labels: tuple[int, int] = (4, 24)
    t1_range_s: tuple[float, float] = (0.02, 5.0)
    t2_fraction: tuple[float, float] = (0.05, 0.9)
    t2_max_s: float = 2.0
    pd_range: tuple[float, float] = (0.3, 1.0)
    background_probability: float = 0.5
    correlation_px: tuple[float, float] = (0.03, 0.2)  # relative to min(H, W)
    texture: tuple[float, float] = (0.0, 0.05)
    n_objects: tuple[int, int] = (0, 4)
    object_radius: tuple[float, float] = (0.03, 0.12)  # relative to min(H, W)
    wall_probability: float = 0.5
    wall_px: tuple[float, float] = (1.0, 3.0)

    def __post_init__(self):
        lo, hi = (int(v) for v in self.n_labels)
        if not 1 <= lo <= hi:
            raise ValueError(f"n_labels must satisfy 1 <= low <= high, got {self.n_labels!r}")
        olo, ohi = (int(v) for v in self.n_objects)
        if not 0 <= olo <= ohi:
            raise ValueError(f"n_objects must satisfy 0 <= low <= high, got {self.n_objects!r}")
        t1 = _pair("t1_range_s", self.t1_range_s)
        if t1[0] <= 0:
            raise ValueError(f"t1_range_s must be positive, got {self.t1_range_s!r}")
        _pair("t2_fraction", self.t2_fraction)
        _pair("pd_range", self.pd_range)
        _pair("correlation_px", self.correlation_px)
        _pair("texture", self.texture)
        _pair("object_radius", self.object_radius)
        _pair("wall_px", self.wall_px)
        for name in ("background_probability", "wall_probability"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        if not self.t2_max_s > 0:
            raise ValueError(f"t2_max_s must be positive, got {self.t2_max_s!r}")

    def _tissue(self, rng: np.random.Generator) -> tuple[float, float, float]:
        """(T1 s, T2 s, PD) of one label or object."""
        lo, hi = self.t1_range_s
        t1 = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        t2 = min(t1 * rng.uniform(*self.t2_fraction), self.t2_max_s)
        return t1, t2, rng.uniform(*self.pd_range)

    def __call__(self, rng: np.random.Generator, slice_index: int, realisation: int, shape: tuple[int, int]) -> dict:
        h, w = (int(x) for x in shape)
        side = min(h, w)
        k = int(rng.integers(self.n_labels[0], self.n_labels[1] + 1))
        corr = side * rng.uniform(*self.correlation_px)
        fields = np.stack([gaussian_random_field((h, w), corr, rng) for _ in range(k)])
        labels = fields.argmax(axis=0)
        values = np.array([self._tissue(rng) for _ in range(k)])  # (k, 3): T1, T2, PD
        if rng.random() < self.background_probability:
            values[int(rng.integers(k)), 2] = 0.0
        t1, t2, pd = (values[labels, j] for j in range(3))
        tex = rng.uniform(*self.texture)
        t1 = t1 * np.exp(tex * gaussian_random_field((h, w), corr, rng))
        pd = pd * np.clip(1.0 + tex * gaussian_random_field((h, w), corr, rng), 0.0, None)
        t2 = np.minimum(t2, t1)
        yy, xx = np.mgrid[0:h, 0:w]
        for j in range(int(rng.integers(self.n_objects[0], self.n_objects[1] + 1))):
            r = side * rng.uniform(*self.object_radius)
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
            d = np.hypot(yy - cy, xx - cx)
            o1, o2, opd = self._tissue(rng)
            if rng.random() < self.wall_probability:
                wall = (d >= r) & (d < r + rng.uniform(*self.wall_px))
                pd = np.where(wall, 0.0, pd)
                labels = np.where(wall, -1, labels)
            inside = d < r
            t1, t2, pd = np.where(inside, o1, t1), np.where(inside, o2, t2), np.where(inside, opd, pd)
            labels = np.where(inside, k + j, labels)
        return {"T1": t1, "T2": t2, "PD": pd, "mask": pd >= PD_MASK_THRESHOLD, "labels": labels}


__all__ = ["RandomLabelScenes", "gaussian_random_field"]
