"""The robustness suite's scenes (issue 20): NIST-like plates and brain slices drawn independently of
the training data, in two halves fixed by seed.

Every scene is a parameter dict drawn by :func:`draw_scene_params` (deterministic in
(:data:`SPLIT_SEEDS` [split], kind, index), JSON-able, cheap: no rendering) and rendered by
:func:`make_scene` through the project's own forward model
(:func:`custom_components.data.synthesis.render` with an :class:`~custom_components.data.synthesis.Effects`),
so finite TR, echo train, noise and the label/truth conventions are those of the training data and of
:func:`~custom_components.data.synthesis.nist_twin`. :func:`robustness_scenes` renders every drawn scene
in each protocol (same parameters, same noise seed).

The two halves. ``SPLIT_SEEDS["validation"]`` may be looked at while developing and choosing;
``SPLIT_SEEDS["test"]`` is only ever reported. A scene's generator is
``numpy.random.default_rng([SPLIT_SEEDS[split], KIND_CODES[kind], index])``; the two seeds differ, so
the halves never share a draw. The training data use ``default_rng([seed, slice, realisation, 1])``
and anatomy generators ``default_rng([geometry_seed, slice])`` with seeds 0 (training) and 100003
(validation); reporting/comparison.py's test slices use 917203 and 917204. None of those is a
:data:`SPLIT_SEEDS` value, and the brains here take their anatomy from
``default_rng([SPLIT_SEEDS[split], KIND_CODES["brain"], index, 1])``, whose first word is none of
those seeds.

What varies, and the ranges (all drawn per scene unless stated):

- **Plates** (NIST/ISMRM-like, T1 plate): a fluid-filled disk (the phantom body, diameter
  :data:`BODY_DIAMETER_MM`, at most FOV - 10 mm, shifted off centre by up to the margin the FOV leaves)
  holding 14 spheres with the T1 plate's reference T1 and T2 at the protocol's field strength
  (:func:`custom_components.data.phantoms.reference_values`, newest tabulated version); one sphere
  diameter per scene in :data:`SPHERE_DIAMETER_MM`; with probability 1/2 a signal-free wall of
  :data:`WALL_MM` around every sphere (none otherwise); layout either ``"random"`` (non-overlapping
  positions drawn uniformly in the body, at least :data:`SPHERE_GAP_MM` between walls) or ``"rings"``
  (10 on an outer ring and 4 on an inner ring, both radii random, each ring with its own random
  rotation), and in both the spheres are assigned to the positions in a random order (a random
  permutation), so neither position nor neighbourhood tells a network a sphere's T1. No fiducials.
  Fill: T1 uniform in :data:`FILL_T1_S`; T2 = T1 x U(:data:`FILL_T2_FRACTION`) (an assumption: the
  project's twin uses 2.4 s / 2.7 s = 0.89, hazen's "free water"); PD 1 (water). Sphere PD: per sphere,
  uniform in :data:`SPHERE_PD`. Partial volume as in
  :func:`custom_components.data.phantoms.nist_phantom_maps`: :data:`PLATE_SUPERSAMPLE` x
  :data:`PLATE_SUPERSAMPLE` sub-samples per pixel, PD averaged, relaxation rates PD-weighted.
- **Brains**: a deformed axial slice of the embedded MNI head
  (:func:`custom_components.data.anatomy.sample_slice`) with one tissue realisation
  (:func:`custom_components.data.tissues.sample_parameter_maps`, 3 T table, the training
  distribution's tissue variation): the two calls that
  :func:`custom_components.data.synthesis.brain_scene` makes, but with the source slice drawn from
  :data:`BRAIN_SOURCE_SLICES` (MNI z -19 to +45 mm, where white and grey matter and ventricles are
  all present; brain_scene draws it from the whole head) and with the tissue fractions kept for the
  ROIs. With probability 1/2, 1-3 lesion-like blobs (ellipses, semi-axes
  :data:`LESION_RADIUS_MM`, axis ratio 0.7-1) centred in white matter (at least the blob's radius + 1
  px inside the WM label), one set of values per scene: T1 uniform in :data:`LESION_T1_S`, T2 in
  :data:`LESION_T2_S`, PD in :data:`LESION_PD` (T2 and PD are an assumption, no source in the project:
  longer T2 and more water than the WM of the 3 T table, 0.06-0.10 s and 0.6-0.8, as a
  T2-hyperintense lesion has), no spatial variation. A blob replaces what lies beneath by its
  (4 x 4 sub-sampled) area fraction, mixed like every other compartment (PD linear, rates
  PD-weighted). No training scene had such blobs (the wide-T1 objects of the training data sit
  anywhere, not in WM, and are not limited to this T1 range). A brain's maps do not depend on the
  protocol: in nist15 (1.5 T) it keeps the 3 T tissue values, the only table the project has.
- **Matrix** one of :data:`MATRIX_CHOICES` (probabilities :data:`MATRIX_WEIGHTS`: the mean cost stays
  moderate), square; **FOV** uniform in :data:`PLATE_FOV_MM` (plates) or :data:`BRAIN_FOV_MM` (brains:
  a narrower FOV would cut the head); for plates the FOV's upper end is lowered to matrix x
  :data:`MAX_PIXEL_MM` (pixels of at most 1.5 mm, so that the smallest spheres keep an inner ROI: a
  128 matrix gets 180-192 mm). Brains keep their range (up to 2 mm pixels at 128).
- **B** (physical inversion efficiency, 2 = ideal), within :data:`B_RANGE`: low end and span drawn
  (span >= :data:`B_MIN_SPAN`), then either ``"smooth"`` (low + span x
  :func:`custom_components.physics.image_formation.smooth_field` of the image, seeded) or ``"linear"``
  (a linear gradient across the image in a random direction), each with probability 1/2.
- **Noise**: SNR log-uniform in :data:`SNR_RANGE`; Rician (1 coil) or, with probability
  :data:`NCCHI_PROBABILITY`, noncentral chi: root-sum-of-squares of n coils (n uniform in
  :data:`N_COILS`) of sensitivity 1/sqrt(n)
  (:func:`custom_components.physics.image_formation.add_ncchi_noise`).
- **Echo train**: on or off (probability 1/2), phase-encode axis rows (-2) or columns (-1). It acts only
  where the protocol's echo train length is > 1 (the paper protocol, ETL 64; not nist15, a spin echo):
  :attr:`Scene.echo_train_applied` says whether it did.
- No Gibbs ringing (``gibbs_factor`` 1), as in the twin.

SNR and sigma: ``sigma`` is the std of the complex Gaussian noise per real channel per coil, in image
units (PD of water = 1), and ``snr = 1 / sigma``. With the 1/sqrt(n) coil sensitivities this sigma is
also the std of the combined magnitude image where the signal is high (Rician and noncentral chi
alike), i.e. sigma_effective = sigma and SNR = PD 1 / sigma_effective: water at TI -> infinity. The
noise floor differs: pure noise has mean sigma sqrt(pi/2) (Rician, one coil) and
sigma sqrt(2) Gamma(n + 1/2) / Gamma(n) (about sigma sqrt(2 n), n coils).

Inner ROIs (what the suite scores on): plates, sphere k's disk (the pixels most of whose area is
sphere k's fluid) eroded by :data:`PLATE_EROSION_PX` px (Euclidean: pixels whose centre is more than
2 px from every pixel centre outside the disk), which leaves only pixels entirely inside the fluid;
an ROI with fewer than :data:`MIN_ROI_PX` pixels is dropped and listed in
``params["rendered"]["dropped_rois"]``. Brains: "WM", "GM", "CSF": pixels with at least
:data:`PURE_TISSUE_FRACTION` of that tissue (and no lesion), "lesion": pixels entirely inside a blob;
each eroded by 1 px where at least :data:`MIN_ROI_PX` pixels remain (else not eroded; dropped below
:data:`MIN_ROI_PX`).

Times in seconds, lengths in mm unless a name says px. Positions (dy, dx) = (down, right), as in
:mod:`custom_components.data.phantoms`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..physics.image_formation import smooth_field
from ..physics.protocol import Protocol, get_protocol

#: The two halves: fixed seeds. The validation half may be looked at while developing and choosing;
#: the test half is only ever reported.
SPLIT_SEEDS = {"validation": 2020_1001, "test": 2020_2002}
KINDS = ("plate", "brain")
KIND_CODES = {"plate": 1, "brain": 2}
#: Seeds of the other synthetic data of the project, which no scene here may share.
RESERVED_SEEDS = {"training": 0, "training validation": 100003, "comparison test": 917203,
                  "comparison calibration": 917204}

MATRIX_CHOICES = (128, 160, 192, 256)
MATRIX_WEIGHTS = (0.35, 0.30, 0.20, 0.15)
PLATE_FOV_MM = (180.0, 260.0)
BRAIN_FOV_MM = (220.0, 260.0)
#: The largest pixel spacing drawn for a plate: the FOV's upper end is min(range's end, matrix x this). At 2 mm
#: pixels (128 over 256 mm) a 13 mm sphere keeps fewer than 5 px after the 2 px erosion, and half of
#: the spheres of such a scene could not be scored (measured on validation plates 0 and 1 of the
#: first draft); 1.5 mm keeps an inner ROI of at least 5 px in a 10 mm sphere.
MAX_PIXEL_MM = 1.5

BODY_DIAMETER_MM = (160.0, 200.0)
BODY_MARGIN_MM = 10.0  # the body is at most FOV - 10 mm across, so air surrounds it
SPHERE_DIAMETER_MM = (10.0, 20.0)
WALL_MM = 1.5
WALL_PROBABILITY = 0.5
SPHERE_GAP_MM = 1.0  # the least distance between two spheres' outer edges (wall included)
EDGE_GAP_MM = 3.0  # the least distance between a sphere's outer edge and the body's edge
LAYOUTS = ("random", "rings")
FILL_T1_S = (1.5, 3.0)
FILL_T2_FRACTION = (0.80, 0.95)
FILL_PD = 1.0
SPHERE_PD = (0.6, 1.0)
PLATE_SUPERSAMPLE = 4

BRAIN_SOURCE_SLICES = (24, 88)  # inclusive indices of the embedded MNI head's source slices (z -19..+45 mm)
LESION_PROBABILITY = 0.5
N_LESIONS = (1, 3)
LESION_T1_S = (1.2, 1.8)
LESION_T2_S = (0.10, 0.20)
LESION_PD = (0.75, 0.90)
LESION_RADIUS_MM = (4.0, 7.0)
LESION_AXIS_RATIO = (0.7, 1.0)
LESION_SUPERSAMPLE = 4
PURE_TISSUE_FRACTION = 0.9

B_RANGE = (1.5, 2.0)
B_MIN_SPAN = 0.05
B_KINDS = ("smooth", "linear")
SNR_RANGE = (15.0, 100.0)
NCCHI_PROBABILITY = 0.25
N_COILS = (8, 32)
ECHO_TRAIN_PROBABILITY = 0.5

PLATE_EROSION_PX = 2
BRAIN_EROSION_PX = 1
MIN_ROI_PX = 5


@dataclass
class Scene:
    """One rendered scene of the robustness suite (see the module doc for every convention).

    Attributes:
        name: e.g. "validation plate 3 (paper)": unique within a split.
        kind: "plate" or "brain".
        split: "validation" or "test".
        index: the scene's index within its kind and split.
        protocol: the protocol it was rendered in.
        images: (N, H, W) float64 magnitude images, PD of water = 1.
        truth: (3, H, W) T1 (s), PD, B in the output convention (physical, TR-corrected, PD with the T2
            weighting at the effective TE: what ``nist_twin`` returns as "truth"); 0 where no signal.
        mask: (H, W) bool: the object (plates: the phantom body disk, spheres and walls included;
            brains: pixels at least half brain tissue: CSF, GM, WM or lesion).
        rois: name -> (H, W) bool inner ROI (module doc).
        roi_t1_s: name -> reference T1 (s): plates the sphere's true T1; brains the median true T1
            in the ROI (the lesion ROI's is the lesion's T1 exactly).
        sigma: noise std per real/imag channel per coil (0 where rendered without noise).
        noise: "rician" or "ncchi".
        n_coils: 1 for Rician.
        snr: 1 / sigma (inf without noise): PD 1 over the high-signal std of the magnitude image.
        pixel_spacing_mm: (dy, dx).
        params: JSON-able: everything drawn (:func:`draw_scene_params`), plus ``params["rendered"]``:
            what the render derived (protocol, echo train applied, ROI sizes, dropped ROIs, lesion
            centres).
        truth_mask: (H, W) bool: where ``truth`` is defined (PD > 0; for brains also scalp and bone).
        echo_train_applied: whether echo-train blurring acted (drawn on, and the protocol's ETL > 1).
        labels: (H, W) int64: plates, k = 1..14 where most of the pixel is sphere k's fluid (the full
            disk, edge pixels included), 0 elsewhere; brains, the tissue
            (:class:`custom_components.data.anatomy.Tissue` value) with the largest fraction, lesions
            not counted.
    """

    name: str
    kind: str
    split: str
    index: int
    protocol: Protocol
    images: np.ndarray
    truth: np.ndarray
    mask: np.ndarray
    rois: dict
    roi_t1_s: dict
    sigma: float
    noise: str
    n_coils: int
    snr: float
    pixel_spacing_mm: tuple
    params: dict
    truth_mask: np.ndarray = field(default=None, repr=False)
    echo_train_applied: bool = False
    labels: np.ndarray = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------- drawing
def _check_split_kind(split: str, kind: str) -> None:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def scene_seed(split: str, kind: str, index: int) -> list[int]:
    """The seed of the scene's numpy generator: [SPLIT_SEEDS[split], KIND_CODES[kind], index]."""
    _check_split_kind(split, kind)
    if int(index) < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return [SPLIT_SEEDS[split], KIND_CODES[kind], int(index)]


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _draw_common(rng: np.random.Generator, fov_range: tuple[float, float], max_pixel_mm: float = math.inf) -> dict:
    matrix = int(rng.choice(MATRIX_CHOICES, p=MATRIX_WEIGHTS))
    fov = float(rng.uniform(fov_range[0], min(fov_range[1], matrix * max_pixel_mm)))
    span = float(rng.uniform(B_MIN_SPAN, B_RANGE[1] - B_RANGE[0]))
    b_low = float(rng.uniform(B_RANGE[0], B_RANGE[1] - span))
    b_kind = B_KINDS[int(rng.integers(2))]
    b = {"kind": b_kind, "low": b_low, "high": b_low + span}
    if b_kind == "smooth":
        b["seed"] = int(rng.integers(2**62))
    else:
        b["angle_deg"] = float(rng.uniform(0.0, 360.0))  # direction of increase, clockwise from up
    snr = _log_uniform(rng, *SNR_RANGE)
    ncchi = bool(rng.uniform() < NCCHI_PROBABILITY)
    n_coils = int(rng.integers(N_COILS[0], N_COILS[1] + 1)) if ncchi else 1
    echo_train = bool(rng.uniform() < ECHO_TRAIN_PROBABILITY)
    pe_axis = int(rng.choice([-2, -1]))
    return {"matrix": matrix, "fov_mm": fov, "b_field": b, "snr": snr, "sigma": 1.0 / snr,
            "noise": "ncchi" if ncchi else "rician", "n_coils": n_coils, "echo_train": echo_train,
            "pe_axis": pe_axis, "noise_seed": int(rng.integers(2**62))}


