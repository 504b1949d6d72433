"""Phantom report: spheres found from the image alone, numbered right, ROI statistics exact.

On the real 1.5 T scans (shared/data/nist_phantom_ir) the numbering is checked against physics
without any fit: the TI of minimum magnitude (about T1 ln 2, earlier with TR 1 s) must not increase
with sphere index, and at TI 50 ms the four inner spheres of the T1 plate (T1 65 -> 23 ms, null at
about 45 -> 16 ms) must get brighter from 11 to 14 while those of the T2 plate (T1 195 -> 83 ms,
null at about 135 -> 58 ms, so still inverted) must get darker. This fixes the inner-ring order
(11 upper left, then clockwise) used by :mod:`custom_components.data.phantoms`.
"""

from pathlib import Path

import numpy as np
import pytest

from custom_components.reporting.evaluation import (SphereLayout, format_table_markdown, locate_spheres, plot_layout,
                                          roi_statistics, sphere_table, table_summary, ti_of_minimum)
from custom_components.data.phantoms import N_SPHERES, nist_phantom_images
from custom_components.physics.protocol import paper_protocol

NIST_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nist_phantom_ir"
SERIES = [("site1_20200218", "plate5"), ("site2_20180925", "plate5"), ("site3_ge", "plate4"),
          ("site3_ge", "plate5"), ("site4_philips", "plate4"), ("site4_philips", "plate5")]


# ------------------------------------------------------------------------------ digital twin
def _noisy_twin(seed, plate, matrix, snr=50.0):
    """Twin images (paper protocol) with Rician noise, random rotation (+-180 deg) and shift (+-10 mm)."""
    rng = np.random.default_rng(seed)
    rot = rng.uniform(-180.0, 180.0)
    shift = rng.uniform(-10.0, 10.0, size=2)
    protocol = paper_protocol()
    images, maps = nist_phantom_images(protocol, b=1.9, plate=plate, field_strength_t=3.0, matrix=matrix,
                                       fov_mm=250.0, rotation_deg=rot, shift_mm=shift)
    sigma = 1.0 / snr
    noise = sigma * rng.standard_normal((2,) + tuple(images.shape))
    noisy = np.hypot(images.numpy() + noise[0], noise[1])
    t1_noisy = maps["T1"] * (1 + 0.05 * rng.standard_normal(maps["T1"].shape))
    return noisy, maps, protocol, t1_noisy


@pytest.mark.parametrize("seed,plate,matrix", [(0, "T1", (240, 240)), (1, "T2", (192, 192)),
                                               (2, "T1", (192, 192)), (3, "T2", (256, 256))])
def test_locate_on_the_twin_with_noise_rotation_and_shift(seed, plate, matrix):
    noisy, maps, protocol, t1_noisy = _noisy_twin(seed, plate, matrix)
    ref = maps["reference"]["T1_s"]
    truth = maps["sphere_centres_px"]

    layout = locate_spheres(noisy, maps["pixel_spacing_mm"], plate=plate, t1_map=t1_noisy, reference_t1_s=ref)
    assert layout.numbering == "t1_map"
    # per-label error: a wrong numbering would put centres 28-100 mm off
    err = np.linalg.norm(layout.centres_px - truth, axis=1)
    assert err.max() < 1.5, err
    assert abs((layout.rotation_deg - maps["rotation_deg"] + 180) % 360 - 180) < 1.0
    assert not layout.mirrored
    assert layout.ring_radius_mm == pytest.approx(50.0, abs=0.5)
    np.testing.assert_allclose(layout.edge_radius_mm, 8.0, rtol=0.1)

    # without a T1 map: the TI-of-minimum proxy ranks the spheres; with one image: the fiducials
    by_proxy = locate_spheres(noisy, maps["pixel_spacing_mm"], plate=plate, tis_s=protocol.tis)
    assert by_proxy.numbering == "ti_of_minimum"
    assert np.linalg.norm(by_proxy.centres_px - truth, axis=1).max() < 1.5
    single = locate_spheres(noisy[-1], maps["pixel_spacing_mm"], plate=plate)
    assert single.numbering.startswith("fiducials")
    assert np.linalg.norm(single.centres_px - truth, axis=1).max() < 1.5


