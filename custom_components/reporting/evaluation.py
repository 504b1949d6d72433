"""Phantom report: find the 14 spheres of a NIST/ISMRM plate in an image, measure ROIs, tabulate T1.

The workflow a physicist can check, in three calls::

    layout = locate_spheres(images, pixel_spacing_mm, plate="T1", t1_map=t1_s, reference_t1_s=ref)
    rows = sphere_table(t1_s, layout, ref)
    print(format_table_markdown(rows, "T1 plate, 3 T"))

Locating (:func:`locate_spheres`) uses the image only: no per-scan pixel coordinates.

1. Phantom body (:func:`body_mask`): Otsu threshold of the log of the maximum over the images
   (each scaled by its 99th percentile), largest connected component, holes filled; its centroid
   starts the search.
2. Edge image: Gaussian gradient magnitude of each image (sigma 1 mm), normalised per image and
   summed, restricted to the body eroded by 4 mm (drops the body's own edge). Sphere boundaries
   (fluid / wall / fill) show in it whatever the TI, also where a sphere and the fill have equal
   signal, because the plastic walls give no signal.
3. Circle response A = mean edge on a ring of the sphere's radius (plus half a wall) minus mean edge
   inside 0.6 radius (a flat interior): a circular Hough transform at the known radius, by FFT.
4. Rigid template: the 14-sphere pattern of :mod:`custom_components.data.phantoms` (outer ring scaled to
   45-55 mm, inner ring with it) at rotation theta; maximise the mean of A over the 14 centres on a
   grid (theta in 0-180 deg at 2 deg -- the point pattern repeats every 180 deg and is mirror
   symmetric --, ring radius at 1 mm, centre at 1 pixel within 20 mm of the body centroid), then
   Nelder-Mead on (centre, theta, scale) from the best few grid points.
5. Numbering: 4 assignments fit the geometry (sphere 1 at theta or theta + 180 deg, numbered
   clockwise or counterclockwise). In order of preference:

   - ``t1_map`` given: with ``reference_t1_s`` the assignment minimising
     sum_k |log(T1_k / T1_ref,k)| of the ROI medians wins; without, the one whose ROI medians have
     the highest Spearman correlation with the reference order (T1 falls with sphere index on both
     plates).
   - an image stack with ``tis_s``: the same Spearman test on the TI of minimum magnitude
     (:func:`ti_of_minimum`), a *proxy* of T1 (about T1 ln 2 at full recovery, earlier with a
     short TR) used only to rank the spheres whose null lies inside the sampled TIs.
   - otherwise the dark fiducials of the plate (:data:`phantoms.T1_PLATE_GEOMETRY`) exclude the
     orientations whose markers would sit on bright fill, and the nominal orientation (clockwise,
     sphere 1 nearest the top) decides among the rest. On plate 5 the markers cannot tell
     "rotated 180 deg and mirrored" apart, so a mirrored image (phantom seen from behind) is only
     numbered right with T1 information.
6. Each centre is refined to the local maximum of A within 3 mm; ROIs are disks of
   ``roi_fraction`` (0.6) x the sphere radius, so edges, partial volume and blurring stay outside.

Axis conventions as in :mod:`custom_components.data.phantoms`: pixel (row, col) = (y down, x right),
angles clockwise from up. T1 is in seconds in every function; the tables print ms.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, optimize, signal as sps, stats

from ..data import phantoms
from ..data.phantoms import N_SPHERES, SPHERE_IDS, plate_geometry, sphere_centres_mm
from ..io import InputError

RING_SCALE_RANGE = (0.9, 1.1)  # outer ring 45-55 mm for the nominal 50 mm
CENTRE_SEARCH_MM = 20.0
REFINE_MM = 3.0


# ------------------------------------------------------------------------------------ the layout
@dataclass
class SphereLayout:
    """Where the 14 spheres of a plate are in one image.

    Attributes:
        centres_px: (14, 2) float, (row, col) pixel centres of spheres 1..14 (refined per sphere).
        template_centres_px: (14, 2) the rigid-template centres before per-sphere refinement.
        plate_centre_px: (2,) (row, col) centre of the plate.
        rotation_deg: angle of sphere 1, clockwise from the image's up direction.
        mirrored: True if the spheres are numbered counterclockwise (phantom seen from behind).
        ring_radius_mm: fitted radius of the outer ring (the inner ring scales with it).
        sphere_radius_mm: nominal sphere (fluid) radius of the plate geometry.
        roi_radius_mm: radius of the ROI disks (roi_fraction x sphere_radius_mm).
        edge_radius_mm: (14,) measured radius of the innermost strong edge around each centre (a
            check: the fluid / wall boundary, i.e. the sphere's radius in the slice).
        pixel_spacing_mm: (row, col) spacing.
        shape: image shape (H, W).
        body_mask: (H, W) bool, the phantom body.
        roi_labels: (H, W) int, 0 outside ROIs, k inside the ROI of sphere k.
        numbering: how the numbering was decided: "t1_map", "ti_of_minimum" or "nominal".
        numbering_scores: {(rotation_deg, mirrored): score} of the 4 candidate assignments
            (lower is better for "t1_map" with reference values: sum |log ratio|; otherwise the
            Spearman correlation, higher is better).
        fit_score: mean circle response at the template centres in units of the response's
            robust spread over the body (z-score): > 5 is a clear detection.
        plate: "T1" or "T2".
    """

    centres_px: np.ndarray
    template_centres_px: np.ndarray
    plate_centre_px: np.ndarray
    rotation_deg: float
    mirrored: bool
    ring_radius_mm: float
    sphere_radius_mm: float
    roi_radius_mm: float
    edge_radius_mm: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    shape: tuple[int, int]
    body_mask: np.ndarray
    roi_labels: np.ndarray
    numbering: str
    numbering_scores: dict = field(default_factory=dict)
    fit_score: float = float("nan")
    plate: str = "T1"

    @property
    def radius_px(self) -> float:
        """Sphere radius in pixels (mean of the row and column spacing)."""
        return self.sphere_radius_mm / float(np.mean(self.pixel_spacing_mm))

    @property
    def roi_radius_px(self) -> float:
        return self.roi_radius_mm / float(np.mean(self.pixel_spacing_mm))

    def roi_mask(self, sphere: int) -> np.ndarray:
        """Boolean ROI of sphere ``sphere`` (1..14)."""
        return self.roi_labels == int(sphere)

    def to_dict(self) -> dict:
        """JSON-friendly summary (no image-sized arrays)."""
        return {
            "plate": self.plate,
            "centres_px": self.centres_px.round(3).tolist(),
            "plate_centre_px": self.plate_centre_px.round(3).tolist(),
            "rotation_deg": round(float(self.rotation_deg), 3),
            "mirrored": bool(self.mirrored),
            "ring_radius_mm": round(float(self.ring_radius_mm), 3),
            "sphere_radius_mm": float(self.sphere_radius_mm),
            "roi_radius_mm": float(self.roi_radius_mm),
            "edge_radius_mm": np.round(self.edge_radius_mm, 3).tolist(),
            "pixel_spacing_mm": list(self.pixel_spacing_mm),
            "n_voxels": [int(np.sum(self.roi_labels == k)) for k in SPHERE_IDS],
            "numbering": self.numbering,
            "numbering_scores": {f"{r:.1f}{'_mirrored' if m else ''}": float(s)
                                 for (r, m), s in self.numbering_scores.items()},
            "fit_score": float(self.fit_score),
        }


# ------------------------------------------------------------------------------------ helpers
def _spacing(pixel_spacing_mm) -> tuple[float, float]:
    s = np.atleast_1d(np.asarray(pixel_spacing_mm, dtype=float))
    if s.size == 1:
        s = np.repeat(s, 2)
    if s.size != 2 or np.any(s <= 0):
        raise ValueError(f"pixel_spacing_mm must be one or two positive values, got {pixel_spacing_mm}")
    return float(s[0]), float(s[1])


def _as_stack(image) -> np.ndarray:
    a = np.asarray(image, dtype=float)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected an image (H, W) or a stack (N, H, W), got shape {a.shape}")
    return np.where(np.isfinite(a), a, 0.0)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[np.argmax(between[:-1])])


def body_mask(image, pixel_spacing_mm=None, min_diameter_mm: float | None = None) -> np.ndarray:
    """Phantom body: pixels above an Otsu threshold of the log signal, largest component, holes filled.

    The signal is the maximum over the images, each scaled by its 99th percentile; the threshold is
    taken on log(signal + 1e-3), which separates air (noise) from a dim fill as well as a bright
    one. If the largest component is smaller than a disk of ``min_diameter_mm`` (the fill is at its
    inversion null in every given image, so only spheres show), the body is replaced by the disk of
    that diameter around the centroid of all above-threshold pixels.
    """
    stack = np.abs(_as_stack(image))
    scale = np.percentile(stack.reshape(len(stack), -1), 99, axis=1)
    v = (stack / np.where(scale > 0, scale, 1.0)[:, None, None]).max(0)
    lv = np.log(v + 1e-3)
    above = lv > _otsu(lv.ravel())
    m = ndimage.binary_opening(above, iterations=1)
    lab, n = ndimage.label(m)
    if n == 0:
        raise InputError("no phantom body found in the image: is it a map or image of the NIST/ISMRM phantom?")
    sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
    m = ndimage.binary_fill_holes(ndimage.binary_closing(lab == (1 + int(np.argmax(sizes))), iterations=2))
    if min_diameter_mm is not None and pixel_spacing_mm is not None:
        dy, dx = _spacing(pixel_spacing_mm)
        if m.sum() * dy * dx < np.pi * (0.5 * min_diameter_mm) ** 2:
            cy, cx = ndimage.center_of_mass(m | above)
            rows, cols = np.indices(v.shape)
            m = np.hypot((rows - cy) * dy, (cols - cx) * dx) <= 0.5 * min_diameter_mm
    return m


def _disk_kernel(radius_in_mm, radius_out_mm, spacing, sigma_mm=None) -> np.ndarray:
    """Normalised kernel: a ring (Gaussian profile at radius_out, width sigma) or a disk (sigma None)."""
    dy, dx = spacing
    ext = radius_out_mm + 3 * (sigma_mm or 0) + max(dy, dx)
    ny, nx = int(np.ceil(ext / dy)), int(np.ceil(ext / dx))
    yy, xx = np.meshgrid(np.arange(-ny, ny + 1) * dy, np.arange(-nx, nx + 1) * dx, indexing="ij")
    rr = np.hypot(yy, xx)
    if sigma_mm is None:
        k = (rr <= radius_in_mm).astype(float)
    else:
        k = np.exp(-0.5 * ((rr - radius_out_mm) / sigma_mm) ** 2)
    return k / k.sum()


def edge_image(image, pixel_spacing_mm, mask: np.ndarray | None = None, sigma_mm: float = 1.0) -> np.ndarray:
    """Sum over images of the Gaussian gradient magnitude (sigma in mm), each image scaled by the
    99th percentile of its magnitude inside ``mask`` (or everywhere)."""
    stack = _as_stack(image)
    dy, dx = _spacing(pixel_spacing_mm)
    sig = (sigma_mm / dy, sigma_mm / dx)
    out = np.zeros(stack.shape[1:])
    for img in stack:
        sel = np.abs(img[mask]) if mask is not None and mask.any() else np.abs(img)
        scale = np.percentile(sel, 99)
        if scale <= 0:
            continue
        out += ndimage.gaussian_gradient_magnitude(img / scale, sigma=sig)
    return out


def circle_response(edges: np.ndarray, pixel_spacing_mm, radius_mm: float, wall_mm: float) -> np.ndarray:
    """Mean edge strength on a ring at ``radius_mm + wall_mm / 2`` minus the mean inside 0.6 radius."""
    spacing = _spacing(pixel_spacing_mm)
    ring = _disk_kernel(None, radius_mm + 0.5 * wall_mm, spacing, sigma_mm=max(1.0, 0.5 * wall_mm + 0.5))
    inner = _disk_kernel(0.6 * radius_mm, 0.6 * radius_mm, spacing)
    return sps.fftconvolve(edges, ring, mode="same") - sps.fftconvolve(edges, inner, mode="same")


def _template_px(centre_px, theta_deg, scale, spacing, geom, mirrored=False) -> np.ndarray:
    off = sphere_centres_mm(theta_deg, mirrored, scale * geom.outer_ring_radius_mm,
                            scale * geom.inner_ring_radius_mm)
    return np.asarray(centre_px)[None, :] + off / np.asarray(spacing)[None, :]


def _disk_labels(shape, centres_px, radius_mm, spacing) -> np.ndarray:
    dy, dx = spacing
    rows, cols = np.arange(shape[0]), np.arange(shape[1])
    labels = np.zeros(shape, dtype=np.int64)
    for k, (r, c) in enumerate(centres_px):
        rr = ((rows[:, None] - r) * dy) ** 2 + ((cols[None, :] - c) * dx) ** 2
        labels[(rr <= radius_mm**2) & (labels == 0)] = k + 1
    return labels


def _roi_values(arr2d: np.ndarray, centres_px, radius_mm, spacing, fn=np.median) -> np.ndarray:
    labels = _disk_labels(arr2d.shape, centres_px, radius_mm, spacing)
    out = np.full(len(centres_px), np.nan)
    for k in range(len(centres_px)):
        v = arr2d[labels == k + 1]
        v = v[np.isfinite(v)]
        if v.size:
            out[k] = fn(v)
    return out


def _fiducial_scores(stack, body, centre_px, scale, spacing, geom, candidates) -> dict:
    """Signal at the fiducials of each candidate orientation, relative to the fill (lower = darker).

    Uses the maximum over images (each scaled by its 99th percentile), so the fill is bright in at
    least one image. Returns {candidate: median signal in 0.3-diameter disks at the fiducials /
    median signal of the fill}; empty if the geometry has no fiducials.
    """
    if not geom.fiducials:
        return {}
    a = np.abs(stack)
    scale99 = np.percentile(a.reshape(len(a), -1), 99, axis=1)
    v = (a / np.where(scale99 > 0, scale99, 1.0)[:, None, None]).max(0)
    sp = np.asarray(spacing)
    rows, cols = np.indices(v.shape)
    dist = np.hypot((rows - centre_px[0]) * sp[0], (cols - centre_px[1]) * sp[1])
    fill_ring = body & (dist > scale * geom.outer_ring_radius_mm + geom.sphere_radius_mm + 2 * geom.wall_thickness_mm)
    fill = np.median(v[fill_ring]) if fill_ring.any() else np.median(v[body])
    out = {}
    for rot, m in candidates:
        vals = []
        for f in geom.fiducials:
            ang = (-f.angle_deg if m else f.angle_deg) + rot
            pos = np.asarray(centre_px) + phantoms.polar_to_offset_mm(ang, scale * f.radius_mm) / sp
            disk = np.hypot((rows - pos[0]) * sp[0], (cols - pos[1]) * sp[1]) <= 0.3 * f.diameter_mm
            vals.append(np.median(v[disk]) if disk.any() else fill)
        out[(rot, m)] = float(np.mean(vals) / fill) if fill > 0 else float("inf")
    return out


# ------------------------------------------------------------------------------- T1 proxy
def ti_of_minimum(images, tis_s, centres_px, radius_mm: float, pixel_spacing_mm) -> dict:
    """TI of minimum ROI-mean magnitude per sphere: a *proxy* for ranking T1, not a T1 estimate.

    At full recovery the magnitude |1 - B exp(-TI/T1)| vanishes at TI = T1 ln B (about 0.69 T1);
    with a short TR the null comes earlier, still monotone in T1. The minimum sample is refined by
    the parabola through it and its two neighbours (in TI). Where the minimum is the first or last
    sample, the null lies outside the sampled TIs (or at its edge) and ``interior`` is False.

    Args:
        images: (N, H, W) magnitude images, sorted by TI. tis_s: (N,) TIs in s.
        centres_px: (K, 2) ROI centres (row, col); radius_mm: ROI radius.

    Returns:
        dict with ``ti_min_s`` (K,), ``interior`` (K,) bool, ``roi_means`` (K, N).
    """
    stack = _as_stack(images)
    tis = np.asarray(tis_s, dtype=float)
    if len(tis) != len(stack):
        raise ValueError(f"{len(stack)} images but {len(tis)} inversion times")
    order = np.argsort(tis)
    tis, stack = tis[order], stack[order]
    spacing = _spacing(pixel_spacing_mm)
    labels = _disk_labels(stack.shape[1:], centres_px, radius_mm, spacing)
    k_ids = np.arange(1, len(centres_px) + 1)
    means = np.stack([ndimage.mean(np.abs(img), labels, k_ids) for img in stack], axis=1)
    j = np.argmin(means, axis=1)
    ti_min = tis[j].astype(float)
    interior = (j > 0) & (j < len(tis) - 1)
    for k in np.where(interior)[0]:
        x, y = tis[j[k] - 1: j[k] + 2], means[k, j[k] - 1: j[k] + 2]
        a, b, _ = np.polyfit(x, y, 2)
        if a > 0:
            ti_min[k] = float(np.clip(-b / (2 * a), x[0], x[2]))
    return {"ti_min_s": ti_min, "interior": interior, "roi_means": means}


# ------------------------------------------------------------------------------- locating
def locate_spheres(image, pixel_spacing_mm, plate: str = "T1", t1_map=None, reference_t1_s=None,
                   tis_s=None, roi_fraction: float = 0.6, geometry=None, refine: bool = True) -> SphereLayout:
    """Find spheres 1..14 of a NIST/ISMRM plate in an image (see the module docstring for the method).

    Args:
        image: (H, W) image or (N, H, W) stack of the slice (magnitude IR images work best; a
            |T1| map with zero background works too). All images are used for locating.
        pixel_spacing_mm: one value or (row, col) spacing in mm.
        plate: "T1" (plate 5) or "T2" (plate 4): selects the geometry (rings are the same).
        t1_map: optional (H, W) T1 map in s, used only to resolve the numbering.
        reference_t1_s: optional (14,) reference T1 in s (e.g. :func:`phantoms.reference_values`).
        tis_s: optional (N,) TIs in s of a stack, for the TI-of-minimum proxy when no ``t1_map``.
        roi_fraction: ROI radius / sphere radius.
        geometry: a :class:`phantoms.PlateGeometry` (default: that of ``plate``).
        refine: refine each centre to its local circle-response maximum (within 3 mm).

    Returns:
        a :class:`SphereLayout`.
    """
    plate = phantoms.canonical_plate(plate)
    if not 0.0 < roi_fraction <= 1.0:
        raise ValueError(f"roi_fraction must be in (0, 1], got {roi_fraction}")
    geom = geometry if geometry is not None else plate_geometry(plate)
    stack = _as_stack(image)
    spacing = _spacing(pixel_spacing_mm)
    shape = stack.shape[1:]
    sp = np.asarray(spacing)

    min_body_mm = 2.0 * (RING_SCALE_RANGE[1] * geom.outer_ring_radius_mm + geom.sphere_radius_mm
                         + 2.0 * geom.wall_thickness_mm)
    finite = stack[np.isfinite(stack)]
    if finite.size == 0 or np.ptp(finite) == 0:
        raise InputError("no phantom body found: the image is constant (is it a map or image of the NIST/ISMRM phantom?)")
    body = body_mask(stack, spacing, min_diameter_mm=min_body_mm)
    start = np.asarray(ndimage.center_of_mass(body))
    inner_body = ndimage.binary_erosion(body, iterations=max(1, int(round(4.0 / min(spacing)))))
    edges = edge_image(stack, spacing, mask=body) * inner_body
    resp = circle_response(edges, spacing, geom.sphere_radius_mm, geom.wall_thickness_mm)
    in_body = resp[inner_body]
    med = np.median(in_body)
    spread = 1.4826 * np.median(np.abs(in_body - med)) or 1.0

    # -- coarse grid search over (centre, theta, scale)
    n_cy = int(np.ceil(CENTRE_SEARCH_MM / spacing[0]))
    n_cx = int(np.ceil(CENTRE_SEARCH_MM / spacing[1]))
    gy = np.round(start[0]) + np.arange(-n_cy, n_cy + 1)
    gx = np.round(start[1]) + np.arange(-n_cx, n_cx + 1)
    cy, cx = np.meshgrid(gy.astype(int), gx.astype(int), indexing="ij")
    reach = RING_SCALE_RANGE[1] * geom.outer_ring_radius_mm / min(spacing) + 2
    pad = int(np.ceil(reach)) + max(n_cy, n_cx) + 2  # the search never indexes outside the padding
    padded = np.pad(resp, pad, constant_values=np.min(resp))
    best = []
    for scale in np.arange(RING_SCALE_RANGE[0], RING_SCALE_RANGE[1] + 1e-9, 1.0 / geom.outer_ring_radius_mm):
        for theta in np.arange(0.0, 180.0, 2.0):
            off = np.round(_template_px((0.0, 0.0), theta, scale, spacing, geom)).astype(int) + pad
            score = np.zeros(cy.shape)
            for dr, dc in off:
                score += padded[cy + dr, cx + dc]
            i = np.unravel_index(np.argmax(score), score.shape)
            best.append((score[i] / N_SPHERES, cy[i], cx[i], theta, scale))
    best.sort(key=lambda t: -t[0])

    def cost(p):
        pts = _template_px(p[:2], p[2], p[3], spacing, geom)
        if not (RING_SCALE_RANGE[0] - 0.02 <= p[3] <= RING_SCALE_RANGE[1] + 0.02):
            return 1e9
        return -ndimage.map_coordinates(resp, pts.T, order=1, mode="nearest").mean()

    fits = []
    for _, y0, x0, th0, sc0 in best[:6]:
        res = optimize.minimize(cost, np.array([y0, x0, th0, sc0]), method="Nelder-Mead",
                                options={"xatol": 1e-3, "fatol": 1e-6, "maxiter": 2000,
                                         "initial_simplex": np.array([[y0, x0, th0, sc0],
                                                                      [y0 + 1, x0, th0, sc0],
                                                                      [y0, x0 + 1, th0, sc0],
                                                                      [y0, x0, th0 + 2, sc0],
                                                                      [y0, x0, th0, sc0 + 0.02]])})
        fits.append((res.fun, res.x))
    fun, (py, px, theta, scale) = min(fits, key=lambda t: t[0])
    centre = np.array([py, px])
    theta = float(np.mod(theta, 180.0))
    fit_score = float((-fun - med) / spread)
    if fit_score < 2.5:
        warnings.warn(f"the 14-sphere pattern is only weakly detected (score {fit_score:.1f}, below 2.5): "
                      "check the ROIs (plot_layout) or give a later-TI image", stacklevel=2)
    base = _template_px(centre, theta, scale, spacing, geom)  # geometric positions, unnumbered

    # -- per-sphere refinement of the (unnumbered) positions
    refined = base.copy()
    if refine:
        lim = REFINE_MM / sp
        coeffs = ndimage.spline_filter(resp, order=3, mode="nearest")  # once, not per evaluation

        def neg_resp(p):
            return -ndimage.map_coordinates(coeffs, np.asarray(p, dtype=float)[:, None], order=3,
                                            mode="nearest", prefilter=False)[0]

        for k, p0 in enumerate(base):
            r = optimize.minimize(neg_resp, p0, method="Nelder-Mead", options={
                "xatol": 1e-3, "fatol": 1e-8, "initial_simplex": np.array([p0, p0 + [0.7, 0], p0 + [0, 0.7]])})
            if np.all(np.abs(r.x - p0) <= lim) and r.fun <= neg_resp(p0):
                refined[k] = r.x

    # -- numbering: 4 assignments consistent with the geometry
    roi_mm = roi_fraction * geom.sphere_radius_mm
    candidates = [(float(np.mod(theta + d, 360.0)), m) for d in (0.0, 180.0) for m in (False, True)]
    perms = {}
    for rot, m in candidates:
        cand = _template_px(centre, rot, scale, spacing, geom, mirrored=m)
        d = np.linalg.norm((cand[:, None, :] - base[None, :, :]) * sp, axis=-1)
        perms[(rot, m)] = np.argmin(d, axis=1)  # label k -> index into base

    ref = None if reference_t1_s is None else np.asarray(reference_t1_s, dtype=float)
    order_ref = ref if ref is not None else -SPHERE_IDS.astype(float)  # T1 falls with sphere index
    scores: dict = {}
    if t1_map is not None:
        t1 = np.asarray(t1_map, dtype=float)
        if t1.shape != shape:
            raise ValueError(f"t1_map shape {t1.shape} differs from the image shape {shape}")
        vals = _roi_values(t1, refined, roi_mm, spacing)
        for key, perm in perms.items():
            v = vals[perm]
            if ref is not None:
                scores[key] = float(np.nansum(np.abs(np.log(np.maximum(v, 1e-6) / ref))))
            else:
                scores[key] = float(stats.spearmanr(v, order_ref, nan_policy="omit")[0])
        lower_better = ref is not None
        numbering = "t1_map"
    elif tis_s is not None and len(stack) >= 3:
        prox = ti_of_minimum(stack, tis_s, refined, roi_mm, spacing)
        use = prox["interior"] if prox["interior"].sum() >= 4 else np.ones(N_SPHERES, bool)
        for key, perm in perms.items():
            inv = np.argsort(perm)  # base index -> label index
            scores[key] = float(stats.spearmanr(prox["ti_min_s"][use], order_ref[inv][use])[0])
        lower_better = False
        numbering = "ti_of_minimum"
    else:
        # fiducials exclude the orientations whose markers land on fill; the nominal orientation
        # (sphere 1 nearest the top, clockwise) decides among the rest (on plate 5 the markers are
        # symmetric under "rotate 180 deg and mirror", so they exclude two of the four).
        fid = _fiducial_scores(stack, body, centre, scale, spacing, geom, candidates)
        allowed = list(perms)
        numbering = "nominal"
        if fid:
            lowest = min(fid.values())
            dark = [k for k in perms if fid[k] < 0.5 and fid[k] <= 1.5 * lowest + 0.05]
            if dark and len(dark) < len(perms):
                allowed = dark
                numbering = "fiducials" if len(dark) == 1 else "fiducials+nominal"
        for key in perms:
            rot, m = key
            nominal = float(m) * 1000.0 + abs(((rot + 180.0) % 360.0) - 180.0)
            scores[key] = nominal if key in allowed else 1e6 + nominal
        lower_better = True
    pick = (min if lower_better else max)(scores, key=lambda k: scores[k])
    rotation, mirrored = pick
    perm = perms[pick]
    centres = refined[perm]
    template = base[perm]

    # -- diagnostics: radius of the innermost strong edge around each centre (fluid / wall)
    radii = np.arange(0.4, 1.6, 0.02) * geom.sphere_radius_mm
    ang = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    edge_r = np.zeros(N_SPHERES)
    for k, (r0, c0) in enumerate(centres):
        rr = r0 + np.outer(radii, -np.cos(ang)) / sp[0]
        cc = c0 + np.outer(radii, np.sin(ang)) / sp[1]
        prof = ndimage.map_coordinates(edges, [rr.ravel(), cc.ravel()], order=1).reshape(rr.shape).mean(1)
        peaks = [i for i in range(1, len(prof) - 1)
                 if prof[i] >= prof[i - 1] and prof[i] >= prof[i + 1] and prof[i] >= 0.5 * prof.max()]
        edge_r[k] = radii[peaks[0] if peaks else int(np.argmax(prof))]

    return SphereLayout(
        centres_px=centres, template_centres_px=template, plate_centre_px=centre,
        rotation_deg=float(rotation), mirrored=bool(mirrored), ring_radius_mm=float(scale * geom.outer_ring_radius_mm),
        sphere_radius_mm=float(geom.sphere_radius_mm), roi_radius_mm=float(roi_mm), edge_radius_mm=edge_r,
        pixel_spacing_mm=spacing, shape=tuple(shape), body_mask=body,
        roi_labels=_disk_labels(shape, centres, roi_mm, spacing), numbering=numbering,
        numbering_scores=scores, fit_score=fit_score, plate=plate,
    )


# ------------------------------------------------------------------------------- ROI statistics
def roi_statistics(values, layout: SphereLayout) -> list[dict]:
    """Statistics of a map in each sphere's ROI.

    Non-finite voxels are left out (and not counted). ``std`` is the sample standard deviation
    (ddof = 1; 0 for a single voxel).

    Returns:
        one dict per sphere 1..14: ``sphere``, ``mean``, ``std``, ``median``, ``n_voxels``
        (in the map's units; NaN statistics for an empty ROI).
    """
    arr = np.asarray(values, dtype=float)
    if arr.shape != tuple(layout.shape):
        raise ValueError(f"map shape {arr.shape} differs from the layout's image shape {layout.shape}")
    rows = []
    for k in SPHERE_IDS:
        v = arr[layout.roi_labels == k]
        v = v[np.isfinite(v)]
        n = int(v.size)
        rows.append({
            "sphere": int(k),
            "mean": float(v.mean()) if n else float("nan"),
            "std": float(v.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan")),
            "median": float(np.median(v)) if n else float("nan"),
            "n_voxels": n,
        })
    return rows


def roi_std_decomposition(maps, layout: SphereLayout) -> list[dict]:
    """Split the within-sphere std of R maps of the same object (R noise realisations) into the
    part that changes between realisations (noise) and the part that does not (a spatial pattern:
    a bias that varies over the ROI).

    With voxel values v_ir = p_i + n_ir (pattern p over the ROI voxels i, zero-mean noise n of
    variance sigma^2 that is independent between realisations r):

    - ``total``: the mean over realisations of the within-ROI std (what :func:`roi_statistics`
      gives for one map);
    - ``noise``: the within-ROI part of the noise: each realisation's ROI mean is removed (a shift
      of the whole ROI between realisations is not within-sphere spread), then sqrt of the ROI
      mean of the per-voxel variance over realisations (ddof 1, times n / (n - 1) for the removed
      mean), an unbiased estimate of sigma^2 for noise independent between voxels;
    - ``pattern``: the within-ROI std of the realisation-averaged map with the noise it still holds
      removed, sqrt(max(var_i(mean_r v_ir) - noise^2 / R, 0)): the std of p over the ROI.

    ``total^2`` is about ``noise^2 + pattern^2``; ``mean_std`` is the std over realisations of the ROI
    mean (what the table's error column averages over). Non-finite voxels (in any realisation) are
    left out.

    Args:
        maps: (R, H, W) with R >= 2, in the map's units.
        layout: the sphere layout (the same for all realisations).

    Returns:
        one dict per sphere 1..14: ``sphere``, ``total``, ``noise``, ``pattern``, ``mean_std``, ``n_voxels``.
    """
    arr = np.asarray(maps, dtype=float)
    if arr.ndim != 3 or arr.shape[0] < 2:
        raise ValueError(f"need maps (R, H, W) of R >= 2 realisations, got shape {arr.shape}")
    if arr.shape[1:] != tuple(layout.shape):
        raise ValueError(f"map shape {arr.shape[1:]} differs from the layout's image shape {layout.shape}")
    r = arr.shape[0]
    finite = np.isfinite(arr).all(0)
    rows = []
    for k in SPHERE_IDS:
        sel = (layout.roi_labels == k) & finite
        v = arr[:, sel]  # (R, n)
        n = int(v.shape[1])
        if n < 2:
            rows.append({"sphere": int(k), "total": float("nan"), "noise": float("nan"), "pattern": float("nan"),
                         "mean_std": float("nan"), "n_voxels": n})
            continue
        roi_means = v.mean(axis=1, keepdims=True)
        c = v - roi_means  # within-ROI deviations of each realisation
        noise_var = float(np.mean(c.var(axis=0, ddof=1))) * n / (n - 1)
        pattern_var = float(c.mean(axis=0).var(ddof=1)) - noise_var / r
        rows.append({"sphere": int(k), "total": float(np.mean(v.std(axis=1, ddof=1))), "noise": float(np.sqrt(noise_var)),
                     "pattern": float(np.sqrt(max(pattern_var, 0.0))), "mean_std": float(roi_means.std(ddof=1)),
                     "n_voxels": n})
    return rows


def sphere_table(t1_map_s, layout: SphereLayout, reference_t1_s, t1_range_s=(0.4, 2.0)) -> list[dict]:
    """Measured against reference T1 per sphere, in ms (the report's units).

    Args:
        t1_map_s: (H, W) T1 map in s.
        layout: from :func:`locate_spheres`.
        reference_t1_s: (14,) reference T1 in s, or the dict of :func:`phantoms.reference_values`
            (whose ``T1_uncertainty_s``, where published, is carried into the rows).
        t1_range_s: spheres whose reference T1 lies in this range (inclusive) are flagged
            ``in_vivo_range`` (the paper highlights 0.4-2 s, the brain's range).

    Returns:
        one dict per sphere: ``sphere``, ``reference_ms``, ``reference_uncertainty_ms`` (NaN if
        unknown), ``mean_ms``, ``std_ms``, ``median_ms``, ``n_voxels``, ``error_percent``
        (100 (mean - reference) / reference), ``in_vivo_range``.
    """
    unc = None
    if isinstance(reference_t1_s, dict):
        unc = reference_t1_s.get("T1_uncertainty_s")
        ref = reference_t1_s["T1_s"]
    else:
        ref = reference_t1_s
    ref = np.asarray(ref, dtype=float)
    if ref.shape != (N_SPHERES,):
        raise ValueError(f"need {N_SPHERES} reference T1 values, got shape {ref.shape}")
    unc = np.full(N_SPHERES, np.nan) if unc is None else np.asarray(unc, dtype=float)
    lo, hi = t1_range_s
    rows = []
    for st, r, u in zip(roi_statistics(t1_map_s, layout), ref, unc):
        rows.append({
            "sphere": st["sphere"],
            "reference_ms": 1000.0 * r,
            "reference_uncertainty_ms": 1000.0 * u,
            "mean_ms": 1000.0 * st["mean"],
            "std_ms": 1000.0 * st["std"],
            "median_ms": 1000.0 * st["median"],
            "n_voxels": st["n_voxels"],
            "error_percent": 100.0 * (st["mean"] - r) / r,
            "in_vivo_range": bool(lo <= r <= hi),
        })
    return rows


def table_summary(rows: list[dict]) -> dict:
    """Mean absolute error (%) and mean coefficient of variation (%) over all spheres and over those
    flagged ``in_vivo_range``."""
    def agg(sel):
        sel = [r for r in sel if np.isfinite(r["error_percent"])]
        if not sel:
            return {"n": 0, "mean_abs_error_percent": float("nan"), "mean_cv_percent": float("nan")}
        return {"n": len(sel),
                "mean_abs_error_percent": float(np.mean([abs(r["error_percent"]) for r in sel])),
                "mean_cv_percent": float(np.mean([100.0 * r["std_ms"] / r["mean_ms"] for r in sel]))}
    return {"all": agg(rows), "in_vivo_range": agg([r for r in rows if r["in_vivo_range"]])}


def format_table_markdown(rows: list[dict], title: str | None = None) -> str:
    """A Markdown table of :func:`sphere_table` rows (T1 in ms); in-vivo-range rows in bold, as in
    the paper's Table 1, followed by the mean absolute error over all and over the bold spheres."""
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += ["| sphere | reference T1 (ms) | measured T1 (ms), mean ± std | median (ms) | error (%) | voxels |",
              "|---:|---:|---:|---:|---:|---:|"]

    def num(x, fmt):
        return format(x, fmt) if np.isfinite(x) else "n/a"

    for r in rows:
        ref_cell = num(r["reference_ms"], ".1f")
        if np.isfinite(r.get("reference_uncertainty_ms", np.nan)):
            ref_cell += f" ± {r['reference_uncertainty_ms']:.0f}"
        cells = [str(r["sphere"]), ref_cell,
                 f"{num(r['mean_ms'], '.1f')} ± {num(r['std_ms'], '.1f')}", num(r["median_ms"], ".1f"),
                 num(r["error_percent"], "+.1f"), str(r["n_voxels"])]
        if r["in_vivo_range"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    s = table_summary(rows)
    lines += ["", f"Mean |error|: {num(s['all']['mean_abs_error_percent'], '.1f')} % over {s['all']['n']} spheres; "
                  f"{num(s['in_vivo_range']['mean_abs_error_percent'], '.1f')} % over the "
                  f"{s['in_vivo_range']['n']} in bold (reference T1 in the in-vivo range)."]
    return "\n".join(lines) + "\n"


def plot_layout(image, layout: SphereLayout, path=None, title: str | None = None, ax=None):
    """Draw the ROIs (red), the nominal sphere outlines (yellow) and the sphere numbers on ``image``.

    ``ax``: draw into these axes (else a new pyplot-free Figure). Saves a PNG to ``path`` if given;
    returns the matplotlib figure.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse

    img = np.asarray(image, dtype=float)
    if img.ndim == 3:
        img = img[-1]
    if ax is None:  # a bare Figure: no pyplot state, no backend switch
        fig = Figure(figsize=(6, 6))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    dy, dx = layout.pixel_spacing_mm
    ax.imshow(img, cmap="gray", interpolation="nearest")
    for k, (r, c) in enumerate(layout.centres_px):
        ax.add_patch(Ellipse((c, r), 2 * layout.roi_radius_mm / dx, 2 * layout.roi_radius_mm / dy,
                             fill=False, color="red", lw=1.0))
        ax.add_patch(Ellipse((c, r), 2 * layout.sphere_radius_mm / dx, 2 * layout.sphere_radius_mm / dy,
                             fill=False, color="yellow", lw=0.5, ls="--"))
        ax.text(c, r, str(k + 1), color="cyan", ha="center", va="center", fontsize=8, weight="bold")
    ax.contour(layout.body_mask, levels=[0.5], colors="lime", linewidths=0.5)
    ax.set_title(title or f"{layout.plate} plate: rotation {layout.rotation_deg:.1f} deg, "
                          f"numbering from {layout.numbering}", fontsize=9)
    ax.set_axis_off()
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


__all__ = ["SphereLayout", "locate_spheres", "body_mask", "edge_image", "circle_response", "ti_of_minimum",
           "roi_statistics", "roi_std_decomposition", "sphere_table", "table_summary", "format_table_markdown", "plot_layout"]
