"""Where synthetic brains come from: tissue classes, a head built from the MNI template, BrainWeb.

The qMRI Diffusor paper (section 3.2) drew 994 axial slices from 14 BrainWeb brain models and gave
each slice 4 realisations of tissue parameters. BrainWeb must be downloaded by the user, so this
module offers two anatomy sources that produce the same slice format:

- :func:`mni_tissue_volume` -- a head built with no download from the MNI ICBM152 2009 (symmetric,
  nonlinear) templates shipped inside nilearn's wheel. One template, so diversity comes from random
  geometry: :func:`sample_slice` / :func:`axial_slices` apply a random affine (rotation, scaling,
  shear, translation), a smooth elastic deformation (MONAI ``Rand2DElastic``) and left-right flips.
- :func:`load_brainweb_discrete` + :func:`brainweb_slices` -- BrainWeb's discrete ("crisp") models
  for users who downloaded them.

A slice is a dict with ``labels`` (H, W) int64 (values of :class:`Tissue`) and ``probs`` (C, H, W)
float32 tissue fractions (C = ``N_TISSUES``, summing to 1 in every pixel; ``labels`` is their argmax),
plus ``index``, ``z_mm``, ``pixel_size_mm`` and ``flipped``. Images are shown radiologically: rows go
from anterior to posterior, columns from the subject's right to left (before a random flip).
:mod:`custom_components.data.tissues` turns either into T1/T2/PD maps.

Lengths are in mm (anatomy is geometry); relaxation times live in :mod:`tissues`, in seconds.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage as ndi


class Tissue(IntEnum):
    """Tissue classes of the synthetic anatomy (the channel order of every ``probs`` array).

    How each is derived for the MNI head (:func:`mni_tissue_volume`):

    - BACKGROUND: air outside the head (no signal).
    - CSF: inside the template's brain mask, the fraction not explained by the GM and WM
      probability maps (ventricles, sulci, cisterns: the template's T1-weighted intensity there is
      below grey matter's); plus a thin subarachnoid layer outside the mask (:data:`HEAD_LAYERS`).
    - GM, WM: nilearn's ICBM152 grey- and white-matter probability maps.
    - FAT: diploë (fatty marrow between the skull tables) and subcutaneous scalp fat.
    - MUSCLE: soft tissue of the scalp -- pericranium/galea/muscle and skin.
    - BONE: the inner and outer skull tables (cortical bone, near-zero signal at clinical echo times).
    - BLOOD: vessels; only BrainWeb models label them (absent from the MNI head).

    The non-brain classes of the MNI head are concentric layers around the brain mask, because the
    T1-weighted template shipped with nilearn is brain-masked (zero outside the brain), so scalp,
    fat and bone cannot be read from its intensities.
    """

    BACKGROUND = 0
    CSF = 1
    GM = 2
    WM = 3
    FAT = 4
    MUSCLE = 5
    BONE = 6
    BLOOD = 7


N_TISSUES = len(Tissue)
BRAIN_TISSUES = (Tissue.CSF, Tissue.GM, Tissue.WM)

# ---------------------------------------------------------------------------------------------
# MNI ICBM152 2009 head, no download
# ---------------------------------------------------------------------------------------------

MNI_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class HeadLayer:
    """One shell of the synthetic head around the brain mask (innermost first)."""

    tissue: Tissue
    thickness_mm: float
    what: str


# Layers from the brain-mask surface outwards. Sources for the mean thicknesses:
# - skull: adult cranial vault about 5.5-8.2 mm, mean about 6.9 mm (about 6.5 mm in men, 7.1 mm in
#   women), thickest frontally and occipitally, thinnest at the temporal squama; the diploë makes up
#   about half (about 54 % of the bone volume in some regions) -- as summarised from the
#   cranial-thickness literature at biologyinsights.com/how-thick-is-a-human-skull-and-why-it-varies
#   and scienceinsights.org/how-thick-is-a-human-skull-measurements-and-structure. Here
#   1.5 + 3.5 + 2.0 = 7.0 mm.
# - scalp: about 2-8 mm overall; skin 1-2 mm, the dense subcutaneous layer about 2.5 mm, the galea
#   aponeurotica about 1 mm (biologyinsights.com/how-thick-is-your-scalp-and-why-is-it-important);
#   scalp skin 1.71 +- 0.41 mm by ultrasound (Sung et al. 2025, Arch Plast Surg,
#   doi:10.1055/a-2646-8750). The subcutaneous layer is modelled as fat (bright on T1-weighted
#   images), galea/pericranium and skin as MUSCLE (soft tissue with short T2).
# - the 1 mm CSF layer is a modelling choice (no measurement): nilearn's template mask already holds
#   most subarachnoid CSF; one more millimetre keeps the cortex from touching bone directly.
HEAD_LAYERS: tuple[HeadLayer, ...] = (
    HeadLayer(Tissue.CSF, 1.0, "subarachnoid CSF outside the template mask"),
    HeadLayer(Tissue.BONE, 1.5, "inner table of the skull"),
    HeadLayer(Tissue.FAT, 3.5, "diploë (fatty marrow)"),
    HeadLayer(Tissue.BONE, 2.0, "outer table of the skull"),
    HeadLayer(Tissue.MUSCLE, 1.0, "pericranium, galea aponeurotica and muscle"),
    HeadLayer(Tissue.FAT, 2.5, "subcutaneous fat"),
    HeadLayer(Tissue.MUSCLE, 1.7, "skin"),
)
# Relative spatial variation of the layer thicknesses over the head (smooth, +- this fraction):
# skull and scalp thickness vary widely over one skull (the studies above); 25 % is a modelling
# choice that keeps every layer present.
LAYER_THICKNESS_VARIATION = 0.25
_SKULL_LAYERS = (1, 2, 3)  # indices into HEAD_LAYERS sharing the skull's thickness field
_SHELL_SEED = 20090  # fixed: the template is one head; its layer-thickness pattern is part of it


def mni_template_paths() -> dict[str, Path]:
    """Paths of the ICBM152 2009 T1-weighted, GM and WM templates inside the installed nilearn.

    The package is located with ``importlib.util.find_spec`` (nothing is imported or downloaded).
    Raises FileNotFoundError when nilearn or a file is missing.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: it ships the MNI ICBM152 templates used here")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {key: data_dir / name for key, name in MNI_TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNI template missing from nilearn's package data: {missing[0]}")
    return paths