def test_mirrored_twin_is_numbered_counterclockwise():
    protocol = paper_protocol()
    images, maps = nist_phantom_images(protocol, plate="T1", matrix=(200, 200), fov_mm=250.0,
                                       rotation_deg=-30.0, mirrored=True)
    layout = locate_spheres(images.numpy(), maps["pixel_spacing_mm"], t1_map=maps["T1"],
                            reference_t1_s=maps["reference"]["T1_s"])
    assert layout.mirrored
    assert np.linalg.norm(layout.centres_px - maps["sphere_centres_px"], axis=1).max() < 1.0


def test_numbering_from_a_t1_map_without_reference_values():
    """Ranks suffice: T1 falls with sphere index on both plates."""
    protocol = paper_protocol()
    images, maps = nist_phantom_images(protocol, plate="T2", field_strength_t=1.5, matrix=(200, 200),
                                       fov_mm=250.0, rotation_deg=140.0, shift_mm=(-6.0, 4.0))
    layout = locate_spheres(images.numpy(), maps["pixel_spacing_mm"], plate="plate4", t1_map=maps["T1"])
    assert layout.numbering == "t1_map"
    assert np.linalg.norm(layout.centres_px - maps["sphere_centres_px"], axis=1).max() < 1.0


@pytest.fixture(scope="module")
def twin_layout():
    protocol = paper_protocol()
    images, maps = nist_phantom_images(protocol, plate="T1", matrix=(240, 240), fov_mm=250.0, rotation_deg=20.0)
    layout = locate_spheres(images.numpy(), maps["pixel_spacing_mm"], t1_map=maps["T1"],
                            reference_t1_s=maps["reference"]["T1_s"])
    return layout, maps


def test_roi_statistics_of_constant_spheres_are_exact(twin_layout):
    layout, maps = twin_layout
    values = np.arange(1, N_SPHERES + 1) * 0.125  # exact in binary: sums and means are exact
    m = np.full(layout.shape, np.nan)  # NaN outside the spheres: must never leak into an ROI
    for k in range(1, N_SPHERES + 1):
        m[maps["labels"] == k] = values[k - 1]
    stats = roi_statistics(m, layout)
    assert [s["sphere"] for s in stats] == list(range(1, N_SPHERES + 1))
    dy, dx = layout.pixel_spacing_mm
    roi_area = np.pi * layout.roi_radius_mm ** 2 / (dy * dx)
    for s, v in zip(stats, values):
        assert s["mean"] == v and s["median"] == v and s["std"] == 0.0
        assert s["n_voxels"] == pytest.approx(roi_area, rel=0.1)
    # ROIs are inside their spheres (0.6 x radius): no ROI voxel outside its label
    for k in range(1, N_SPHERES + 1):
        assert np.all(maps["labels"][layout.roi_mask(k)] == k)


def test_sphere_table_and_markdown(twin_layout):
    layout, maps = twin_layout
    ref = maps["reference"]
    rows = sphere_table(maps["T1"], layout, ref)
    assert len(rows) == N_SPHERES
    for r, t1 in zip(rows, ref["T1_s"]):
        assert r["reference_ms"] == pytest.approx(1000 * t1)
        assert r["mean_ms"] == pytest.approx(1000 * t1) and r["error_percent"] == pytest.approx(0.0, abs=1e-9)
    # version 2, 3 T: spheres 1-5 (1884-485 ms) lie in 0.4-2 s, the rest below
    assert [r["sphere"] for r in rows if r["in_vivo_range"]] == [1, 2, 3, 4, 5]
    biased = sphere_table(maps["T1"] * 1.1, layout, ref["T1_s"])
    assert all(r["error_percent"] == pytest.approx(10.0) for r in biased)
    assert table_summary(biased)["in_vivo_range"]["mean_abs_error_percent"] == pytest.approx(10.0)
    md = format_table_markdown(biased, "T1 plate, 3 T")
    lines = md.splitlines()
    assert lines[0] == "### T1 plate, 3 T"
    assert "reference T1 (ms)" in lines[2]
    assert "| **1** | **1884.0** | **2072.4 ± 0.0** |" in md
    assert "| 14 | 21.4 | 23.6 ± 0.0 |" in md
    assert "+10.0" in md and "over the 5 in bold" in md
    with_unc = format_table_markdown(sphere_table(maps["T1"], layout, ref))
    assert "| **1** | **1884.0 ± 30** |" in with_unc  # the published uncertainty of version 2


