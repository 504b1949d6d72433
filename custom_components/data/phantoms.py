"""Digital twin of the NIST/ISMRM system phantom: the T1 plate (NiCl2) and the T2 plate (MnCl2).

What is modelled, and where every number comes from:

- **Reference values** (:func:`reference_values`): the manufacturer's published T1 and T2 of the 14
  spheres of each plate, transcribed verbatim in ms into :data:`REFERENCE_TABLES_MS` (each entry
  names its source) and returned in seconds.
- **Geometry** (:class:`PlateGeometry`, :func:`sphere_centres_mm`): spheres 1-10 on an outer ring
  (radius about 50 mm, 36 deg apart, sphere 1 at the top of the image, numbering clockwise), spheres
  11-14 on an inner ring (radius about 28 mm) on the diagonals, sphere diameter about 16 mm
  (shared/data/nist_phantom_ir/README.md). The inner-ring order (11 upper left, 12 upper right,
  13 lower right, 14 lower left, i.e. clockwise from the upper-left diagonal) was verified on the real
  1.5 T scans in shared/data (see ``tests/test_evaluation.py``); it agrees with the sphere
  coordinates of hazen's registration template (GSTT-CSC/hazen,
  hazenlib/data/relaxometry_params.py). The sphere walls, the three dark fiducials and the size of
  the phantom body in the imaged slice were measured on those scans (values and method at
  :data:`T1_PLATE_GEOMETRY`).
- **Fill fluid** of the phantom body: an *assumption* (no value in the project's sources),
  T1 2.7 s, T2 2.4 s, PD 1: the values hazen uses for the "free water" around the spheres.
- **Proton density** of the spheres: 1 (aqueous solutions of mM salt concentrations; an
  assumption, the manufacturer's tables give no PD for these plates).
- **Not modelled**: the rectangular insert at the plate's centre (between the inner spheres, seen in
  the real scans), the small bright dot at the centre of each fiducial, temperature dependence,
  T2 decay at the echo time, noise and blurring (:mod:`custom_components.physics.image_formation`).

Image axis convention (used by :func:`nist_phantom_maps` and by :mod:`custom_components.reporting.evaluation`):
arrays are indexed ``[row, col] = [y, x]`` with y pointing *down* and x pointing *right*, as an image
is displayed; "the top of the image" is the row-0 side. Angles are measured **clockwise from the
image's up direction** (-y), so a positive ``rotation_deg`` turns the plate clockwise on screen.
Positions in mm are given as ``(dy, dx)`` (down, right), in the same order as array indices.

Times are in seconds everywhere in this module's API.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

N_SPHERES = 14
SPHERE_IDS = np.arange(1, N_SPHERES + 1)

PLATES = {"T1": "T1 plate (plate 5, NiCl2 spheres)", "T2": "T2 plate (plate 4, MnCl2 spheres)"}

# ------------------------------------------------------------------------------- reference values
_FACTS = "shared/reference/facts.md, section 'NIST/ISMRM phantom'"
_README = "shared/data/nist_phantom_ir/README.md (phantom version 1 values, 1.5 T, about 20 C)"
_HAZEN = ("hazen (GSTT-CSC/hazen, Apache-2.0) hazenlib/data/relaxometry_params.py, TEMPLATE_VALUES"
          "['plate4'] '3.0T' (the manufacturer's values as quoted there; its 1.5 T and plate-5 3 T "
          "values agree digit for digit with the README and facts.md)")

#: The published tables, verbatim in **ms** (as printed by the manufacturer), keyed by
#: (plate, field strength in T, phantom version). ``None`` = not published in the project's sources.
#: Use :func:`reference_values` (seconds) rather than this table.
REFERENCE_TABLES_MS: dict[tuple[str, float, int], dict] = {
    ("T1", 3.0, 2): {
        "T1": (1883.97, 1330.16, 987.27, 690.08, 484.97, 341.58, 240.86, 174.95, 121.08,
               85.75, 60.21, 42.89, 30.40, 21.44),
        "T2": None,
        # the +- of the GT column of the paper's Table 1 (shared/reference/qmri_diffusor_paper.md),
        # which quotes these values (rounded to 1 ms) from the manual
        "T1_uncertainty": (30, 20, 14, 10, 7, 5, 3, 3, 2, 1, 1, 1, 1, 1),
        "source": _FACTS + ": version 2, 3 T, 20 C (the paper's Table 1 ground truth, with its +-)",
    },
    ("T1", 3.0, 1): {
        "T1": (1989, 1454, 984.1, 706, 496.7, 351.5, 247.13, 175.3, 125.9, 89.0, 62.7, 44.53,
               30.84, 21.719),
        "T2": (1465, 1076, 717.9, 510.1, 359.6, 255.5, 180.8, 127.3, 90.3, 64.3, 45.7, 31.86,
               22.38, 15.83),
        "source": _FACTS + ": version 1, 3 T",
    },
    ("T1", 1.5, 1): {
        "T1": (2033, 1489, 1012, 730.8, 514.1, 367.9, 260.1, 184.6, 132.7, 92.7, 65.4, 46.32,
               32.45, 22.859),
        "T2": (1669, 1244, 859.3, 628.5, 446.3, 321.2, 227.7, 161.9, 117.1, 81.9, 57.7, 41.0,
               28.7, 20.2),
        "source": _README + ", plate5",
    },
    ("T2", 1.5, 1): {
        "T1": (2376, 2183, 1870, 1539, 1237, 1030, 752.2, 550.2, 413.4, 292.9, 194.9, 160.2,
               106.4, 83.3),
        "T2": (939.4, 594.3, 416.5, 267.0, 184.9, 140.6, 91.76, 64.84, 45.28, 30.62, 19.76,
               15.99, 10.47, 8.15),
        "source": _README + ", plate4",
    },
    ("T2", 3.0, 1): {
        "T1": (2480, 2173, 1907, 1604, 1332, 1044, 801.7, 608.6, 458.4, 336.5, 244.2, 176.6,
               126.9, 90.9),
        "T2": (581.3, 403.5, 278.1, 190.94, 133.27, 96.89, 64.07, 46.42, 31.97, 22.56, 15.813,
               11.237, 7.911, 5.592),
        "source": _HAZEN + "; version 1 assumed, as hazen's plate-5 tables are version 1",
    },
}

#: Where a version publishes no T2 (version 2 of the T1 plate at 3 T), the T2 of this table is used:
#: the T2 of the same plate and field in version 1 (the NiCl2 concentrations set T1 and T2 together).
T2_FALLBACK = {("T1", 3.0, 2): ("T1", 3.0, 1)}

#: Fill fluid of the phantom body. ASSUMPTION: no value in the project's sources; these are the
#: values hazen (hazenlib/data/relaxometry_params.py) uses for the "free water" around the spheres
#: (2700 ms, 2400 ms); PD of water = 1.
BACKGROUND_FLUID = {"T1_s": 2.7, "T2_s": 2.4, "PD": 1.0,
                    "source": "assumption (hazen's 'free water' values, no primary source)"}

#: PD of the spheres' solutions. ASSUMPTION: aqueous solutions of mM salt concentrations, PD 1.
SPHERE_PD = 1.0


def canonical_plate(plate) -> str:
    """'T1' or 'T2' from a plate name ('T1', 'plate5', 'NiCl2', 'T2', 'plate4', 'MnCl2', 5, 4)."""
    p = str(plate).strip().upper()
    aliases = {"T1": "T1", "PLATE5": "T1", "5": "T1", "NICL2": "T1",
               "T2": "T2", "PLATE4": "T2", "4": "T2", "MNCL2": "T2"}
    if p not in aliases:
        raise ValueError(f"unknown plate {plate!r}: give 'T1' (plate 5, NiCl2) or 'T2' (plate 4, MnCl2)")
    return aliases[p]


def _canonical_field(field_strength_t: float) -> float:
    for b0 in (1.5, 3.0):
        if abs(float(field_strength_t) - b0) <= 0.1:
            return b0
    raise ValueError(f"no reference values for {field_strength_t} T: tables exist for 1.5 T and 3.0 T")


def available_tables() -> list[tuple[str, float, int]]:
    """The (plate, field strength in T, version) combinations with published values."""
    return sorted(REFERENCE_TABLES_MS)


def reference_values(plate: str = "T1", field_strength_t: float = 3.0, version: int | None = None) -> dict:
    """Reference T1 and T2 of spheres 1..14 in **seconds**.

    Args:
        plate: "T1" (plate 5, NiCl2) or "T2" (plate 4, MnCl2); "plate5"/"plate4" are accepted.
        field_strength_t: 1.5 or 3.0 (within 0.1 T).
        version: phantom version (1 or 2); ``None`` picks the newest tabulated one (version 2 for the
            T1 plate at 3 T, version 1 elsewhere). A version that is not tabulated raises ValueError.

    Returns:
        dict with ``T1_s`` and ``T2_s`` (float arrays of shape (14,), sphere 1 first), ``plate``,
        ``field_strength_t``, ``version``, ``source_T1`` and ``source_T2`` (where the numbers come
        from; where a version publishes no T2, ``source_T2`` says which table's T2 is used:
        version 2 T1 plate at 3 T -> version 1 T1 plate at 3 T), and ``T1_uncertainty_s``: the
        published uncertainty of T1 (14,) in s where the sources give one (version 2, 3 T), else None.
    """
    plate = canonical_plate(plate)
    b0 = _canonical_field(field_strength_t)
    versions = sorted(v for (p, f, v) in REFERENCE_TABLES_MS if p == plate and f == b0)
    if version is None:
        version = versions[-1]
    key = (plate, b0, int(version))
    if key not in REFERENCE_TABLES_MS:
        raise ValueError(f"no table for the {plate} plate at {b0} T version {version}; "
                         f"tabulated versions: {versions}")
    table = REFERENCE_TABLES_MS[key]
    t2_key = key if table["T2"] is not None else T2_FALLBACK[key]
    t2_table = REFERENCE_TABLES_MS[t2_key]
    t2_source = t2_table["source"]
    if t2_key != key:
        t2_source = f"{t2_source} (version {t2_key[2]} T2, used because version {key[2]} publishes none)"
    unc = table.get("T1_uncertainty")
    return {
        "T1_s": np.asarray(table["T1"], dtype=float) / 1000.0,
        "T1_uncertainty_s": None if unc is None else np.asarray(unc, dtype=float) / 1000.0,
        "T2_s": np.asarray(t2_table["T2"], dtype=float) / 1000.0,
        "plate": plate,
        "field_strength_t": b0,
        "version": key[2],
        "source_T1": table["source"],
        "source_T2": t2_source,
    }


# ------------------------------------------------------------------------------------- geometry
#: Angular position of each sphere on its ring, clockwise from the image's up direction, for the
#: nominal orientation: 1-10 every 36 deg from the top; 11-14 on the diagonals starting upper left.
NOMINAL_ANGLES_DEG = np.array([36.0 * k for k in range(10)] + [315.0, 45.0, 135.0, 225.0])
OUTER = np.arange(10)  # indices (0-based) of spheres 1..10
INNER = np.arange(10, 14)  # indices (0-based) of spheres 11..14


@dataclass(frozen=True)
class Fiducial:
    """A dark plastic marker in the plate: centre at ``angle_deg`` (clockwise from up, nominal
    orientation) and ``radius_mm`` from the plate centre, ``diameter_mm`` across."""

    angle_deg: float
    radius_mm: float
    diameter_mm: float


@dataclass(frozen=True)
class PlateGeometry:
    """Dimensions of one plate in the imaged slice, in mm.

    Attributes:
        outer_ring_radius_mm: radius of the ring of spheres 1-10.
        inner_ring_radius_mm: radius of the ring of spheres 11-14.
        sphere_diameter_mm: inner diameter of a sphere (its fluid) in the slice.
        wall_thickness_mm: plastic wall of each sphere (no signal, PD 0).
        body_diameter_mm: diameter of the fluid-filled body of the phantom in the slice (the body is
            rounded, so this depends on which plate the slice cuts: 198 mm in the plate-4 slices,
            167 mm in the plate-5 slices of shared/data; the default is the larger).
        fiducials: dark markers (no signal) that break the plate's symmetry.
        source: where the numbers come from.
    """

    outer_ring_radius_mm: float = 50.0
    inner_ring_radius_mm: float = 28.0
    sphere_diameter_mm: float = 16.0
    wall_thickness_mm: float = 2.0
    body_diameter_mm: float = 198.0
    fiducials: tuple[Fiducial, ...] = field(default_factory=tuple)
    source: str = ""

    @property
    def sphere_radius_mm(self) -> float:
        return 0.5 * self.sphere_diameter_mm


_GEOMETRY_SOURCE = (
    "rings and sphere diameter: shared/data/nist_phantom_ir/README.md (about 50 mm, 28 mm, 15-17 mm); "
    "wall thickness, fiducials and body diameter: measured on the six real 1.5 T series in shared/data "
    "(4 sites; spheres located with custom_components.reporting.evaluation.locate_spheres)")

# Measurements on the real scans (shared/data/nist_phantom_ir, all six series agree within the stated
# spread; method in brackets):
# - fitted outer ring radius 50.0-50.7 mm (template fit of evaluation.locate_spheres);
# - sphere fluid radius 7.75-8.0 mm, i.e. diameter 15.5-16 mm (half-way crossing from the sphere's
#   plateau to the wall's minimum in the azimuthally averaged profile, median over the 14 spheres);
# - wall 2.0-2.5 mm (inner to outer half-way crossing, same profiles; includes the blur of the
#   scanner's point spread function, so 2 mm is used);
# - fiducials: dark disks 13.8-15.0 mm across (threshold 0.35 x the fill's median signal), plate 5
#   at 90.0-90.3, 198.1-198.5 and 341.5-342.2 deg, 57.6-58.9 mm from the plate centre; plate 4 at
#   74.9-75.1, 194.4-195.0 and 314.8-315.2 deg, 75.2-76.2 mm (angles relative to sphere 1);
# - body in the slice: 166-169 mm across for plate 5, 198-199 mm for plate 4 (median over 72
#   directions of the radius at half the fill's signal, TI 50 ms; the plate-5 slice is further
#   from the body's widest section than the plate-4 slice).

#: T1 plate (plate 5).
T1_PLATE_GEOMETRY = PlateGeometry(
    sphere_diameter_mm=16.0,
    wall_thickness_mm=2.0,
    body_diameter_mm=167.0,
    fiducials=(Fiducial(90.0, 58.0, 14.5), Fiducial(198.0, 58.0, 14.5), Fiducial(342.0, 58.0, 14.5)),
    source=_GEOMETRY_SOURCE,
)

#: T2 plate (plate 4).
T2_PLATE_GEOMETRY = PlateGeometry(
    sphere_diameter_mm=16.0,
    wall_thickness_mm=2.0,
    body_diameter_mm=198.0,
    fiducials=(Fiducial(75.0, 76.0, 14.5), Fiducial(195.0, 76.0, 14.5), Fiducial(315.0, 76.0, 14.5)),
    source=_GEOMETRY_SOURCE,
)


def plate_geometry(plate: str = "T1") -> PlateGeometry:
    """The default :class:`PlateGeometry` of a plate ("T1" or "T2")."""
    return T1_PLATE_GEOMETRY if canonical_plate(plate) == "T1" else T2_PLATE_GEOMETRY


def polar_to_offset_mm(angle_deg, radius_mm) -> np.ndarray:
    """(dy, dx) in mm (down, right) of points at ``angle_deg`` clockwise from up, ``radius_mm`` out."""
    a = np.deg2rad(np.asarray(angle_deg, dtype=float))
    r = np.asarray(radius_mm, dtype=float)
    return np.stack([-r * np.cos(a), r * np.sin(a)], axis=-1)


def sphere_angles_deg(rotation_deg: float = 0.0, mirrored: bool = False) -> np.ndarray:
    """Angle of each sphere (1..14) clockwise from up: nominal angle (negated if ``mirrored``, i.e.
    numbered counterclockwise) plus ``rotation_deg``; sphere 1 always sits at ``rotation_deg``."""
    base = -NOMINAL_ANGLES_DEG if mirrored else NOMINAL_ANGLES_DEG
    return np.mod(base + float(rotation_deg), 360.0)


def sphere_centres_mm(rotation_deg: float = 0.0, mirrored: bool = False,
                      outer_radius_mm: float = 50.0, inner_radius_mm: float = 28.0) -> np.ndarray:
    """Centres of spheres 1..14 relative to the plate centre: (14, 2) array of (dy, dx) in mm."""
    radii = np.where(np.arange(N_SPHERES) < 10, outer_radius_mm, inner_radius_mm)
    return polar_to_offset_mm(sphere_angles_deg(rotation_deg, mirrored), radii)


# ----------------------------------------------------------------------------------------- maps
def _pixel_grid(matrix, fov_mm, supersample: int):
    """Sample positions (y, x) in mm relative to the image centre, shape (H*ss, W*ss), and spacing."""
    h, w = (int(matrix), int(matrix)) if np.isscalar(matrix) else (int(matrix[0]), int(matrix[1]))
    fy, fx = (float(fov_mm), float(fov_mm)) if np.isscalar(fov_mm) else (float(fov_mm[0]), float(fov_mm[1]))
    dy, dx = fy / h, fx / w
    ss = int(supersample)
    if ss < 1:
        raise ValueError("supersample must be >= 1")
    sub = (np.arange(ss) + 0.5) / ss - 0.5  # sub-sample offsets in pixels, centred on the pixel
    ys = ((np.arange(h)[:, None] + sub[None, :]).ravel() - (h - 1) / 2.0) * dy
    xs = ((np.arange(w)[:, None] + sub[None, :]).ravel() - (w - 1) / 2.0) * dx
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return yy, xx, (h, w), (dy, dx)


def _block_mean(x: np.ndarray, shape, ss: int) -> np.ndarray:
    h, w = shape
    return x.reshape(h, ss, w, ss).mean(axis=(1, 3))


def mix_compartments(fractions: np.ndarray, t1_s, t2_s, pd) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PD, T1 (s) and T2 (s) maps of pixels holding compartments c with area fractions ``fractions``
    (C, H, W) and values ``t1_s``, ``t2_s``, ``pd`` (C,): PD = sum_c f_c PD_c and PD-weighted relaxation
    rates, R1 = sum_c f_c PD_c / T1_c / PD (the same for T2); T1 = T2 = 0 where PD is 0 (no signal).
    An infinite T1/T2 (a compartment without signal) contributes a zero rate."""
    w = fractions * np.asarray(pd, dtype=float)[:, None, None]  # PD-weighted fractions
    pd_map = w.sum(0)
    safe = np.where(pd_map > 0, pd_map, 1.0)
    r1 = np.tensordot(1.0 / np.asarray(t1_s, dtype=float), w, axes=1) / safe
    r2 = np.tensordot(1.0 / np.asarray(t2_s, dtype=float), w, axes=1) / safe
    t1 = np.where(pd_map > 0, 1.0 / np.where(r1 > 0, r1, 1.0), 0.0)
    t2 = np.where(pd_map > 0, 1.0 / np.where(r2 > 0, r2, 1.0), 0.0)
    return pd_map, t1, t2