def _random_layout(rng: np.random.Generator, n: int, place_radius: float, min_dist: float) -> np.ndarray:
    """n non-overlapping centres (dy, dx) uniform in a disk of ``place_radius`` mm (random sequential
    placement; restarts when it jams)."""
    for _ in range(200):
        pts = []
        tries = 0
        while len(pts) < n and tries < 5000:
            tries += 1
            r = place_radius * math.sqrt(rng.uniform())
            a = rng.uniform(0.0, 2 * math.pi)
            p = np.array([-r * math.cos(a), r * math.sin(a)])
            if all(np.hypot(*(p - q)) >= min_dist for q in pts):
                pts.append(p)
        if len(pts) == n:
            return np.array(pts)
    raise RuntimeError(f"could not place {n} spheres of spacing {min_dist:.1f} mm in a {place_radius:.1f} mm disk")


def _rings_layout(rng: np.random.Generator, place_radius: float, min_dist: float) -> tuple[np.ndarray, dict]:
    """10 centres on an outer ring and 4 on an inner ring (random radii and rotations), no overlap."""
    r_eff = 0.5 * min_dist
    r_o_min = max(r_eff / math.sin(math.pi / 10), r_eff * math.sqrt(2) + min_dist)
    if r_o_min > place_radius:
        raise RuntimeError("the body is too small for the rings")
    r_o = float(rng.uniform(r_o_min, place_radius))
    r_i = float(rng.uniform(r_eff * math.sqrt(2), r_o - min_dist))
    rot_o, rot_i = (float(x) for x in rng.uniform(0.0, 360.0, size=2))
    ang = np.concatenate([rot_o + 36.0 * np.arange(10), rot_i + 90.0 * np.arange(4)])
    rad = np.concatenate([np.full(10, r_o), np.full(4, r_i)])
    a = np.deg2rad(ang)
    return np.stack([-rad * np.cos(a), rad * np.sin(a)], axis=-1), {
        "outer_ring_radius_mm": r_o, "inner_ring_radius_mm": r_i,
        "outer_ring_rotation_deg": rot_o, "inner_ring_rotation_deg": rot_i}