def test_layout_summary_and_plot(twin_layout, tmp_path):
    layout, maps = twin_layout
    assert isinstance(layout, SphereLayout)
    d = layout.to_dict()
    assert len(d["centres_px"]) == N_SPHERES and d["numbering"] == "t1_map"
    assert layout.radius_px == pytest.approx(8.0 / maps["pixel_spacing_mm"][0])
    fig = plot_layout(maps["PD"], layout, path=tmp_path / "rois.png")
    assert (tmp_path / "rois.png").stat().st_size > 1000
    assert fig is not None


# ------------------------------------------------------------------------------ real scans
def _read_series(folder: Path):
    """Magnitude images sorted by TI (s), pixel spacing (mm): pydicom, no project reader.

    Pixel values: PV * RescaleSlope + RescaleIntercept, and for Philips images that carry the
    private MR Scale Slope SS (2005,100E) the floating-point value (PV * RS + RI) / (RS * SS), which
    is comparable between images (Philips rescales each TI differently).
    """
    pydicom = pytest.importorskip("pydicom")
    datasets = sorted((pydicom.dcmread(f) for f in folder.iterdir() if f.is_file()),
                      key=lambda ds: float(ds.InversionTime))
    images = []
    for ds in datasets:
        rs = float(ds.get("RescaleSlope", 1) or 1)
        ri = float(ds.get("RescaleIntercept", 0) or 0)
        value = ds.pixel_array.astype(float) * rs + ri
        ss = ds.get((0x2005, 0x100E))
        if ss is not None and float(ss.value) > 0:
            value = value / (rs * float(ss.value))
        images.append(np.abs(value))
    tis = np.array([float(ds.InversionTime) / 1000.0 for ds in datasets])
    spacing = tuple(float(x) for x in datasets[0].PixelSpacing)
    return np.stack(images), tis, spacing


@pytest.fixture(scope="module", params=SERIES, ids=lambda s: f"{s[0]}-{s[1]}")
def real(request):
    site, plate_dir = request.param
    folder = NIST_REAL / site / plate_dir
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    images, tis, spacing = _read_series(folder)
    plate = "T1" if plate_dir == "plate5" else "T2"
    layout = locate_spheres(images, spacing, plate=plate, tis_s=tis)
    return images, tis, spacing, plate, layout


def test_real_scans_give_14_separate_rois_inside_the_body(real):
    images, tis, spacing, plate, layout = real
    assert layout.fit_score > 3
    counts = np.bincount(layout.roi_labels.ravel(), minlength=N_SPHERES + 1)[1:]
    dy, dx = spacing
    np.testing.assert_allclose(counts, np.pi * layout.roi_radius_mm ** 2 / (dy * dx), rtol=0.15)
    assert np.all(layout.body_mask[layout.roi_labels > 0])
    # non-overlapping: the sphere disks themselves (not only the ROIs) are apart
    c_mm = layout.centres_px * np.asarray(spacing)
    dist = np.linalg.norm(c_mm[:, None] - c_mm[None], axis=-1) + np.eye(N_SPHERES) * 1e9
    assert dist.min() > 2 * layout.sphere_radius_mm
    # roughly equal radii: the fluid / wall edge around every centre, at the README's 15-17 mm diameter
    med = np.median(layout.edge_radius_mm)
    assert np.all(np.abs(layout.edge_radius_mm - med) < 0.10 * med)
    assert 7.0 < med < 8.5
    assert layout.ring_radius_mm == pytest.approx(50.0, abs=1.5)