def nist_phantom_maps(matrix=(240, 240), fov_mm=250.0, plate: str = "T1", field_strength_t: float = 3.0,
                      version: int | None = None, rotation_deg: float = 0.0, shift_mm=(0.0, 0.0),
                      supersample: int = 4, geometry: PlateGeometry | None = None,
                      background: dict | None = None, mirrored: bool = False) -> dict:
    """T1, T2 and PD maps of one plate of the NIST/ISMRM system phantom, with partial volume.

    The plate sits in a disk of fill fluid (the phantom body in the slice); each sphere is a disk of
    its solution inside a plastic wall (PD 0); fiducials are plastic disks (PD 0); outside the body
    is air (PD 0). Each pixel is sampled ``supersample`` x ``supersample`` times and the compartment
    fractions f_c are averaged:

        PD = sum_c f_c PD_c,   R1 = sum_c f_c PD_c / T1_c / PD,   T1 = 1 / R1  (same for T2)

    i.e. relaxation *rates* are PD-weighted (the signal of a mixed pixel at short TI is
    PD (1 - B (1 - TI R1)) to first order, so this R1 reproduces it; the exact mixed signal is what
    :func:`nist_phantom_images` computes from ``fractions``). Where PD is 0, T1 = T2 = 0 (undefined).

    Args:
        matrix: (H, W) pixels (or one int).
        fov_mm: field of view in mm (one value or (FOV_y, FOV_x)); pixel spacing = fov / matrix.
        plate, field_strength_t, version: which reference table (see :func:`reference_values`).
        rotation_deg: clockwise rotation of the plate on screen (0: sphere 1 at the top).
        shift_mm: (down, right) shift of the phantom centre from the image centre in mm; the image
            centre is the point ((H - 1) / 2, (W - 1) / 2) in pixel indices.
        supersample: sub-samples per pixel along each axis.
        geometry: a :class:`PlateGeometry` (default: :func:`plate_geometry` of the plate).
        background: fill fluid dict with T1_s, T2_s, PD (default :data:`BACKGROUND_FLUID`).
        mirrored: number the spheres counterclockwise (a phantom seen from the other side).

    Returns:
        dict with
        ``T1``, ``T2`` (H, W) float64 in s; ``PD`` (H, W) float64 (water = 1);
        ``labels`` (H, W) int64: 0 = no sphere, k = 1..14 where most of the pixel's sub-samples lie
        in sphere k's fluid; ``body_mask`` (H, W) bool: most sub-samples inside the phantom body;
        ``fractions`` (16, H, W): per-pixel fraction of compartment c, c = 0 fill fluid, 1..14
        spheres, 15 no signal (air, walls, fiducials); ``compartments``: dict of arrays T1_s, T2_s,
        PD (16,) per compartment; ``reference``: :func:`reference_values`;
        ``sphere_centres_px`` (14, 2) true centres in (row, col) pixel indices; ``centre_px`` (2,);
        ``pixel_spacing_mm`` (dy, dx); ``rotation_deg``, ``mirrored``; ``geometry``.
    """
    ref = reference_values(plate, field_strength_t, version)
    geom = geometry if geometry is not None else plate_geometry(plate)
    bg = dict(BACKGROUND_FLUID) if background is None else dict(background)
    ss = int(supersample)
    yy, xx, shape, spacing = _pixel_grid(matrix, fov_mm, ss)
    sy, sx = float(shift_mm[0]), float(shift_mm[1])
    yy = yy - sy
    xx = xx - sx  # coordinates relative to the phantom centre

    n_comp = N_SPHERES + 2
    air = N_SPHERES + 1
    comp = np.full(yy.shape, air, dtype=np.int16)
    comp[yy**2 + xx**2 <= (0.5 * geom.body_diameter_mm) ** 2] = 0
    centres = sphere_centres_mm(rotation_deg, mirrored, geom.outer_ring_radius_mm, geom.inner_ring_radius_mm)
    r_in = geom.sphere_radius_mm
    r_out = r_in + geom.wall_thickness_mm
    for k, (cy, cx) in enumerate(centres):
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        comp[d2 <= r_out**2] = air  # the wall, overwritten by the fluid inside
        comp[d2 <= r_in**2] = k + 1
    for fid in geom.fiducials:
        ang = (-fid.angle_deg if mirrored else fid.angle_deg) + rotation_deg
        cy, cx = polar_to_offset_mm(ang, fid.radius_mm)
        comp[(yy - cy) ** 2 + (xx - cx) ** 2 <= (0.5 * fid.diameter_mm) ** 2] = air

    fractions = np.stack([_block_mean((comp == c).astype(np.float64), shape, ss) for c in range(n_comp)])
    c_t1 = np.concatenate([[bg["T1_s"]], ref["T1_s"], [np.inf]])
    c_t2 = np.concatenate([[bg["T2_s"]], ref["T2_s"], [np.inf]])
    c_pd = np.concatenate([[bg["PD"]], np.full(N_SPHERES, SPHERE_PD), [0.0]])

    pd, t1, t2 = mix_compartments(fractions, c_t1, c_t2, c_pd)

    sphere_frac = fractions[1:N_SPHERES + 1]
    labels = np.where(sphere_frac.max(0) > 0.5, sphere_frac.argmax(0) + 1, 0).astype(np.int64)
    h, w_ = shape
    centre_px = np.array([(h - 1) / 2.0 + sy / spacing[0], (w_ - 1) / 2.0 + sx / spacing[1]])
    centres_px = centre_px[None, :] + centres / np.asarray(spacing)[None, :]
    # walls, fiducials and air are all "no signal"; the body mask is the disk of the phantom body.
    body_disk = _block_mean((yy**2 + xx**2 <= (0.5 * geom.body_diameter_mm) ** 2).astype(float), shape, ss) > 0.5
    return {
        "T1": t1, "T2": t2, "PD": pd, "labels": labels, "body_mask": body_disk,
        "fractions": fractions,
        "compartments": {"T1_s": c_t1, "T2_s": c_t2, "PD": c_pd,
                         "names": ["fill fluid"] + [f"sphere {k}" for k in SPHERE_IDS] + ["no signal"]},
        "reference": ref, "sphere_centres_px": centres_px, "centre_px": centre_px,
        "pixel_spacing_mm": tuple(spacing), "rotation_deg": float(rotation_deg), "mirrored": bool(mirrored),
        "geometry": geom,
    }