def _draw_plate(rng: np.random.Generator) -> dict:
    p = _draw_common(rng, PLATE_FOV_MM, MAX_PIXEL_MM)
    fov = p["fov_mm"]
    body = float(rng.uniform(BODY_DIAMETER_MM[0], min(BODY_DIAMETER_MM[1], fov - BODY_MARGIN_MM)))
    max_shift = max(0.0, 0.5 * (fov - BODY_MARGIN_MM - body)) / math.sqrt(2)
    shift = [float(x) for x in rng.uniform(-max_shift, max_shift, size=2)]
    diameter = float(rng.uniform(*SPHERE_DIAMETER_MM))
    walls = bool(rng.uniform() < WALL_PROBABILITY)
    wall = WALL_MM if walls else 0.0
    r_out = 0.5 * diameter + wall
    place_radius = 0.5 * body - r_out - EDGE_GAP_MM
    min_dist = 2 * r_out + SPHERE_GAP_MM
    layout = LAYOUTS[int(rng.integers(2))]
    extra = {}
    if layout == "random":
        slots = _random_layout(rng, 14, place_radius, min_dist)
    else:
        slots, extra = _rings_layout(rng, place_radius, min_dist)
    order = rng.permutation(14)  # sphere k sits at slot order[k]
    centres = slots[order]
    fill_t1 = float(rng.uniform(*FILL_T1_S))
    fill_t2 = fill_t1 * float(rng.uniform(*FILL_T2_FRACTION))
    sphere_pd = [float(x) for x in rng.uniform(*SPHERE_PD, size=14)]
    p.update({"body_diameter_mm": body, "shift_mm": shift, "sphere_diameter_mm": diameter, "walls": walls,
              "wall_mm": wall, "layout": layout, **extra, "slot_of_sphere": [int(x) for x in order],
              "sphere_centres_mm": [[float(a), float(b)] for a, b in centres],
              "fill_T1_s": fill_t1, "fill_T2_s": fill_t2, "fill_PD": FILL_PD, "sphere_PD": sphere_pd})
    return p


