"""Synthetic inversion-recovery data: scenes (maps) -> scanner-like images, and a MONAI-ready dataset.

The chain for one item (every effect switchable, every draw seeded):

1. a scene: T1 (s), T2 (s), PD (water = 1) maps on an object grid, from the embedded anatomy
   (:mod:`custom_components.data.anatomy` + :mod:`custom_components.data.tissues`) or the NIST twin;
2. a smooth inversion-efficiency map B (2 = ideal);
3. the signed signal of every TI from :mod:`custom_components.physics.signal_model` with the apparent
   PD exp(-TE_eff/T2) (the T2 weighting at the echo time);
4. acquisition in k-space (:func:`custom_components.physics.image_formation.acquire`): echo-train T2
   blurring along phase encode, truncation of a finer object grid (Gibbs);
5. noise: complex Gaussian then magnitude (Rician) or root-sum-of-squares over coils (noncentral chi),
   at SNR = 1 / sigma (PD of water = 1).

Two conventions, one per use (docs/physics.md, "Parameter convention"):

- ``truth`` (what every method's output maps are scored against, and what ``qmri map`` writes):
  (T1, PD_app, B) with PD_app = PD exp(-TE_eff/T2) (the T2 weighting at the echo time cannot be
  separated from PD with one TE) and B the inversion efficiency of the full finite-TR model
  s_n = PD (1 - B e^{-TI_n/T1} + (B - 1) e^{-Trec_n/T1}): exactly what a perfect classical fit of
  noiseless, unblurred images returns, for any protocol.
- ``label`` (the networks' training target, kept so that the shipped weights stay valid): when TR is
  finite and the same for all images, the apparent (PD, B) of the full-recovery model
  (:func:`custom_components.physics.signal_model.apparent_parameters`); with a TR that varies per
  image (apparent parameters do not exist there) or full recovery, the same as ``truth``.
  :func:`maps_from_labels` turns a label (or a network's estimate of one) into the output convention.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..physics.image_formation import (acquire, add_ncchi_noise, downsample_area, effective_echo_time_s,
                              smooth_inversion_efficiency)
from ..physics.protocol import Protocol, get_protocol
from ..physics.signal_model import apparent_parameters, physical_parameters, signed_signal

NOISE_MODELS = ("rician", "ncchi", "gaussian", "none")
#: ``SynthesisConfig(protocol=RANDOM_PROTOCOL)``: every item has its own acquisition
#: (:func:`custom_components.physics.protocol.random_protocol`) and noise model (:data:`RANDOM_NOISE`)
RANDOM_PROTOCOL = "random"
#: the noise models of a random acquisition: Rician (one coil) with this probability, else the
#: noncentral chi of a root-sum-of-squares of 2-8 coils (uniform)
RANDOM_NOISE = {"p_rician": 0.6, "n_coils": (2, 8)}


@dataclass
class Effects:
    """Which image-formation effects to apply, and their settings.

    Attributes:
        snr_range: SNR = PD_water / sigma is drawn log-uniformly in this range (equal ends: fixed).
        noise: "rician" (one coil), "ncchi" (RSS of ``n_coils``), "gaussian" (added to the
            magnitude), or "none".
        n_coils: coils of the RSS combination for "ncchi".
        echo_train: echo-train T2 blurring along phase encode (only where the protocol's ETL > 1).
        gibbs_factor: the object is simulated on a grid this many times finer and the centre of its
            k-space is kept (1 = off).
        b_range: range of the smooth inversion-efficiency field B (2 = ideal inversion).
        pe_axis: phase-encode axis of the (H, W) images (-2 = rows); "random" picks one per item.
    """

    snr_range: tuple[float, float] = (20.0, 100.0)
    noise: str = "rician"
    n_coils: int = 1
    echo_train: bool = True
    gibbs_factor: int = 1
    b_range: tuple[float, float] = (1.8, 2.0)
    pe_axis: int | str = -2

    def __post_init__(self):
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {self.noise!r}")
        if self.snr_range[0] <= 0 or self.snr_range[1] < self.snr_range[0]:
            raise ValueError(f"snr_range must be positive and increasing, got {self.snr_range}")
        if int(self.gibbs_factor) < 1:
            raise ValueError("gibbs_factor must be >= 1")


def draw_snr(effects: Effects, rng: np.random.Generator) -> float:
    lo, hi = effects.snr_range
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)


def labels_are_apparent(protocol: Protocol) -> bool:
    """True where the training labels are apparent parameters: a finite TR, the same for all images."""
    return protocol.recovery_times_s() is not None and protocol.has_constant_tr


def labels_from_maps(t1_s: torch.Tensor, pd_app: torch.Tensor, b: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """(3, H, W) training labels (T1 s, PD, B) from the physical maps (see module doc): apparent
    (PD, B) of the full-recovery model for a constant finite TR, the physical ones otherwise."""
    params = torch.stack([t1_s, pd_app, b])
    if labels_are_apparent(protocol):
        params = apparent_parameters(params, protocol, dim=0)
    return params


def maps_from_labels(label, protocol: Protocol, dim: int = 0) -> torch.Tensor:
    """Training labels (or a network's estimate of them) (T1 s, PD, B) along ``dim`` -> the output
    convention of every method (physical, TR-corrected PD and B): the inverse of
    :func:`labels_from_maps` (:func:`custom_components.physics.signal_model.physical_parameters`
    for a constant finite TR, unchanged otherwise). Numpy in, numpy out; torch in, torch out."""
    as_numpy = not isinstance(label, torch.Tensor)
    t = torch.as_tensor(np.asarray(label)) if as_numpy else label
    out = physical_parameters(t, protocol, dim=dim) if labels_are_apparent(protocol) else t.clone()
    return out.numpy() if as_numpy else out


def render(t1_s, t2_s, pd, b, protocol: Protocol, effects: Effects, generator: torch.Generator | None = None,
           sigma: float | None = None, pe_axis: int = -2) -> dict[str, torch.Tensor]:
    """Images of a scene given on the object grid (H, W) = output matrix x ``effects.gibbs_factor``.

    Args:
        t1_s, t2_s, pd, b: (H, W) maps (float64 tensors or arrays); PD = 0 marks empty space.
        sigma: noise std per channel (SNR = 1 / sigma); None: no noise.

    Returns dict(image (N, h, w) magnitude float64, label (3, h, w) (the training target), truth
    (3, h, w) (the same maps in the output convention of every method: physical PD and B; see the
    module doc), mask (h, w) bool, t2 (h, w)).
    """
    t1, t2, pd, b = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float64)
                     for x in (t1_s, t2_s, pd, b))
    f = int(effects.gibbs_factor)
    h, w = pd.shape
    if h % f or w % f:
        raise ValueError(f"object grid {pd.shape} is not a multiple of gibbs_factor {f}")
    out_shape = (h // f, w // f)
    empty = pd <= 0
    t1 = torch.where(empty, torch.ones_like(t1), t1.clamp_min(1e-4))
    t2 = torch.where(empty, torch.ones_like(t2), t2.clamp_min(1e-4))
    te = effective_echo_time_s(protocol, out_shape[pe_axis % 2]) if effects.echo_train else protocol.echo_time_s
    pd_app = torch.where(empty, torch.zeros_like(pd), pd * torch.exp(-te / t2))
    s = signed_signal(torch.stack([t1, pd_app, b]), protocol, dim=0)
    s = torch.where(empty.unsqueeze(0), torch.zeros_like(s), s)
    img = acquire(s, t2, protocol, out_shape=out_shape, echo_train=effects.echo_train, pe_axis=pe_axis)
    if sigma is None or effects.noise == "none":
        mag = img.abs()
    elif effects.noise == "gaussian":
        mag = img.abs() + sigma * torch.randn(img.shape, generator=generator, dtype=torch.float64)
    else:
        mag = add_ncchi_noise(img, sigma, effects.n_coils if effects.noise == "ncchi" else 1, generator)
    # ground truth on the output grid: PD-weighted relaxation rates averaged over each pixel's area
    pd_o = downsample_area(pd_app, f)
    mask = pd_o > 0
    r1 = downsample_area(pd_app / t1, f) / pd_o.clamp_min(1e-12)
    r2 = downsample_area(pd_app / t2, f) / pd_o.clamp_min(1e-12)
    b_o = downsample_area(torch.where(empty, torch.zeros_like(b), b * pd_app), f) / pd_o.clamp_min(1e-12)
    t1_o = torch.where(mask, 1.0 / r1.clamp_min(1e-9), torch.zeros_like(r1))
    b_o = torch.where(mask, b_o, torch.zeros_like(b_o))
    t1_l, b_l = torch.where(mask, t1_o, torch.ones_like(t1_o)), torch.where(mask, b_o, torch.full_like(b_o, 2.0))
    label = labels_from_maps(t1_l, pd_o, b_l, protocol)
    label = torch.where(mask.unsqueeze(0), label, torch.zeros_like(label))
    truth = torch.where(mask.unsqueeze(0), torch.stack([t1_l, pd_o, b_l]), torch.zeros_like(label))
    t2_o = torch.where(mask, 1.0 / r2.clamp_min(1e-9), torch.zeros_like(r2))
    return {"image": mag, "label": label, "truth": truth, "mask": mask, "t2": t2_o}


# ------------------------------------------------------------------------------------------- scenes
SceneFn = Callable[[np.random.Generator, int, int, tuple[int, int]], dict]


def _object_range(value) -> tuple[int, int]:
    """(lo, hi) object counts, 0 <= lo <= hi, from a pair of integers."""
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"wide_t1_objects must be two integers (lo, hi), got {value!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"wide_t1_objects must satisfy 0 <= lo <= hi, got {value!r}")
    return lo, hi


def brain_scene(rng: np.random.Generator, slice_index: int, realisation: int, shape: tuple[int, int],
                wide_t1: bool = False, fov_mm: float = 250.0, deform: bool = True,
                geometry_seed: int | None = None, wide_t1_objects: tuple[int, int] | None = None,
                wide_t1_walls: float | None = None) -> dict:
    """T1/T2/PD maps of a deformed axial slice of the embedded MNI anatomy (no download).

    The geometry depends only on (``geometry_seed``, ``slice_index``) so that the realisations of
    one slice share the anatomy, as in the paper (994 slices x 4 parameter realisations); the tissue
    parameters come from ``rng``. ``wide_t1_objects`` (lo, hi) overrides the number of wide-T1
    objects per slice (default :class:`custom_components.data.tissues.WideT1`'s (2, 6)); ``wide_t1_walls``
    the probability that an object gets a wall without signal (None: 0).
    """
    from . import anatomy, tissues

    g = np.random.default_rng([geometry_seed if geometry_seed is not None else 0, slice_index])
    sl = anatomy.sample_slice(g, matrix=shape, fov_mm=fov_mm, deform=deform)
    opts = {}
    if wide_t1_objects is not None:
        opts["n_objects"] = _object_range(wide_t1_objects)
    if wide_t1_walls is not None:
        opts["wall_probability"] = float(wide_t1_walls)
    wide = tissues.WideT1(**opts)
    maps = tissues.sample_parameter_maps(sl["probs"], rng, wide_t1=wide_t1, wide=wide)
    return {"T1": maps["T1"], "T2": maps["T2"], "PD": maps["PD"], "mask": maps["mask"], "tissue": sl["labels"]}


SCENE_FAMILIES = ("brain", "random_labels", "mixed")


@dataclass
class SynthesisConfig:
    """Everything that defines a synthetic dataset (deterministic for ``seed``).

    ``n_slices`` x ``realisations`` items (the paper: 994 x 4 = 3976). ``matrix`` is the image
    size; ``crop`` (optional) renders a random crop of that size instead of the whole slice (what
    a training loop on CPU wants); ``wide_t1`` adds objects with T1 down to 20 ms, and
    ``wide_t1_objects`` (lo, hi) sets how many per slice (None: the default (2, 6)) and
    ``wide_t1_walls`` the probability that an object has a wall without signal around it, 1-3 px
    thick, like a vial or a sphere of the NIST/ISMRM phantom (None: no walls). ``scene`` picks the scene
    family: "brain" (the embedded anatomy, the default) or "random_labels" (random label maps with
    phantom-like objects, :class:`custom_components.data.random_scenes.RandomLabelScenes`, whose fields
    ``random_scenes`` overrides) or "mixed": slice i is a brain with probability ``brain_fraction``
    (drawn from the item's own seed), else a random label scene.
    """

    protocol: str | dict = "paper"
    n_slices: int = 994
    realisations: int = 4
    matrix: tuple[int, int] = (240, 240)
    fov_mm: float = 250.0
    crop: tuple[int, int] | None = None
    wide_t1: bool = False
    wide_t1_objects: tuple[int, int] | None = None
    wide_t1_walls: float | None = None
    effects: Effects = field(default_factory=Effects)
    seed: int = 0
    deform: bool = True
    scene: str = "brain"
    random_scenes: dict | None = None
    brain_fraction: float = 0.5

    def __post_init__(self):
        if self.scene not in SCENE_FAMILIES:
            raise ValueError(f"scene must be one of {SCENE_FAMILIES}, got {self.scene!r}")
        if self.random_scenes is not None and self.scene == "brain":
            raise ValueError("random_scenes is for scene='random_labels' or 'mixed'")
        if not 0.0 <= float(self.brain_fraction) <= 1.0:
            raise ValueError(f"brain_fraction must be a probability in [0, 1], got {self.brain_fraction!r}")
        if isinstance(self.effects, dict):
            self.effects = Effects(**self.effects)
        self.matrix = tuple(int(x) for x in self.matrix)
        if self.crop is not None:
            self.crop = tuple(int(x) for x in self.crop)
            if self.crop[0] > self.matrix[0] or self.crop[1] > self.matrix[1]:
                raise ValueError(f"crop {self.crop} larger than the matrix {self.matrix}")
        if self.wide_t1_objects is not None:
            self.wide_t1_objects = _object_range(self.wide_t1_objects)
        if self.wide_t1_walls is not None and not 0.0 <= float(self.wide_t1_walls) <= 1.0:
            raise ValueError(f"wide_t1_walls must be a probability in [0, 1], got {self.wide_t1_walls!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["protocol"] = RANDOM_PROTOCOL if self.protocol == RANDOM_PROTOCOL else get_protocol(self.protocol).to_dict()
        return d


class SyntheticIRDataset(torch.utils.data.Dataset):
    """Pairs of IR images and maps generated on the fly (no disk): a map-style torch Dataset.

    Item i is realisation i % R of slice i // R. Returns a dict of float32 tensors:
    "image" (N_TI, H, W) magnitude images (PD of water = 1), "label" (3, H, W) = T1 [s], PD, B (the
    training target; :func:`maps_from_labels` gives the output convention, see the module doc),
    "mask" (1, H, W) (1 where the labels are meaningful: tissue with PD >= 0.1, i.e. not background
    or bone), and "snr" (scalar). With ``with_tissue`` also "tissue" (H, W) int64: the tissue class
    (:class:`custom_components.data.anatomy.Tissue`) at the centre of each output pixel (for per-tissue
    scores; scenes without labels give none).
    """

    def __init__(self, config: SynthesisConfig | dict | None = None, scene_fn: SceneFn | None = None,
                 with_tissue: bool = False, **overrides):
        if config is None:
            config = SynthesisConfig(**overrides)
        elif isinstance(config, dict):
            config = SynthesisConfig(**{**config, **overrides})
        elif overrides:
            config = replace(config, **overrides)
        self.config = config
        self.random_acquisition = config.protocol == RANDOM_PROTOCOL
        self.protocol = None if self.random_acquisition else get_protocol(config.protocol)
        self.random_scene_fn = None
        if scene_fn is None and config.scene in ("random_labels", "mixed"):
            from .random_scenes import RandomLabelScenes

            self.random_scene_fn = RandomLabelScenes(**(config.random_scenes or {}))
            if config.scene == "random_labels":
                scene_fn = self.random_scene_fn
        self.scene_fn = scene_fn
        self.with_tissue = bool(with_tissue)

    def __len__(self) -> int:
        return self.config.n_slices * self.config.realisations

    def _scene(self, rng, s, r, shape):
        if self.scene_fn is not None:
            return self.scene_fn(rng, s, r, shape)
        c = self.config
        if c.scene == "mixed" and not np.random.default_rng([c.seed, s, 7]).random() < c.brain_fraction:
            return self.random_scene_fn(rng, s, r, shape)
        return brain_scene(rng, s, r, shape, wide_t1=c.wide_t1, fov_mm=c.fov_mm, deform=c.deform, geometry_seed=c.seed,
                           wide_t1_objects=c.wide_t1_objects, wide_t1_walls=c.wide_t1_walls)

    def acquisition(self, s: int, r: int) -> tuple[Protocol, Effects]:
        """The protocol and effects of realisation ``r`` of slice ``s``: the config's, or with a random
        acquisition a protocol and noise model of their own (deterministic for the seed, s and r)."""
        c = self.config
        if not self.random_acquisition:
            return self.protocol, c.effects
        from ..physics.protocol import random_protocol

        rng = np.random.default_rng([c.seed, s, r, 11])
        protocol = random_protocol(rng)
        effects = c.effects
        if effects.noise in ("rician", "ncchi") and rng.random() >= RANDOM_NOISE["p_rician"]:
            lo, hi = RANDOM_NOISE["n_coils"]
            effects = replace(effects, noise="ncchi", n_coils=int(rng.integers(lo, hi + 1)))
        elif effects.noise in ("rician", "ncchi"):
            effects = replace(effects, noise="rician", n_coils=1)
        return protocol, effects

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        c = self.config
        s, r = divmod(int(i), c.realisations)
        rng = np.random.default_rng([c.seed, s, r, 1])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        f = c.effects.gibbs_factor
        shape = (c.matrix[0] * f, c.matrix[1] * f)
        scene = self._scene(rng, s, r, shape)
        if c.crop is not None:
            ch, cw = c.crop[0] * f, c.crop[1] * f
            pd = np.asarray(scene["PD"])
            # a crop centred on signal-bearing tissue (random position among tissue pixels)
            ys, xs = np.nonzero(pd > 0)
            if len(ys):
                j = rng.integers(len(ys))
                y0 = int(np.clip(ys[j] - ch // 2, 0, shape[0] - ch))
                x0 = int(np.clip(xs[j] - cw // 2, 0, shape[1] - cw))
            else:
                y0 = x0 = 0
            y0, x0 = y0 - y0 % f, x0 - x0 % f
            scene = {k: np.asarray(v)[y0:y0 + ch, x0:x0 + cw] for k, v in scene.items()}
        hw = np.asarray(scene["PD"]).shape
        b = smooth_inversion_efficiency(hw, gen, c.effects.b_range)
        snr = draw_snr(c.effects, rng)
        pe = c.effects.pe_axis
        if pe == "random":
            pe = int(rng.choice([-2, -1]))
        protocol, effects = self.acquisition(s, r)
        out = render(scene["T1"], scene["T2"], scene["PD"], b, protocol, effects, gen, sigma=1.0 / snr, pe_axis=pe)
        mask = out["mask"]
        if "mask" in scene:  # the scene's own notion of meaningful tissue (e.g. PD >= 0.1: not bone)
            m = torch.as_tensor(np.asarray(scene["mask"], dtype=np.float64))
            mask = mask & (downsample_area(m, f) >= 0.5)
        item = {"image": out["image"].float(), "label": out["label"].float(),
                "mask": mask.unsqueeze(0).float(), "snr": torch.tensor(snr, dtype=torch.float32)}
        if self.random_acquisition:  # labels in the output convention; the acquisition as JSON text (collates)
            item["label"] = out["truth"].float()
            item["protocol"] = json.dumps(protocol.to_dict())
            item["noise"] = json.dumps({"noise": effects.noise, "n_coils": int(effects.n_coils)})
        if self.with_tissue and "tissue" in scene:
            item["tissue"] = torch.as_tensor(np.asarray(scene["tissue"])[f // 2::f, f // 2::f].astype(np.int64))
        return item


def nist_twin(protocol: Protocol | str = "paper", snr: float | None = 50.0, effects: Effects | None = None,
              seed: int = 0, matrix: tuple[int, int] = (240, 240), fov_mm: float = 250.0, plate: str = "T1",
              version: int | None = None, rotation_deg: float = 0.0, shift_mm=(0.0, 0.0), b: float | None = None) -> dict:
    """The digital twin of the NIST/ISMRM phantom as a scanner would image it.

    The plate (:func:`custom_components.data.phantoms.nist_phantom_maps`, reference values for the
    protocol's field strength) goes through :func:`render` with ``effects`` (default: Rician noise,
    echo-train blurring where ETL > 1, no Gibbs). ``b``: a constant inversion efficiency, or None for
    a smooth field in ``effects.b_range``. ``snr`` overrides ``effects.snr_range`` (None: noiseless).

    Returns dict(image (N, H, W) float64 numpy, label (3, H, W) (the training target), truth
    (3, H, W) (the output convention: what a method's maps are scored against), mask, spheres (H, W) int sphere
    labels 0..14, reference (dict with T1_s, T2_s), protocol, snr, maps (the object-grid maps)).
    """
    from .phantoms import nist_phantom_maps

    protocol = get_protocol(protocol)
    effects = Effects() if effects is None else effects
    if snr is not None:
        effects = replace(effects, snr_range=(float(snr), float(snr)))
    rng = np.random.default_rng([seed, 7])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    f = effects.gibbs_factor
    common = dict(fov_mm=fov_mm, plate=plate, field_strength_t=protocol.field_strength_t, version=version,
                  rotation_deg=rotation_deg, shift_mm=shift_mm)
    maps = nist_phantom_maps(matrix=(matrix[0] * f, matrix[1] * f), supersample=2 if f > 1 else 4, **common)
    spheres = maps["labels"] if f == 1 else nist_phantom_maps(matrix=matrix, supersample=4, **common)["labels"]
    shape = maps["PD"].shape
    bmap = (torch.full(shape, float(b), dtype=torch.float64) if b is not None
            else smooth_inversion_efficiency(shape, gen, effects.b_range))
    sigma = None if snr is None else 1.0 / draw_snr(effects, rng)
    out = render(maps["T1"], maps["T2"], maps["PD"], bmap, protocol, effects, gen, sigma=sigma)
    return {"image": out["image"].numpy(), "label": out["label"].numpy(), "truth": out["truth"].numpy(),
            "mask": out["mask"].numpy(),
            "spheres": np.asarray(spheres), "reference": maps["reference"], "protocol": protocol,
            "snr": None if sigma is None else 1.0 / sigma, "maps": maps,
            "pixel_spacing_mm": (fov_mm / matrix[0], fov_mm / matrix[1])}


def write_dataset(out_dir: str | Path, config: SynthesisConfig, n_items: int | None = None, overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Write items as NIfTI (image 4D (H, W, 1, N) + JSON sidecar, label (H, W, 1, 3), mask) and a
    MONAI datalist ``dataset.json`` ({"training": [{"image", "label", "mask"}, ...]}). Atomic: the
    folder appears only when complete."""
    import shutil
    import tempfile

    import nibabel as nib

    from ..io import InputError

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{out_dir} exists and is not empty; pass --overwrite")
    ds = SyntheticIRDataset(config)
    if ds.random_acquisition:
        raise InputError("a random acquisition has a protocol per item; a written dataset has one protocol (its sidecar)")
    n = len(ds) if n_items is None else min(int(n_items), len(ds))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        c = config
        px = c.fov_mm / c.matrix[0]
        affine = np.diag([px, px, 1.0, 1.0])
        sidecar = {"InversionTime": list(ds.protocol.inversion_times_s),
                   "RepetitionTime": ds.protocol.repetition_time_s if not isinstance(ds.protocol.repetition_time_s, tuple) else list(ds.protocol.repetition_time_s),
                   "EchoTime": ds.protocol.echo_time_s, "EchoTrainLength": ds.protocol.echo_train_length,
                   "MagneticFieldStrength": ds.protocol.field_strength_t,
                   "Units": "a.u. (PD of water = 1)", "GeneratedBy": {"Name": "qmri synthesize", "Config": c.to_dict()}}
        items = []
        idx = range(n)
        if progress:
            from tqdm.auto import tqdm
            idx = tqdm(idx, desc="synthesize", unit="item")
        for i in idx:
            it = ds[i]
            stem = f"item-{i:05d}"
            img = it["image"].numpy().transpose(1, 2, 0)[:, :, None, :]
            lab = it["label"].numpy().transpose(1, 2, 0)[:, :, None, :]
            nib.save(nib.Nifti1Image(img.astype(np.float32), affine), tmp / f"{stem}_IRT1.nii.gz")
            (tmp / f"{stem}_IRT1.json").write_text(json.dumps({**sidecar, "SNR": float(it["snr"])}, indent=1))
            nib.save(nib.Nifti1Image(lab.astype(np.float32), affine), tmp / f"{stem}_label.nii.gz")
            nib.save(nib.Nifti1Image(it["mask"].numpy()[0].astype(np.uint8)[:, :, None], affine), tmp / f"{stem}_mask.nii.gz")
            items.append({"image": f"{stem}_IRT1.nii.gz", "label": f"{stem}_label.nii.gz", "mask": f"{stem}_mask.nii.gz"})
        (tmp / "dataset.json").write_text(json.dumps({"description": "qMRI Diffusor synthetic IR pairs; label channels T1 (s), PD, B",
                                                      "config": c.to_dict(), "training": items}, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = ["Effects", "SynthesisConfig", "SyntheticIRDataset", "render", "nist_twin", "labels_from_maps", "maps_from_labels", "labels_are_apparent",
           "brain_scene",
           "write_dataset", "draw_snr", "NOISE_MODELS"]