def test_real_scans_numbering_follows_t1(real):
    images, tis, spacing, plate, layout = real
    assert layout.numbering == "ti_of_minimum"
    proxy = ti_of_minimum(images, tis, layout.centres_px, layout.roi_radius_mm, spacing)
    ti_min = proxy["ti_min_s"][proxy["interior"]]
    assert proxy["interior"].sum() >= 8
    assert np.all(np.diff(ti_min) <= 1e-9), np.round(1000 * proxy["ti_min_s"])
    # inner ring at TI 50 ms: 11 -> 14 brighter on the T1 plate, darker on the T2 plate
    inner = proxy["roi_means"][10:, 0]
    assert np.all(np.diff(inner) > 0) if plate == "T1" else np.all(np.diff(inner) < 0), inner
    # these scans were taken with the phantom in its nominal orientation
    assert not layout.mirrored
    assert abs((layout.rotation_deg + 180) % 360 - 180) < 18


def test_real_scans_single_late_ti_image_agrees(real):
    """One TI-800 ms image (no T1 information): same centres, numbering from fiducials + nominal."""
    images, tis, spacing, plate, layout = real
    single = locate_spheres(images[-1], spacing, plate=plate)
    assert single.numbering in ("fiducials", "fiducials+nominal")
    assert np.abs(single.centres_px - layout.centres_px).max() < 1.0


def test_roi_std_decomposition_separates_pattern_from_noise(twin_layout):
    """Monte Carlo with a known answer: a fixed spatial pattern (a radial bias of known std over
    each ROI) plus independent Gaussian noise of known sigma per realisation."""
    from custom_components.reporting.evaluation import roi_std_decomposition

    layout, _ = twin_layout
    rng = np.random.default_rng(7)
    rows, cols = np.indices(layout.shape)
    pattern = np.zeros(layout.shape)
    for k in range(1, N_SPHERES + 1):
        sel = layout.roi_labels == k
        rad = np.hypot(rows - layout.centres_px[k - 1, 0], cols - layout.centres_px[k - 1, 1])[sel]
        p = rad - rad.mean()
        pattern[sel] = 0.02 * k * p / p.std(ddof=1)  # std over the ROI exactly 0.02 k
    sigma, n_real, shift = 0.05, 40, 0.2
    # plus a shift of the whole map that changes between realisations: not within-sphere spread
    offsets = shift * rng.standard_normal(n_real)[:, None, None]
    maps = 1.0 + pattern[None] + offsets + sigma * rng.standard_normal((n_real,) + layout.shape)
    out = roi_std_decomposition(maps, layout)
    for k, r in enumerate(out, start=1):
        n = r["n_voxels"]
        assert r["mean_std"] == pytest.approx(offsets.std(ddof=1), rel=0.05)
        assert r["noise"] == pytest.approx(sigma, rel=4 / np.sqrt(n * (n_real - 1)))
        assert r["pattern"] == pytest.approx(0.02 * k, abs=4 * sigma / np.sqrt(n_real) / np.sqrt(2) + 0.002)
        assert r["total"] ** 2 == pytest.approx(r["noise"] ** 2 + r["pattern"] ** 2, rel=0.1)
    # noise only: the pattern estimate is zero up to its sampling error (no noise floor left in it)
    pure = roi_std_decomposition(1.0 + sigma * rng.standard_normal((n_real,) + layout.shape), layout)
    assert max(r["pattern"] for r in pure) < 3 * sigma / np.sqrt(n_real)
    with pytest.raises(ValueError, match="R >= 2"):
        roi_std_decomposition(maps[:1], layout)