def _draw_brain(rng: np.random.Generator, split: str, index: int) -> dict:
    p = _draw_common(rng, BRAIN_FOV_MM)
    p["anatomy_seed"] = [SPLIT_SEEDS[split], KIND_CODES["brain"], int(index), 1]
    p["source_slice"] = int(rng.integers(BRAIN_SOURCE_SLICES[0], BRAIN_SOURCE_SLICES[1] + 1))
    p["tissue_seed"] = int(rng.integers(2**62))
    lesions = []
    lesion_values = None
    if rng.uniform() < LESION_PROBABILITY:
        n = int(rng.integers(N_LESIONS[0], N_LESIONS[1] + 1))
        lesion_values = {"T1_s": float(rng.uniform(*LESION_T1_S)), "T2_s": float(rng.uniform(*LESION_T2_S)),
                         "PD": float(rng.uniform(*LESION_PD))}
        for _ in range(n):
            lesions.append({"radius_mm": float(rng.uniform(*LESION_RADIUS_MM)),
                            "axis_ratio": float(rng.uniform(*LESION_AXIS_RATIO)),
                            "angle_deg": float(rng.uniform(0.0, 180.0)),
                            "position_u": float(rng.uniform())})  # which candidate centre (see make_scene)
    p["lesion_values"] = lesion_values
    p["lesions"] = lesions
    return p