def _smooth_periodic_field(coords_mm: np.ndarray, rng: np.random.Generator, n_waves: int = 6,
                           wavelength_mm: tuple[float, float] = (60.0, 140.0)) -> np.ndarray:
    """A smooth random field in [-1, 1] at the points ``coords_mm`` (N, 3): a sum of plane waves.

    Random directions, phases and wavelengths (uniform in ``wavelength_mm``: a few bumps over a
    head, a modelling choice), scaled to unit variance and clipped to [-1, 1].
    """
    field = np.zeros(coords_mm.shape[0], dtype=np.float32)
    for _ in range(n_waves):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * math.pi / rng.uniform(*wavelength_mm)
        field += np.cos(coords_mm @ (k * direction).astype(np.float32) + rng.uniform(0, 2 * math.pi))
    return np.clip(field / math.sqrt(n_waves / 2), -1.0, 1.0)


@dataclass(frozen=True)
class _CompactVolume:
    """Tissue fractions quantised to 1/255 (uint8, sum exactly 255), laid out (Z, C, X, Y)."""

    fractions_zcxy: np.ndarray
    labels_xyz: np.ndarray
    affine: np.ndarray


def _quantise(fractions: np.ndarray) -> np.ndarray:
    """Round fractions (..., K) to uint8 steps of 1/255 whose sum is exactly 255 along the last axis.

    Any rounding excess or deficit is taken from / given to the largest fraction.
    """
    q = np.rint(np.clip(fractions, 0.0, 1.0) * 255.0).astype(np.int16)
    excess = q.sum(axis=-1, keepdims=True) - 255
    largest = q.argmax(axis=-1)[..., None]
    np.put_along_axis(q, largest, np.take_along_axis(q, largest, -1) - excess, -1)
    return q.astype(np.uint8)


def _argmax_channels(q: np.ndarray) -> np.ndarray:
    """argmax over the first axis of (C, ...) by a running maximum (fast for large volumes)."""
    best = q[0].copy()
    labels = np.zeros(q.shape[1:], dtype=np.uint8)
    for c in range(1, q.shape[0]):
        better = q[c] > best
        labels[better] = c
        np.maximum(best, q[c], out=best)
    return labels