def nist_phantom_images(protocol, b=2.0, partial_volume: str = "exact", maps: dict | None = None, **map_kwargs):
    """Noiseless magnitude inversion-recovery images of the digital twin.

    ``partial_volume="exact"`` sums the *signed* signal of every compartment weighted by its
    fraction, then takes the magnitude (what a scanner sees in a mixed pixel);
    ``"maps"`` evaluates :func:`custom_components.physics.signal_model.signal` on the (T1, PD, B) maps, which
    is what a method that maps one T1 per pixel assumes. Both agree away from sphere edges.
    No noise, no T2 decay at the echo time, no blurring: :mod:`custom_components.physics.image_formation`
    adds those.

    Args:
        protocol: a :class:`custom_components.physics.protocol.Protocol`.
        b: inversion efficiency, a number or an (H, W) map (2 = ideal inversion).
        maps: the output of :func:`nist_phantom_maps` (else it is computed from ``map_kwargs``).

    Returns:
        (images, maps): images a float64 torch tensor (N, H, W), inversion times along dim 0.
    """
    import torch

    from ..physics.signal_model import signal, signed_signal

    maps = nist_phantom_maps(**map_kwargs) if maps is None else maps
    shape = maps["PD"].shape
    b_map = torch.as_tensor(np.broadcast_to(np.asarray(b, dtype=float), shape).copy())
    if partial_volume == "maps":
        params = torch.stack([torch.as_tensor(maps["T1"]), torch.as_tensor(maps["PD"]), b_map])
        return signal(params, protocol, dim=0), maps
    if partial_volume != "exact":
        raise ValueError("partial_volume must be 'exact' or 'maps'")
    comp = maps["compartments"]
    used = [c for c in range(len(comp["PD"])) if comp["PD"][c] > 0]
    t1 = torch.as_tensor(comp["T1_s"][used], dtype=torch.float64)
    pd = torch.as_tensor(comp["PD"][used], dtype=torch.float64)
    frac = torch.as_tensor(maps["fractions"][used])  # (C, H, W)
    if np.ndim(b) == 0:  # one signal curve per compartment, mixed by its fraction map
        params = torch.stack([t1, pd, torch.full_like(t1, float(b))])  # (3, C)
        curves = signed_signal(params, protocol, dim=0)  # (N, C)
        total = torch.tensordot(curves, frac, dims=1)
    else:
        total = torch.zeros((protocol.n_images,) + tuple(shape), dtype=torch.float64)
        for i in range(len(used)):
            p = torch.stack([torch.full(shape, float(t1[i]), dtype=torch.float64),
                             torch.full(shape, float(pd[i]), dtype=torch.float64), b_map])
            total += frac[i] * signed_signal(p, protocol, dim=0)
    return total.abs(), maps


__all__ = ["N_SPHERES", "SPHERE_IDS", "PLATES", "REFERENCE_TABLES_MS", "T2_FALLBACK", "BACKGROUND_FLUID",
           "SPHERE_PD", "canonical_plate", "available_tables", "reference_values", "NOMINAL_ANGLES_DEG", "Fiducial",
           "PlateGeometry", "T1_PLATE_GEOMETRY", "T2_PLATE_GEOMETRY", "plate_geometry", "polar_to_offset_mm",
           "sphere_angles_deg", "sphere_centres_mm", "nist_phantom_maps", "nist_phantom_images"]