def draw_scene_params(split: str, index: int, kind: str) -> dict:
    """Everything random about one scene, drawn from ``default_rng(scene_seed(split, kind, index))``.

    Cheap (no rendering) and JSON-able; the same (split, index, kind) always gives the same dict. The
    keys and ranges are in the module doc; :func:`make_scene` renders it in a protocol.
    """
    seed = scene_seed(split, kind, index)
    rng = np.random.default_rng(seed)
    p = {"kind": kind, "split": split, "index": int(index), "seed": seed}
    p.update(_draw_plate(rng) if kind == "plate" else _draw_brain(rng, split, int(index)))
    return p


# ------------------------------------------------------------------------------------------ rendering
def _b_map(b: dict, shape: tuple[int, int]) -> torch.Tensor:
    lo, hi = float(b["low"]), float(b["high"])
    if b["kind"] == "smooth":
        f = smooth_field(shape, torch.Generator().manual_seed(int(b["seed"])))
    elif b["kind"] == "linear":
        h, w = shape
        a = math.radians(float(b["angle_deg"]))
        y = torch.arange(h, dtype=torch.float64)[:, None] - (h - 1) / 2
        x = torch.arange(w, dtype=torch.float64)[None, :] - (w - 1) / 2
        proj = -y * math.cos(a) + x * math.sin(a)
        f = (proj - proj.min()) / (proj.max() - proj.min()).clamp_min(1e-12)
    else:
        raise ValueError(f"unknown B field kind {b['kind']!r}")
    return lo + (hi - lo) * f