@functools.lru_cache(maxsize=1)
def _mni_compact() -> _CompactVolume:
    """Build (once per process) the MNI head; see :func:`mni_tissue_volume`."""
    import nibabel as nib

    paths = mni_template_paths()
    t1_img = nib.load(str(paths["t1"]))
    t1w = np.asarray(t1_img.dataobj)
    # the probability maps are stored as uint8 (probability * 255): keep them as integers
    gm = np.asarray(nib.load(str(paths["gm"])).dataobj).astype(np.int16)
    wm = np.asarray(nib.load(str(paths["wm"])).dataobj).astype(np.int16)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    voxel_mm = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))

    # The shipped T1-weighted template is zero outside the brain: its support is the brain mask
    # (a solid mask, no holes, for the 2009 template).
    brain = t1w > 0

    # Room for the layers around the brain; pad where the template's field of view is too tight.
    total_mm = sum(layer.thickness_mm for layer in HEAD_LAYERS) * (1 + LAYER_THICKNESS_VARIATION)
    margin = int(math.ceil(total_mm / voxel_mm.min())) + 2
    idx = np.argwhere(brain)
    lo = idx.min(axis=0) - margin
    hi = idx.max(axis=0) + margin + 1
    pad_lo = np.maximum(0, -lo)
    pad_hi = np.maximum(0, hi - np.array(brain.shape))
    if pad_lo.any() or pad_hi.any():
        widths = list(zip(pad_lo, pad_hi))
        brain, gm, wm = (np.pad(a, widths) for a in (brain, gm, wm))
        lo, hi = lo + pad_lo, hi + pad_lo
        affine = affine @ _translation(-pad_lo)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = affine @ _translation(lo)
    # work in (Z, X, Y) order so that the result is laid out (Z, C, X, Y) without a big transpose
    brain, gm, wm = (np.ascontiguousarray(a[crop].transpose(2, 0, 1)) for a in (brain, gm, wm))
    voxel_zxy = voxel_mm[[2, 0, 1]]

    q = np.zeros((brain.shape[0], N_TISSUES) + brain.shape[1:], dtype=np.uint8)
    gm = np.where(brain, gm, 0)
    wm = np.where(brain, np.minimum(wm, 255 - gm), 0)
    q[:, Tissue.GM] = gm
    q[:, Tissue.WM] = wm
    q[:, Tissue.CSF] = np.where(brain, 255 - gm - wm, 0)  # the rest of the brain mask
    del gm, wm

    # Concentric layers: distance of each outside voxel centre to the brain mask (mm).
    dist = ndi.distance_transform_edt(~brain, sampling=voxel_zxy).astype(np.float32)
    shell = (dist > 0) & (dist <= total_mm + voxel_mm.max())
    depth = dist[shell] - 0.5 * voxel_mm.min()  # depth below the mask surface, voxel-centre based
    del dist
    coords = (np.argwhere(shell) * voxel_zxy).astype(np.float32)
    field_rng = np.random.default_rng(_SHELL_SEED)
    skull_field = _smooth_periodic_field(coords, field_rng)
    scalp_field = _smooth_periodic_field(coords, field_rng)
    half = 0.5 * voxel_mm.min()
    inner = np.zeros_like(depth)
    shell_fractions = np.zeros((depth.size, N_TISSUES), dtype=np.float32)
    for i, layer in enumerate(HEAD_LAYERS):
        field = 0.0 if i == 0 else (skull_field if i in _SKULL_LAYERS else scalp_field)
        outer = inner + layer.thickness_mm * (1.0 + LAYER_THICKNESS_VARIATION * field)
        # fraction of the voxel's extent [depth - half, depth + half] inside the layer [inner, outer)
        frac = np.clip(np.minimum(depth + half, outer) - np.maximum(depth - half, inner), 0.0, None)
        shell_fractions[:, layer.tissue] += frac / (2 * half)
        inner = outer
    shell_fractions[:, Tissue.BACKGROUND] = np.clip(1.0 - shell_fractions.sum(axis=1), 0.0, 1.0)
    shell_q = _quantise(shell_fractions)
    zz, xx, yy = np.nonzero(shell)
    q[zz, :, xx, yy] = shell_q
    air = ~brain & ~shell
    q[:, Tissue.BACKGROUND][air] = 255

    labels = np.ascontiguousarray(_argmax_channels(q.transpose(1, 0, 2, 3)).transpose(1, 2, 0))
    fractions_zcxy = q
    for a in (fractions_zcxy, labels, affine):
        a.flags.writeable = False
    return _CompactVolume(fractions_zcxy, labels, affine)


