"""Tissue parameter distributions at 3 T and random T1/T2/PD maps on an anatomy.

One *realisation* (the paper gave each anatomical slice 4) is drawn by :func:`sample_parameter_maps`:

1. per tissue, a mean T1, T2 and PD drawn uniformly within the tissue's range
   (:data:`TISSUE_PARAMETERS_3T`);
2. per tissue and parameter, a multiplicative spatial variation: a smooth, low-frequency random
   field (default std 3 %, correlation length 32 px) plus voxel-wise texture (std 1 %), the total
   clipped to +-10 % (:class:`Variation`), PD capped at 1 (water);
3. partial volume: with tissue fractions (the ``probs`` of :mod:`custom_components.data.anatomy`) each
   voxel mixes its compartments -- PD linearly, ``PD = sum_k f_k PD_k``, and the relaxation *rates*
   weighted by each compartment's magnetisation ``f_k PD_k``: ``R1 = sum_k f_k PD_k / T1_k / PD``
   (same for R2). This is the fast-exchange (single exponential) limit, which keeps one T1 per voxel
   as the maps require; without exchange the true recovery would be multi-exponential.
4. optionally (``wide_t1=True``) random objects with T1 from 20 ms to 4.5 s (:class:`WideT1`).

T1 and T2 are in seconds, PD relative to pure water (CSF = 1). Every random number comes from the
numpy Generator passed in (or one seeded with the given int), so a seed fixes the maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .anatomy import N_TISSUES, Tissue


@dataclass(frozen=True)
class TissueParameters:
    """Ranges (low, high) of one tissue's parameters: T1 and T2 in s, PD relative to water.

    Attributes:
        t1_s, t2_s, pd: ranges within which a realisation's tissue mean is drawn (uniformly).
        t1_typical_s: a literature mean of T1, for documentation (None where not given).
        source: where the numbers come from.
    """

    t1_s: tuple[float, float]
    t2_s: tuple[float, float]
    pd: tuple[float, float]
    t1_typical_s: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("t1_s", "t2_s", "pd"):
            lo, hi = getattr(self, name)
            if not (0 <= lo <= hi) or (name != "pd" and lo <= 0):
                raise ValueError(f"{name} range must satisfy 0 < low <= high (PD: 0 <= low), got {(lo, hi)}")


_TABLE_SOURCE = ("3 T tissue table of the project's reference facts: Bojorquez et al. 2017 (MRI 35:69-80), "
                 "Stanisz et al. 2005 (MRM 54:507-512), BrainWeb (Aubert-Broche et al. 2006)")

# 3 T values (T1, T2 in s). Background carries no signal: PD 0, and T1 = 1 s / T2 = 0.1 s only so that
# the maps are defined everywhere (the same T1 as the RIM's starting value); it is flagged by the mask.
TISSUE_PARAMETERS_3T: Mapping[Tissue, TissueParameters] = {
    Tissue.BACKGROUND: TissueParameters((1.0, 1.0), (0.1, 0.1), (0.0, 0.0), None,
                                        "no signal; placeholder relaxation times"),
    # WM 800-1500 ms (Bojorquez mean about 970), T2 60-100 ms, PD 0.6-0.8
    Tissue.WM: TissueParameters((0.80, 1.50), (0.060, 0.100), (0.60, 0.80), 0.97, _TABLE_SOURCE),
    # GM 1200-2000 ms (mean about 1460), T2 80-120 ms, PD 0.75-0.9
    Tissue.GM: TissueParameters((1.20, 2.00), (0.080, 0.120), (0.75, 0.90), 1.46, _TABLE_SOURCE),
    # CSF 3000-4500 ms (about 4200), T2 1300-2000 ms, PD 1.0
    Tissue.CSF: TissueParameters((3.00, 4.50), (1.300, 2.000), (1.00, 1.00), 4.2, _TABLE_SOURCE),
    # fat 300-500 ms, T2 60-110 ms, PD 0.9-1.0
    Tissue.FAT: TissueParameters((0.30, 0.50), (0.060, 0.110), (0.90, 1.00), None, _TABLE_SOURCE),
    # muscle 1200-1500 ms, T2 35-50 ms, PD 0.9-1.0
    Tissue.MUSCLE: TissueParameters((1.20, 1.50), (0.035, 0.050), (0.90, 1.00), None, _TABLE_SOURCE),
    # blood 1600-2100 ms, T2 150-300 ms, PD 0.8-0.9
    Tissue.BLOOD: TissueParameters((1.60, 2.10), (0.150, 0.300), (0.80, 0.90), None, _TABLE_SOURCE),
    # Cortical bone as a spin echo with TE of several ms sees it: its bound water (T2 about 0.4 ms,
    # Horch et al. 2012, MRM 68:1774) has decayed, what remains is pore water: T1 524 +- 46 ms in vivo at
    # 3 T (Chen et al. 2017, MRM 77:2136, tibial midshaft), so 0.45-0.60 s; pore-water T2 spans about
    # 1 ms-1 s (Horch 2012), 5-50 ms taken here. Bone is about 20-25 % water by volume, mostly bound,
    # so the apparent PD is small: 0-0.05 (a modelling choice within that bound).
    Tissue.BONE: TissueParameters((0.45, 0.60), (0.005, 0.050), (0.00, 0.05), 0.524,
                                  "Chen et al. 2017 (pore-water T1); Horch et al. 2012; apparent PD: modelling choice"),
}


@dataclass(frozen=True)
class Variation:
    """Spatial variation of each tissue's parameters within a slice (multiplicative, relative).

    The factor applied to a tissue's mean is ``1 + clip(smooth_rel_std * s + texture_rel_std * n,
    -max_rel_deviation, +max_rel_deviation)`` with ``s`` a smooth zero-mean, unit-std random field
    (Gaussian bumps on a grid every ``correlation_px`` pixels) and ``n`` white noise. The amplitudes
    are modelling choices ("a few %"), not measurements.
    """

    smooth_rel_std: float = 0.03
    correlation_px: float = 32.0
    texture_rel_std: float = 0.01
    max_rel_deviation: float = 0.10


@dataclass(frozen=True)
class WideT1:
    """Random objects that widen the T1 distribution (``wide_t1=True``).

    The paper's Diffusor was strongly biased below T1 = 400 ms, which brain training data hardly
    contains. Each realisation therefore also gets ``n_objects`` (uniform integer in the range) soft
    ellipses, each an extra compartment that replaces a fraction ``alpha`` of whatever lies beneath
    (``alpha`` = 1 inside, a linear ramp of width ``edge_px`` across the border, 0 outside):

    - centre uniform over the image (minus a 5 % border): objects fall on tissue and on background,
      like phantom vials in air or water;
    - semi-axes uniform in ``semi_axis_frac`` x min(H, W), orientation uniform in [0, pi);
    - T1 log-uniform in ``t1_range_s`` (20 ms, the shortest NIST/ISMRM phantom T1 sphere at 3 T
      is about 21 ms, up to 4.5 s, the top of CSF); T2 = T1 x U(``t2_fraction``) capped at
      ``t2_max_s`` (CSF's upper T2), so T2 < T1; PD uniform in ``pd_range``;
    - the same :class:`Variation` as tissue;
    - with probability ``wall_probability`` a wall: a shell ``wall_px`` (uniform in the range) pixels
      thick around the ellipse without signal (PD 0, like a vial's plastic or the spheres of the
      NIST/ISMRM phantom), which replaces what lies beneath. With the default 0 no wall is drawn and
      the random stream is that of earlier versions.

    In addition, when ``global_t1_scale`` is not None every tissue's T1 mean is multiplied by one
    factor per realisation, log-uniform in that range, so whole-brain T1 shifts too.
    """

    n_objects: tuple[int, int] = (2, 6)
    t1_range_s: tuple[float, float] = (0.02, 4.5)
    t2_fraction: tuple[float, float] = (0.05, 0.9)
    t2_max_s: float = 2.0
    pd_range: tuple[float, float] = (0.5, 1.0)
    semi_axis_frac: tuple[float, float] = (0.015, 0.12)
    edge_px: tuple[float, float] = (0.5, 2.0)
    global_t1_scale: tuple[float, float] | None = (0.75, 1.33)
    wall_probability: float = 0.0
    wall_px: tuple[float, float] = (1.0, 3.0)

    def __post_init__(self):
        if not 0.0 <= self.wall_probability <= 1.0:
            raise ValueError(f"wall_probability must be in [0, 1], got {self.wall_probability}")
        if not 0.0 < self.wall_px[0] <= self.wall_px[1]:
            raise ValueError(f"wall_px must satisfy 0 < low <= high, got {self.wall_px}")


# A voxel is "in the mask" when its PD is at least this: background (PD 0) and bone (apparent PD at
# most 0.05) are out, so are edge voxels whose T1 the signal barely determines.
PD_MASK_THRESHOLD = 0.1


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def tissue_fractions(tissue) -> np.ndarray:
    """Tissue fractions (C, H, W) float32 from labels (H, W), fractions (C, H, W) or a slice dict."""
    if isinstance(tissue, Mapping):
        tissue = tissue["probs"] if "probs" in tissue else tissue["labels"]
    arr = np.asarray(tissue)
    if arr.ndim == 2:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError("a 2-D tissue map must hold integer labels")
        if arr.size and (arr.min() < 0 or arr.max() >= N_TISSUES):
            raise ValueError(f"labels must be Tissue values 0..{N_TISSUES - 1}")
        return (np.arange(N_TISSUES)[:, None, None] == arr[None]).astype(np.float32)
    if arr.ndim == 3 and arr.shape[0] == N_TISSUES:
        return np.clip(arr.astype(np.float32), 0.0, None)
    raise ValueError(f"expected labels (H, W) or fractions ({N_TISSUES}, H, W), got shape {arr.shape}")


def _interpolation_matrix(n: int, spacing: float) -> np.ndarray:
    """(n, m) weights of Gaussian bumps centred every ``spacing`` pixels, covering n pixels."""
    m = int(math.ceil(n / spacing)) + 3
    centres = (np.arange(m) - 1.5) * spacing
    x = np.arange(n)[:, None]
    return np.exp(-0.5 * ((x - centres[None]) / (0.6 * spacing)) ** 2)


def smooth_fields(rng: np.random.Generator, count: int, shape: tuple[int, int], correlation_px: float) -> np.ndarray:
    """``count`` smooth random fields (count, H, W), each zero-mean with unit std over the image.

    Gaussian bumps with random N(0, 1) weights on a grid every ``correlation_px`` pixels.
    """
    bh = _interpolation_matrix(shape[0], correlation_px)
    bw = _interpolation_matrix(shape[1], correlation_px)
    weights = rng.normal(size=(count, bh.shape[1], bw.shape[1]))
    fields = np.einsum("ik,ckl,jl->cij", bh, weights, bw, optimize=True)
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= np.maximum(fields.std(axis=(1, 2), keepdims=True), 1e-12)
    return fields.astype(np.float32)


def _variation_factors(rng: np.random.Generator, count: int, shape: tuple[int, int], v: Variation) -> np.ndarray:
    """(count, H, W) multiplicative factors ``1 + clipped smooth + texture`` (see :class:`Variation`)."""
    dev = np.zeros((count,) + shape, dtype=np.float32)
    if v.smooth_rel_std > 0:
        dev += np.float32(v.smooth_rel_std) * smooth_fields(rng, count, shape, v.correlation_px)
    if v.texture_rel_std > 0:
        dev += np.float32(v.texture_rel_std) * rng.standard_normal(size=dev.shape, dtype=np.float32)
    return 1.0 + np.clip(dev, -v.max_rel_deviation, v.max_rel_deviation)


def draw_tissue_means(rng: np.random.Generator | int | None = None,
                      parameters: Mapping[Tissue, TissueParameters] = TISSUE_PARAMETERS_3T,
                      t1_scale: float = 1.0) -> dict[Tissue, tuple[float, float, float]]:
    """One realisation's tissue means {tissue: (T1 s, T2 s, PD)}, uniform within each range.

    ``t1_scale`` multiplies every T1 (the wide-T1 global scale); T2 is then capped at T1.
    """
    rng = _as_rng(rng)
    means = {}
    for tissue in Tissue:
        p = parameters[tissue]
        t1 = rng.uniform(*p.t1_s) * (t1_scale if tissue != Tissue.BACKGROUND else 1.0)
        t2 = min(rng.uniform(*p.t2_s), t1)
        pd = rng.uniform(*p.pd)
        means[tissue] = (float(t1), float(t2), float(pd))
    return means


def _ellipse_alpha(shape: tuple[int, int], centre: np.ndarray, semi_axes: np.ndarray, angle: float,
                   edge_px: float) -> np.ndarray:
    """Soft ellipse coverage in [0, 1]: 1 inside, a linear ramp ``edge_px`` wide across the border."""
    r, c = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    dr, dc = r - centre[0], c - centre[1]
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * dr + sin * dc) / semi_axes[0]
    w = (-sin * dr + cos * dc) / semi_axes[1]
    rho = np.sqrt(u * u + w * w)
    # approximate signed distance to the border (pixels), exact on a circle
    distance = (rho - 1.0) * float(min(semi_axes))
    return np.clip(0.5 - distance / max(edge_px, 1e-3), 0.0, 1.0).astype(np.float32)


def sample_parameter_maps(tissue, rng: np.random.Generator | int | None = None, *, wide_t1: bool = False,
                          parameters: Mapping[Tissue, TissueParameters] = TISSUE_PARAMETERS_3T,
                          variation: Variation = Variation(), wide: WideT1 = WideT1(),
                          pd_mask_threshold: float = PD_MASK_THRESHOLD) -> dict:
    """One realisation of T1, T2 and PD maps on an anatomy.

    Args:
        tissue: labels (H, W) of :class:`Tissue` values, fractions (C, H, W), or a slice dict from
            :mod:`custom_components.data.anatomy` (its ``probs`` are used).
        rng: numpy Generator or seed.
        wide_t1: add random objects with T1 from 20 ms to 4.5 s and scale tissue T1 globally
            (:class:`WideT1`), so that short T1 is in the training distribution.
        parameters: per-tissue ranges (default :data:`TISSUE_PARAMETERS_3T`).
        variation: within-tissue spatial variation (:class:`Variation`).
        wide: options of the wide-T1 mode.
        pd_mask_threshold: PD below which a voxel is outside ``mask``.

    Returns:
        dict with ``T1`` (H, W) float32 s, ``T2`` (H, W) float32 s, ``PD`` (H, W) float32,
        ``mask`` (H, W) bool (PD >= ``pd_mask_threshold``: tissue that gives signal), ``means``
        ({Tissue: (T1, T2, PD)} drawn for this realisation) and ``objects`` (list of dicts with the
        wide-T1 objects' centre, semi_axes, angle, T1_s, T2_s, PD; empty by default).
    """
    rng = _as_rng(rng)
    fractions = tissue_fractions(tissue)
    shape = fractions.shape[1:]
    t1_scale = 1.0
    if wide_t1 and wide.global_t1_scale is not None:
        lo, hi = wide.global_t1_scale
        t1_scale = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    means = draw_tissue_means(rng, parameters, t1_scale)

    present = [t for t in Tissue if t != Tissue.BACKGROUND and fractions[t].max() > 0]
    factors = _variation_factors(rng, 3 * len(present), shape, variation).reshape(len(present), 3, *shape)
    comp_fraction = [fractions[t] for t in present]
    comp_t1 = [means[t][0] * factors[i, 0] for i, t in enumerate(present)]
    comp_t2 = [np.minimum(means[t][1] * factors[i, 1], comp_t1[i]) for i, t in enumerate(present)]
    comp_pd = [np.minimum(means[t][2] * factors[i, 2], 1.0) for i, t in enumerate(present)]
    background = fractions[Tissue.BACKGROUND]

    objects = []
    if wide_t1:
        n_obj = int(rng.integers(wide.n_objects[0], wide.n_objects[1] + 1))
        obj_factors = _variation_factors(rng, 3 * n_obj, shape, variation).reshape(n_obj, 3, *shape)
        size = min(shape)
        for k in range(n_obj):
            centre = np.array([rng.uniform(0.05, 0.95) * shape[0], rng.uniform(0.05, 0.95) * shape[1]])
            semi_axes = rng.uniform(*wide.semi_axis_frac, size=2) * size
            angle = float(rng.uniform(0.0, math.pi))
            edge = float(rng.uniform(*wide.edge_px))
            t1 = float(math.exp(rng.uniform(math.log(wide.t1_range_s[0]), math.log(wide.t1_range_s[1]))))
            t2 = float(min(t1 * rng.uniform(*wide.t2_fraction), wide.t2_max_s))
            pd = float(rng.uniform(*wide.pd_range))
            alpha = _ellipse_alpha(shape, centre, semi_axes, angle, edge)
            wall_px = 0.0
            if wide.wall_probability > 0 and rng.uniform() < wide.wall_probability:
                wall_px = float(rng.uniform(*wide.wall_px))
            outer = alpha if wall_px == 0 else _ellipse_alpha(shape, centre, semi_axes + wall_px, angle, edge)
            keep = 1.0 - outer
            comp_fraction = [f * keep for f in comp_fraction]
            background = background * keep + np.clip(outer - alpha, 0.0, 1.0)  # the wall carries no signal
            comp_fraction.append(alpha)
            obj_t1 = t1 * obj_factors[k, 0]
            comp_t1.append(obj_t1)
            comp_t2.append(np.minimum(t2 * obj_factors[k, 1], obj_t1))
            comp_pd.append(np.minimum(pd * obj_factors[k, 2], 1.0))
            objects.append({"centre": tuple(float(x) for x in centre), "semi_axes": tuple(float(x) for x in semi_axes),
                            "angle": angle, "T1_s": t1, "T2_s": t2, "PD": pd, "wall_px": wall_px})

    bg_t1, bg_t2, _ = means[Tissue.BACKGROUND]
    pd_map = np.zeros(shape, dtype=np.float32)
    r1_num = np.zeros(shape, dtype=np.float32)
    r2_num = np.zeros(shape, dtype=np.float32)
    # fallback for voxels without magnetisation: fraction-weighted rates (background counts as T1 = 1 s)
    r1_plain = background / np.float32(bg_t1)
    r2_plain = background / np.float32(bg_t2)
    frac_sum = background.copy()
    for f, t1, t2, pd in zip(comp_fraction, comp_t1, comp_t2, comp_pd):
        m = f * pd
        pd_map += m
        r1_num += m / t1
        r2_num += m / t2
        r1_plain += f / t1
        r2_plain += f / t2
        frac_sum += f
    frac_sum = np.maximum(frac_sum, 1e-12)
    has_signal = pd_map > 1e-6
    safe_pd = np.where(has_signal, pd_map, 1.0)
    r1 = np.where(has_signal, r1_num / safe_pd, r1_plain / frac_sum)
    r2 = np.where(has_signal, r2_num / safe_pd, r2_plain / frac_sum)
    return {
        "T1": (1.0 / r1).astype(np.float32),
        "T2": (1.0 / r2).astype(np.float32),
        "PD": pd_map.astype(np.float32),
        "mask": pd_map >= pd_mask_threshold,
        "means": means,
        "objects": objects,
    }


def sample_realisations(tissue, rng: np.random.Generator | int | None = None, n: int = 4, **kwargs) -> list[dict]:
    """``n`` independent realisations of :func:`sample_parameter_maps` on one anatomy (paper: 4)."""
    rng = _as_rng(rng)
    fractions = tissue_fractions(tissue)
    return [sample_parameter_maps(fractions, rng, **kwargs) for _ in range(n)]


def t1_histogram_coverage(t1_maps: Sequence[np.ndarray] | np.ndarray, masks: Sequence[np.ndarray] | None = None,
                          edges_s: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of masked voxels per T1 bin, pooled over maps: how well a data set covers T1.

    Args:
        t1_maps: one map or a sequence of maps (s).
        masks: boolean masks like the maps (default: all voxels).
        edges_s: bin edges in s (default 30 log-spaced bins from 10 ms to 10 s).

    Returns:
        (edges_s, fractions) with ``fractions[i]`` the share of voxels in [edges[i], edges[i+1]).
    """
    maps = [np.asarray(t1_maps)] if np.ndim(t1_maps) == 2 else [np.asarray(m) for m in t1_maps]
    if masks is None:
        masks = [np.ones(m.shape, dtype=bool) for m in maps]
    masks = [np.asarray(masks)] if np.ndim(masks) == 2 else [np.asarray(m, dtype=bool) for m in masks]
    edges = np.geomspace(0.01, 10.0, 31) if edges_s is None else np.asarray(edges_s, dtype=float)
    values = np.concatenate([m[k] for m, k in zip(maps, masks)]) if maps else np.zeros(0)
    counts, _ = np.histogram(values, bins=edges)
    return edges, counts / max(values.size, 1)