def _erode_edt(region: np.ndarray, px: int) -> np.ndarray:
    """Pixels whose centre is more than ``px`` from every pixel centre outside ``region``."""
    from scipy import ndimage

    padded = np.pad(region, 1, constant_values=False)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1] > px


def _plate_maps(params: dict, protocol: Protocol) -> dict:
    from .phantoms import _block_mean, _pixel_grid, mix_compartments, reference_values

    n = int(params["matrix"])
    ss = PLATE_SUPERSAMPLE
    yy, xx, shape, spacing = _pixel_grid((n, n), params["fov_mm"], ss)
    yy = yy - params["shift_mm"][0]
    xx = xx - params["shift_mm"][1]
    air = 15
    comp = np.full(yy.shape, air, dtype=np.int16)
    body_in = yy**2 + xx**2 <= (0.5 * params["body_diameter_mm"]) ** 2
    comp[body_in] = 0
    r_in = 0.5 * params["sphere_diameter_mm"]
    r_out = r_in + params["wall_mm"]
    for k, (cy, cx) in enumerate(params["sphere_centres_mm"]):
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        comp[d2 <= r_out**2] = air
        comp[d2 <= r_in**2] = k + 1
    fractions = np.stack([_block_mean((comp == c).astype(np.float64), shape, ss) for c in range(16)])
    ref = reference_values("T1", protocol.field_strength_t)
    c_t1 = np.concatenate([[params["fill_T1_s"]], ref["T1_s"], [np.inf]])
    c_t2 = np.concatenate([[params["fill_T2_s"]], ref["T2_s"], [np.inf]])
    c_pd = np.concatenate([[params["fill_PD"]], params["sphere_PD"], [0.0]])
    pd, t1, t2 = mix_compartments(fractions, c_t1, c_t2, c_pd)
    sphere_frac = fractions[1:15]
    labels = np.where(sphere_frac.max(0) > 0.5, sphere_frac.argmax(0) + 1, 0)
    body = _block_mean(body_in.astype(np.float64), shape, ss) > 0.5
    return {"T1": t1, "T2": t2, "PD": pd, "labels": labels, "mask": body, "fractions": fractions,
            "reference": ref, "spacing": spacing}