def _translation(offset_vox: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = np.asarray(offset_vox, dtype=np.float64)
    return t


def mni_tissue_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MNI ICBM152 2009 head as tissue labels and fractions, built with no download.

    Source: nilearn's packaged ``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (1 mm,
    197x233x189, RAS). GM and WM are the template's probability maps; CSF is the rest of the brain
    mask (the support of the brain-masked T1-weighted template); skull, marrow, scalp fat and skin
    are the concentric :data:`HEAD_LAYERS` around that mask with partial-volume fractions at their
    boundaries and a smooth, fixed thickness pattern (:data:`LAYER_THICKNESS_VARIATION`). The
    grid is the brain's bounding box plus room for the layers (a little air all round).

    The build takes one to two seconds and is cached per process (``functools.lru_cache``) in a compact
    form (fractions in steps of 1/255); each call returns fresh float32 arrays (about 0.25 GB).

    Returns:
        labels: (X, Y, Z) uint8, argmax of the fractions (values of :class:`Tissue`).
        probabilities: (C, X, Y, Z) float32 tissue fractions, C = ``N_TISSUES``, summing to 1.
        affine: (4, 4) voxel-to-MNI-world (mm) affine of the cropped grid.
    """
    vol = _mni_compact()
    probs = vol.fractions_zcxy.transpose(1, 2, 3, 0).astype(np.float32)
    probs *= np.float32(1.0 / 255.0)
    return vol.labels_xyz.copy(), probs, vol.affine.copy()


# ---------------------------------------------------------------------------------------------
# Axial slices with random geometry
# ---------------------------------------------------------------------------------------------

# Random geometry of one slice (modelling choices for diversity from a single template; scaling and
# elastic amplitudes are of the order of inter-subject differences in head size and local shape).
ROTATION_RANGE_DEG = 15.0  # in-plane rotation, uniform +-
SCALE_RANGE = 0.12  # isotropic anatomy scaling, uniform 1 +- 0.12
ASPECT_RANGE = 0.05  # extra anisotropic scaling (rows vs columns), uniform 1 +- 0.05
SHEAR_RANGE = 0.05  # shear coefficients, uniform +-
TRANSLATION_RANGE_MM = 10.0  # in-plane shift of the head, uniform +- per axis
ELASTIC_SPACING_PX = 32  # control-point spacing of MONAI's Rand2DElastic (output pixels)
ELASTIC_MAGNITUDE_PX = (1.0, 3.0)  # std of control-point offsets (output pixels), uniform range


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _pair(x: float | Sequence[float]) -> tuple[float, float]:
    if np.ndim(x) == 0:
        return float(x), float(x)  # type: ignore[arg-type]
    a, b = x  # type: ignore[misc]
    return float(a), float(b)


class AxialSliceSource:
    """Axial slices of one head (tissue fractions or labels on a RAS voxel grid).

    Build with :meth:`from_fractions` or :meth:`from_labels`. Slices are taken where the brain
    (CSF + GM + WM) cross-section is at least ``min_brain_fraction`` of its largest value; the
    ``n_slices`` usable source slices are addressed by an index in ``[0, n_slices)``.
    """

    def __init__(self, *, fractions_zcxy: np.ndarray | None = None, labels_zxy: np.ndarray | None = None,
                 scale: float = 1.0, voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                 z0_mm: float = 0.0, min_brain_fraction: float = 0.4) -> None:
        if (fractions_zcxy is None) == (labels_zxy is None):
            raise ValueError("give exactly one of fractions_zcxy and labels_zxy")
        self._fractions = fractions_zcxy
        self._labels = labels_zxy
        self._scale = float(scale)
        self.voxel_size_mm = tuple(float(v) for v in voxel_size_mm)
        self._z0_mm = float(z0_mm)
        if fractions_zcxy is not None:
            brain = sum(fractions_zcxy[:, t].astype(np.float32) for t in BRAIN_TISSUES) * self._scale
            shape_xy = fractions_zcxy.shape[2:]
        else:
            brain = np.isin(labels_zxy, BRAIN_TISSUES)
            shape_xy = labels_zxy.shape[1:]
        area = brain.reshape(brain.shape[0], -1).sum(axis=1)
        if area.max() <= 0:
            raise ValueError("no brain tissue (CSF, GM or WM) in the volume")
        self.slice_z = np.flatnonzero(area >= min_brain_fraction * area.max())
        # in-plane centre (voxel coordinates x, y): middle of the brain's bounding box over the volume
        brain_xy = np.argwhere((brain > 0.5).any(axis=0))
        centre_xy = 0.5 * (brain_xy.min(axis=0) + brain_xy.max(axis=0))
        # in display orientation: rows = anterior->posterior (y reversed), cols = right->left (x reversed)
        rows, cols = shape_xy[1], shape_xy[0]
        self._centre_rc = np.array([rows - 1 - centre_xy[1], cols - 1 - centre_xy[0]], dtype=np.float64)
        self._shape_rc = (rows, cols)

    @classmethod
    def from_fractions(cls, fractions_cxyz: np.ndarray, voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                       **kwargs) -> AxialSliceSource:
        """A source from tissue fractions (C, X, Y, Z), float or uint8 in steps of 1/255."""
        f = np.asarray(fractions_cxyz)
        if f.ndim != 4 or f.shape[0] != N_TISSUES:
            raise ValueError(f"fractions must be ({N_TISSUES}, X, Y, Z), got {f.shape}")
        scale = 1.0 / 255.0 if f.dtype == np.uint8 else 1.0
        return cls(fractions_zcxy=np.ascontiguousarray(f.transpose(3, 0, 1, 2)), scale=scale,
                   voxel_size_mm=voxel_size_mm, **kwargs)

    @classmethod
    def from_labels(cls, labels_xyz: np.ndarray, voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                    **kwargs) -> AxialSliceSource:
        """A source from a discrete label volume (X, Y, Z) of :class:`Tissue` values."""
        lab = np.asarray(labels_xyz)
        if lab.ndim != 3:
            raise ValueError(f"labels must be (X, Y, Z), got {lab.shape}")
        if lab.size and (lab.min() < 0 or lab.max() >= N_TISSUES):
            raise ValueError(f"labels must be Tissue values 0..{N_TISSUES - 1}")
        return cls(labels_zxy=np.ascontiguousarray(lab.astype(np.uint8).transpose(2, 0, 1)),
                   voxel_size_mm=voxel_size_mm, **kwargs)

    @property
    def n_slices(self) -> int:
        """Number of distinct source slices (1 voxel apart) through the brain."""
        return int(self.slice_z.size)

    def _slab(self, z: int, n: int) -> np.ndarray:
        """Mean tissue fractions (C, X, Y) float32 over ``n`` voxel slices centred on ``z``."""
        nz = self._fractions.shape[0] if self._fractions is not None else self._labels.shape[0]
        n = max(1, min(n, nz))
        start = int(np.clip(z - (n - 1) // 2, 0, nz - n))
        if self._fractions is not None:
            slab = self._fractions[start:start + n].astype(np.float32).mean(axis=0)
            return slab * np.float32(self._scale)
        lab = self._labels[start:start + n]
        out = np.zeros((N_TISSUES,) + lab.shape[1:], dtype=np.float32)
        for t in range(N_TISSUES):
            out[t] = (lab == t).mean(axis=0)
        return out

    def sample(self, rng: np.random.Generator | int | None = None, index: int | None = None, *,
               matrix: tuple[int, int] = (240, 240), fov_mm: float | Sequence[float] = 250.0,
               deform: bool = True, flip: bool | None = None, slice_thickness_mm: float = 2.0) -> dict:
        """One axial slice resampled to ``matrix`` over ``fov_mm``; see :func:`sample_slice`."""
        rng = _as_rng(rng)
        if index is None:
            index = int(rng.integers(self.n_slices))
        if not 0 <= index < self.n_slices:
            raise IndexError(f"slice index {index} outside [0, {self.n_slices})")
        flip = deform if flip is None else flip
        matrix = (int(matrix[0]), int(matrix[1]))
        fov = _pair(fov_mm)
        pixel_mm = (fov[0] / matrix[0], fov[1] / matrix[1])
        vx, vy, vz = self.voxel_size_mm
        in_mm = (vy, vx)  # display rows follow y, columns follow x

        z = int(self.slice_z[index])
        slab = self._slab(z, int(round(slice_thickness_mm / vz)))
        img = np.ascontiguousarray(slab[:, ::-1, ::-1].transpose(0, 2, 1))  # (C, rows A->P, cols R->L)
        zoom = np.array([pixel_mm[0] / in_mm[0], pixel_mm[1] / in_mm[1]])  # input px per output px
        for axis, f in enumerate(zoom):
            if f > 1.5:  # anti-alias before downsampling (skimage's default sigma = (f - 1) / 2)
                img = ndi.gaussian_filter1d(img, sigma=(f - 1) / 2, axis=axis + 1, mode="nearest")
        centre_offset = self._centre_rc - (np.array(self._shape_rc) - 1) / 2.0  # input px

        out = _resample(img, rng, matrix, zoom, centre_offset, np.array(in_mm), deform)
        flipped = bool(flip and rng.random() < 0.5)
        if flipped:
            out = out[:, :, ::-1]
        out = np.clip(out, 0.0, None)
        total = out.sum(axis=0)
        out[Tissue.BACKGROUND] += np.clip(1.0 - total, 0.0, None)  # zero padding -> air
        out /= np.maximum(out.sum(axis=0, keepdims=True), 1e-6)
        probs = np.ascontiguousarray(out, dtype=np.float32)
        return {
            "labels": probs.argmax(axis=0).astype(np.int64),
            "probs": probs,
            "index": index,
            "z_mm": self._z0_mm + z * vz,
            "pixel_size_mm": pixel_mm,
            "flipped": flipped,
        }

    def slices(self, rng: np.random.Generator | int | None = None, *, indices: Sequence[int] | None = None,
               realisations: int = 1, **kwargs) -> Iterator[dict]:
        """Yield ``realisations`` random geometric variants of each slice in ``indices`` (default all)."""
        rng = _as_rng(rng)
        for index in range(self.n_slices) if indices is None else indices:
            for _ in range(realisations):
                yield self.sample(rng, int(index), **kwargs)


def _resample(img: np.ndarray, rng: np.random.Generator, matrix: tuple[int, int], zoom: np.ndarray,
              centre_offset_px: np.ndarray, in_mm: np.ndarray, deform: bool) -> np.ndarray:
    """Resample (C, rows, cols) onto the output grid with MONAI, optionally with random geometry.

    MONAI maps an output grid point g (pixels from the output centre) to the input point
    c_in + R Sh (S g + t) (rotation R, shear Sh, scale S, translation t; c_in = input array centre).
    S = zoom / anatomy scale; t is solved so that the output centre lands on the head centre plus
    a random shift, with the rotation about the head centre.
    """
    import torch
    from monai.transforms import Affine, Rand2DElastic
    from monai.transforms.utils import create_rotate, create_shear

    if deform:
        angle = math.radians(rng.uniform(-ROTATION_RANGE_DEG, ROTATION_RANGE_DEG))
        iso = rng.uniform(1 - SCALE_RANGE, 1 + SCALE_RANGE)
        aspect = rng.uniform(1 - ASPECT_RANGE, 1 + ASPECT_RANGE)
        anatomy_scale = np.array([iso * math.sqrt(aspect), iso / math.sqrt(aspect)])
        shear = rng.uniform(-SHEAR_RANGE, SHEAR_RANGE, size=2)
        shift_px = rng.uniform(-TRANSLATION_RANGE_MM, TRANSLATION_RANGE_MM, size=2) / in_mm
        seed = int(rng.integers(0, 2**31 - 1))
    else:
        angle, anatomy_scale, shear, shift_px, seed = 0.0, np.ones(2), np.zeros(2), np.zeros(2), 0
    scale = zoom / anatomy_scale
    rot_shear = (np.asarray(create_rotate(2, angle))[:2, :2] @ np.asarray(create_shear(2, tuple(shear)))[:2, :2])
    translate = np.linalg.solve(rot_shear, centre_offset_px + shift_px)
    x = torch.from_numpy(img)
    if deform:
        transform = Rand2DElastic(
            spacing=(ELASTIC_SPACING_PX, ELASTIC_SPACING_PX), magnitude_range=ELASTIC_MAGNITUDE_PX, prob=1.0,
            rotate_range=((angle, angle),), shear_range=((shear[0], shear[0]), (shear[1], shear[1])),
            translate_range=((translate[0], translate[0]), (translate[1], translate[1])),
            scale_range=((scale[0] - 1, scale[0] - 1), (scale[1] - 1, scale[1] - 1)),
            spatial_size=matrix, mode="bilinear", padding_mode="zeros")
        transform.set_random_state(seed=seed)
        out = transform(x)
    else:
        transform = Affine(scale_params=[float(v) for v in scale], translate_params=[float(v) for v in translate],
                           spatial_size=matrix,
                           mode="bilinear", padding_mode="zeros", image_only=True)
        out = transform(x)
    out = out.as_tensor() if hasattr(out, "as_tensor") else out
    return np.asarray(out.detach().cpu().numpy(), dtype=np.float32)


@functools.lru_cache(maxsize=1)
def mni_slice_source(min_brain_fraction: float = 0.4) -> AxialSliceSource:
    """The (cached) :class:`AxialSliceSource` of the MNI head of :func:`mni_tissue_volume`."""
    vol = _mni_compact()
    voxel_mm = np.sqrt((vol.affine[:3, :3] ** 2).sum(axis=0))
    return AxialSliceSource(fractions_zcxy=vol.fractions_zcxy, scale=1.0 / 255.0, voxel_size_mm=voxel_mm,
                            z0_mm=float(vol.affine[2, 3]), min_brain_fraction=min_brain_fraction)


def n_source_slices() -> int:
    """Distinct axial source slices of the MNI head (1 mm apart, where the brain is present)."""
    return mni_slice_source().n_slices


def sample_slice(rng: np.random.Generator | int | None = None, index: int | None = None, *,
                 matrix: tuple[int, int] = (240, 240), fov_mm: float | Sequence[float] = 250.0,
                 deform: bool = True, flip: bool | None = None, slice_thickness_mm: float = 2.0) -> dict:
    """A random axial slice of the MNI head on the paper's grid (240x240 over 250 mm by default).

    Args:
        rng: numpy Generator or seed; the same seed gives the same slice.
        index: source slice in ``[0, n_source_slices())`` (inferior to superior); random if None.
        matrix: output (rows, cols).
        fov_mm: field of view in mm (one value or (rows, cols)).
        deform: random geometry -- rotation +-15 deg, isotropic scale 1 +- 0.12 with aspect
            1 +- 0.05, shear +-0.05, shift +-10 mm, then MONAI ``Rand2DElastic`` (control points
            every 32 px, offsets with std 1-3 px), all bilinear on the tissue fractions.
        flip: left-right flip with probability 1/2 (default: same as ``deform``).
        slice_thickness_mm: slab averaged through-plane (partial volume; the paper used 2 mm).

    Returns:
        dict with ``labels`` (H, W) int64 (argmax, :class:`Tissue` values), ``probs`` (C, H, W)
        float32 fractions summing to 1, ``index``, ``z_mm`` (MNI z of the slab centre),
        ``pixel_size_mm`` and ``flipped``.
    """
    return mni_slice_source().sample(rng, index, matrix=matrix, fov_mm=fov_mm, deform=deform, flip=flip,
                                     slice_thickness_mm=slice_thickness_mm)


def axial_slices(rng: np.random.Generator | int | None = None, *, indices: Sequence[int] | None = None,
                 realisations: int = 1, **kwargs) -> Iterator[dict]:
    """Yield ``realisations`` geometric variants of each MNI source slice (all by default).

    ``n_source_slices() * realisations`` slices in total; keyword arguments as :func:`sample_slice`.
    """
    return mni_slice_source().slices(rng, indices=indices, realisations=realisations, **kwargs)


# ---------------------------------------------------------------------------------------------
# BrainWeb discrete models (downloaded by the user)
# ---------------------------------------------------------------------------------------------

# Grid sizes (X, Y, Z). The 20 normal anatomical models: 362x434x362 voxels of 0.5 mm (the shape
# the ``brainweb`` PyPI package (casperdcl/brainweb) reads); the original normal/MS phantom of the
# Simulated Brain Database: 181x217x181 voxels of 1 mm, start -90, -126, -72 mm (BrainWeb site).
BRAINWEB_NORMAL20_SHAPE = (362, 434, 362)
BRAINWEB_NORMAL20_VOXEL_MM = 0.5
BRAINWEB_PHANTOM_SHAPE = (181, 217, 181)
BRAINWEB_PHANTOM_VOXEL_MM = 1.0

# Class labels of the discrete models, with the Tissue each is mapped to.
# 20 normal models (order as in casperdcl/brainweb's ``Act`` class, which decodes these volumes):
BRAINWEB_NORMAL20_LABELS: dict[int, tuple[str, Tissue]] = {
    0: ("Background", Tissue.BACKGROUND),
    1: ("CSF", Tissue.CSF),
    2: ("Grey Matter", Tissue.GM),
    3: ("White Matter", Tissue.WM),
    4: ("Fat", Tissue.FAT),
    5: ("Muscle", Tissue.MUSCLE),
    6: ("Muscle/Skin", Tissue.MUSCLE),
    7: ("Skull", Tissue.BONE),
    8: ("Vessels", Tissue.BLOOD),
    9: ("Around fat", Tissue.FAT),  # connective tissue surrounding fat: nearest class of ours is fat
    10: ("Dura matter", Tissue.MUSCLE),  # fibrous soft tissue: nearest class of ours is muscle
    11: ("Bone marrow", Tissue.FAT),  # adult calvarial marrow is fatty (bright on T1-weighted images)
}
# The original phantom (BrainWeb "anatomic_normal"/"anatomic_ms" pages):
BRAINWEB_PHANTOM_LABELS: dict[int, tuple[str, Tissue]] = {
    0: ("Background", Tissue.BACKGROUND),
    1: ("CSF", Tissue.CSF),
    2: ("Grey Matter", Tissue.GM),
    3: ("White Matter", Tissue.WM),
    4: ("Fat", Tissue.FAT),
    5: ("Muscle/Skin", Tissue.MUSCLE),
    6: ("Skin", Tissue.MUSCLE),
    7: ("Skull", Tissue.BONE),
    8: ("Glial Matter", Tissue.GM),  # no glial class here; grey matter is the nearest brain class
    9: ("Connective", Tissue.MUSCLE),  # soft tissue
    10: ("MS Lesion", Tissue.WM),  # lesion-specific relaxation is not modelled; lesions lie in WM
}
_BRAINWEB_SCHEMES = {
    "normal20": (BRAINWEB_NORMAL20_SHAPE, BRAINWEB_NORMAL20_LABELS, BRAINWEB_NORMAL20_VOXEL_MM),
    "phantom": (BRAINWEB_PHANTOM_SHAPE, BRAINWEB_PHANTOM_LABELS, BRAINWEB_PHANTOM_VOXEL_MM),
}


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        return fh.read()


def load_brainweb_discrete(path: str | Path, shape: Sequence[int] | None = None, *,
                           scheme: str = "auto", remap: bool = True) -> np.ndarray:
    """Read a BrainWeb discrete ("crisp") anatomical model in raw-byte format.

    Format (BrainWeb's download page, "raw byte (unsigned)"): one unsigned byte per voxel, no
    header; the crisp models are not rescaled, so each byte is a class label. Files may be gzip
    compressed (``.rawb.gz``; detected by content). Voxels are stored with x fastest and z slowest
    (MINC order zspace, yspace, xspace); x runs towards the subject's right, y anterior, z superior.
    The 20 normal models are 362x434x362 voxels of 0.5 mm, the original phantom 181x217x181 of
    1 mm; labels: see :data:`BRAINWEB_NORMAL20_LABELS` and :data:`BRAINWEB_PHANTOM_LABELS`. Sources:
    brainweb.bic.mni.mcgill.ca (anatomic model and file-format pages) and casperdcl/brainweb.
    The 2-byte "raw short" download is not supported (download "raw byte").

    Args:
        path: the ``.rawb`` or ``.rawb.gz`` file.
        shape: (X, Y, Z); inferred from the file size when None (one of the two BrainWeb grids).
        scheme: label meaning, "normal20", "phantom" or "auto" (phantom for the 181x217x181 grid,
            otherwise normal20).
        remap: map the labels to :class:`Tissue` (True) or return BrainWeb's own labels (False).

    Returns:
        (X, Y, Z) uint8 labels.

    Raises:
        ValueError: when the size does not match the shape, or a label is out of range.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if shape is None:
        sizes = {math.prod(s): s for s, _, _ in _BRAINWEB_SCHEMES.values()}
        if len(raw) not in sizes:
            raise ValueError(f"{path.name}: {len(raw)} bytes match no BrainWeb grid "
                             f"({' or '.join(f'{n} for {s}' for n, s in sizes.items())}); pass shape=")
        shape = sizes[len(raw)]
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or len(raw) != math.prod(shape):
        raise ValueError(f"{path.name}: {len(raw)} bytes do not hold a raw-byte volume of shape {shape}")
    if scheme == "auto":
        scheme = "phantom" if shape == BRAINWEB_PHANTOM_SHAPE else "normal20"
    if scheme not in _BRAINWEB_SCHEMES:
        raise ValueError(f"unknown BrainWeb label scheme {scheme!r}; use 'normal20' or 'phantom'")
    table = _BRAINWEB_SCHEMES[scheme][1]
    x, y, z = shape
    labels = np.frombuffer(raw, dtype=np.uint8).reshape(z, y, x).transpose(2, 1, 0)
    top = int(labels.max()) if labels.size else 0
    if top > max(table):
        raise ValueError(f"{path.name}: label {top} outside BrainWeb's {scheme} classes 0..{max(table)}")
    if not remap:
        return np.ascontiguousarray(labels)
    lut = np.zeros(256, dtype=np.uint8)
    for value, (_, tissue) in table.items():
        lut[value] = tissue
    return np.ascontiguousarray(lut[labels])


def brainweb_slices(labels: np.ndarray, rng: np.random.Generator | int | None = None, *,
                    voxel_size_mm: float | Sequence[float] | None = None, indices: Sequence[int] | None = None,
                    realisations: int = 1, min_brain_fraction: float = 0.4, **kwargs) -> Iterator[dict]:
    """Axial slices of a BrainWeb model in the format of :func:`sample_slice` (a drop-in anatomy).

    Args:
        labels: (X, Y, Z) :class:`Tissue` labels from :func:`load_brainweb_discrete`.
        rng: numpy Generator or seed.
        voxel_size_mm: isotropic size or (x, y, z); default 1 mm for the 181x217x181 phantom grid,
            otherwise 0.5 mm (the 20 normal models).
        indices: source slices (see :attr:`AxialSliceSource.n_slices`); default all brain slices.
        realisations: random geometric variants per source slice.
        min_brain_fraction: keep slices whose brain area is at least this fraction of the largest.
        **kwargs: ``matrix``, ``fov_mm``, ``deform``, ``flip``, ``slice_thickness_mm`` as in
            :func:`sample_slice`. Each discrete label becomes a one-hot fraction, averaged over the
            slab and anti-aliased when downsampled, so slices carry partial volume.
    """
    labels = np.asarray(labels)
    if voxel_size_mm is None:
        voxel_size_mm = BRAINWEB_PHANTOM_VOXEL_MM if labels.shape == BRAINWEB_PHANTOM_SHAPE else \
            BRAINWEB_NORMAL20_VOXEL_MM
    voxel = (float(voxel_size_mm),) * 3 if np.ndim(voxel_size_mm) == 0 else tuple(voxel_size_mm)
    source = AxialSliceSource.from_labels(labels, voxel, min_brain_fraction=min_brain_fraction)
    return source.slices(rng, indices=indices, realisations=realisations, **kwargs)