def _ellipse_fraction(shape, spacing, centre_px, radius_mm, axis_ratio, angle_deg, ss=LESION_SUPERSAMPLE):
    """Area fraction of each pixel inside an ellipse (semi-axes radius and radius x axis_ratio, in mm)."""
    h, w = shape
    sub = (np.arange(ss) + 0.5) / ss - 0.5
    ys = ((np.arange(h)[:, None] + sub[None, :]).ravel() - centre_px[0]) * spacing[0]
    xs = ((np.arange(w)[:, None] + sub[None, :]).ravel() - centre_px[1]) * spacing[1]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    a = math.radians(angle_deg)
    u = yy * math.cos(a) + xx * math.sin(a)
    v = -yy * math.sin(a) + xx * math.cos(a)
    inside = (u / radius_mm) ** 2 + (v / (radius_mm * axis_ratio)) ** 2 <= 1.0
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def _brain_maps(params: dict) -> dict:
    from . import anatomy, tissues

    n = int(params["matrix"])
    fov = float(params["fov_mm"])
    sl = anatomy.sample_slice(np.random.default_rng(params["anatomy_seed"]), index=params["source_slice"],
                              matrix=(n, n), fov_mm=fov, deform=True)
    probs = sl["probs"].astype(np.float64)
    maps = tissues.sample_parameter_maps(sl["probs"], np.random.default_rng(params["tissue_seed"]))
    t1 = maps["T1"].astype(np.float64)
    t2 = maps["T2"].astype(np.float64)
    pd = maps["PD"].astype(np.float64)
    spacing = (fov / n, fov / n)
    lesion = np.zeros((n, n))
    placed = []
    if params["lesions"]:
        from scipy import ndimage

        wm = sl["labels"] == anatomy.Tissue.WM
        depth = ndimage.distance_transform_edt(wm)
        lv = params["lesion_values"]
        for les in params["lesions"]:
            r_px = les["radius_mm"] / spacing[0]
            ok = depth >= r_px + 1
            for c in placed:  # keep blobs apart
                yy, xx = np.ogrid[:n, :n]
                ok &= (yy - c["centre_px"][0]) ** 2 + (xx - c["centre_px"][1]) ** 2 > (r_px + c["radius_px"] + 2) ** 2
            cand = np.argwhere(ok)
            if not len(cand):
                placed.append({"centre_px": None, "radius_px": r_px, "placed": False})
                continue
            cy, cx = (int(v) for v in cand[min(int(les["position_u"] * len(cand)), len(cand) - 1)])
            a = _ellipse_fraction((n, n), spacing, (cy, cx), les["radius_mm"], les["axis_ratio"], les["angle_deg"])
            lesion = np.maximum(lesion, a)
            placed.append({"centre_px": [cy, cx], "radius_px": r_px, "placed": True})
        a = lesion
        m_old = (1 - a) * pd
        m_les = a * lv["PD"]
        pd_new = m_old + m_les
        safe = np.where(pd_new > 0, pd_new, 1.0)
        r1 = (m_old / np.maximum(t1, 1e-9) + m_les / lv["T1_s"]) / safe
        r2 = (m_old / np.maximum(t2, 1e-9) + m_les / lv["T2_s"]) / safe
        has = (pd_new > 0) & (a > 0)
        t1 = np.where(has, 1.0 / np.where(r1 > 0, r1, 1.0), t1)
        t2 = np.where(has, 1.0 / np.where(r2 > 0, r2, 1.0), t2)
        pd = pd_new
        probs = probs * (1 - a)[None]
    T = anatomy.Tissue
    brain = probs[T.CSF] + probs[T.GM] + probs[T.WM] + lesion >= 0.5
    return {"T1": t1, "T2": t2, "PD": pd, "probs": probs, "lesion": lesion, "mask": brain, "spacing": spacing,
            "labels": sl["labels"],
            "lesions_placed": placed, "source_z_mm": float(sl["z_mm"]), "flipped": bool(sl["flipped"])}


def _roi(region: np.ndarray, erosion_px: int, where_possible: bool) -> tuple[np.ndarray, bool]:
    eroded = _erode_edt(region, erosion_px)
    if where_possible and eroded.sum() < MIN_ROI_PX:
        return region, False
    return eroded, True


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def make_scene(params: dict, protocol, split: str, index: int, noise_free: bool = False) -> Scene:
    """Render ``params`` (from :func:`draw_scene_params`) in ``protocol`` (a Protocol or a preset name).

    Deterministic: the noise comes from ``params["noise_seed"]`` (the same in every protocol), the B
    field from its own seed or direction. ``noise_free`` renders without noise (sigma 0, snr inf),
    everything else unchanged.
    """
    from .synthesis import Effects, render

    proto_label = protocol if isinstance(protocol, str) else getattr(protocol, "name", "custom")
    protocol = get_protocol(protocol)
    kind = params["kind"]
    if kind not in KINDS:
        raise ValueError(f"params['kind'] must be one of {KINDS}, got {kind!r}")
    if params.get("split") != split or int(params.get("index", -1)) != int(index):
        raise ValueError(f"params were drawn for {params.get('split')} {kind} {params.get('index')}, "
                         f"not {split} {kind} {index}")
    maps = _plate_maps(params, protocol) if kind == "plate" else _brain_maps(params)
    n = int(params["matrix"])
    bmap = _b_map(params["b_field"], (n, n))
    noise = params["noise"]
    n_coils = int(params["n_coils"]) if noise == "ncchi" else 1
    effects = Effects(noise=noise, n_coils=n_coils, echo_train=bool(params["echo_train"]), gibbs_factor=1)
    gen = torch.Generator().manual_seed(int(params["noise_seed"]))
    sigma = None if noise_free else float(params["sigma"])
    out = render(maps["T1"], maps["T2"], maps["PD"], bmap, protocol, effects, gen, sigma=sigma,
                 pe_axis=int(params["pe_axis"]))
    truth = out["truth"].numpy()
    rois, roi_t1, roi_px, dropped = {}, {}, {}, []
    if kind == "plate":
        ref_t1 = maps["reference"]["T1_s"]
        for k in range(1, 15):
            roi = _erode_edt(maps["labels"] == k, PLATE_EROSION_PX)
            name = f"sphere {k}"
            if roi.sum() < MIN_ROI_PX:
                dropped.append(name)
                continue
            rois[name], roi_t1[name], roi_px[name] = roi, float(ref_t1[k - 1]), int(roi.sum())
    else:
        from .anatomy import Tissue

        probs, lesion = maps["probs"], maps["lesion"]
        regions = {name: (probs[t] >= PURE_TISSUE_FRACTION) & (lesion == 0) & maps["mask"]
                   for name, t in (("WM", Tissue.WM), ("GM", Tissue.GM), ("CSF", Tissue.CSF))}
        if params["lesions"]:
            regions["lesion"] = lesion >= 1.0
        for name, region in regions.items():
            roi, eroded = _roi(region, BRAIN_EROSION_PX, where_possible=True)
            if roi.sum() < MIN_ROI_PX:
                dropped.append(name)
                continue
            rois[name] = roi
            roi_t1[name] = float(np.median(truth[0][roi]))
            roi_px[name] = {"px": int(roi.sum()), "eroded": bool(eroded)}
    echo_applied = bool(params["echo_train"]) and protocol.echo_train_length > 1
    rendered = {"protocol": proto_label, "protocol_name": protocol.name, "echo_train_applied": echo_applied,
                "noise_free": bool(noise_free), "roi_px": roi_px, "dropped_rois": dropped,
                "pixel_spacing_mm": list(maps["spacing"])}
    if kind == "brain":
        rendered.update({"lesions_placed": maps["lesions_placed"], "source_z_mm": maps["source_z_mm"],
                         "flipped": maps["flipped"], "pure_tissue_fraction": PURE_TISSUE_FRACTION})
    all_params = _jsonable({**params, "rendered": rendered})
    name = f"{split} {kind} {int(index)} ({proto_label})"
    return Scene(name=name, kind=kind, split=split, index=int(index), protocol=protocol,
                 images=out["image"].numpy(), truth=truth, mask=np.asarray(maps["mask"], dtype=bool),
                 rois=rois, roi_t1_s=roi_t1, sigma=0.0 if noise_free else float(params["sigma"]),
                 noise=noise, n_coils=n_coils, snr=math.inf if noise_free else float(params["snr"]),
                 pixel_spacing_mm=tuple(float(s) for s in maps["spacing"]), params=all_params,
                 truth_mask=out["mask"].numpy(), echo_train_applied=echo_applied,
                 labels=np.asarray(maps["labels"], dtype=np.int64))


def robustness_scenes(split: str, n_plates: int = 6, n_brains: int = 3, protocols=("paper", "nist15")) -> list[Scene]:
    """Every drawn scene of a split rendered in each protocol: plates 0..n_plates-1, then brains
    0..n_brains-1; within a kind by index, then protocol (same params and noise seed in each)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    out = []
    for kind, count in (("plate", n_plates), ("brain", n_brains)):
        for i in range(int(count)):
            params = draw_scene_params(split, i, kind)
            for proto in protocols:
                out.append(make_scene(params, proto, split, i))
    return out


__all__ = ["SPLIT_SEEDS", "KINDS", "Scene", "scene_seed", "draw_scene_params", "make_scene", "robustness_scenes"]
