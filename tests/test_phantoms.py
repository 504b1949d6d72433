"""The NIST/ISMRM digital twin: reference tables as published, geometry as in the README, partial volume."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_components.data.phantoms import (BACKGROUND_FLUID, N_SPHERES, REFERENCE_TABLES_MS, nist_phantom_images,
                                        nist_phantom_maps, plate_geometry, reference_values, sphere_centres_mm)
from custom_components.physics.protocol import nist_15t_protocol, paper_protocol
from custom_components.physics.signal_model import signal

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FACTS = SHARED / "reference" / "facts.md"
README = SHARED / "data" / "nist_phantom_ir" / "README.md"


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]


def _after(text: str, marker: str, n: int = N_SPHERES) -> list[float]:
    """The first ``n`` numbers after ``marker`` in ``text``."""
    i = text.index(marker) + len(marker)
    return _numbers(text[i:])[:n]


# ----------------------------------------------------------------------------- reference values
def test_reference_tables_are_the_published_ones():
    """Transcribed numbers equal those of the sources, read from the source files themselves."""
    if not FACTS.exists() or not README.exists():
        pytest.skip("shared/reference/facts.md or the NIST README not found")
    facts = FACTS.read_text()
    readme = README.read_text()
    expected = {
        ("T1", 3.0, 2, "T1"): _after(facts, "Version 2, 3 T, 20 C:"),
        ("T1", 3.0, 1, "T1"): _after(facts, "Version 1, 3 T:"),
        ("T1", 3.0, 1, "T2"): _after(facts, "T2 (3 T):"),
        ("T1", 1.5, 1, "T1"): _after(readme, "plate5 (T1 plate, NiCl2), spheres 1..14:"),
        ("T2", 1.5, 1, "T1"): _after(readme, "plate4 (T2 plate, MnCl2), spheres 1..14:"),
        ("T1", 1.5, 1, "T2"): _after(readme, "1.5 T, plate5:"),
        ("T2", 1.5, 1, "T2"): _after(readme, "; plate4:"),
    }
    for (plate, b0, version, kind), ms in expected.items():
        assert len(ms) == N_SPHERES
        np.testing.assert_allclose(REFERENCE_TABLES_MS[(plate, b0, version)][kind], ms, rtol=0, atol=0)
        got = reference_values(plate, b0, version)[f"{kind}_s"]
        np.testing.assert_allclose(got, np.asarray(ms) / 1000.0, rtol=1e-12)


def test_reference_values_in_seconds_and_the_t2_fallback():
    v2 = reference_values("T1", 3.0, 2)
    assert v2["T1_s"].shape == v2["T2_s"].shape == (N_SPHERES,)
    assert v2["T1_s"][0] == pytest.approx(1.88397)  # version 2, sphere 1: 1883.97 ms
    assert v2["T1_s"][-1] == pytest.approx(0.02144)
    # version 2 publishes no T2: the version-1 T2 of the same plate and field is used, and said so
    np.testing.assert_array_equal(v2["T2_s"], reference_values("T1", 3.0, 1)["T2_s"])
    assert "version 1 T2" in v2["source_T2"]
    # the paper's Table 1 GT column: 1884 +- 30 ... 21 +- 1 ms
    assert v2["T1_uncertainty_s"][0] == pytest.approx(0.030) and v2["T1_uncertainty_s"][-1] == pytest.approx(0.001)
    assert reference_values("T1", 1.5)["T1_uncertainty_s"] is None
    # defaults: newest version; plate aliases; field strength tolerance
    assert reference_values()["version"] == 2
    assert reference_values("plate5", 1.5)["version"] == 1
    np.testing.assert_array_equal(reference_values("plate4", 1.52)["T1_s"], reference_values("T2", 1.5, 1)["T1_s"])
    assert reference_values("T2", 1.5)["T2_s"][-1] == pytest.approx(0.00815)


@pytest.mark.parametrize("plate,b0", [("T1", 1.5), ("T1", 3.0), ("T2", 1.5), ("T2", 3.0)])
def test_t1_and_t2_fall_with_sphere_index(plate, b0):
    """The numbering logic of evaluation.locate_spheres relies on T1 falling with sphere index."""
    ref = reference_values(plate, b0)
    assert np.all(np.diff(ref["T1_s"]) < 0)
    assert np.all(np.diff(ref["T2_s"]) < 0)
    assert np.all(ref["T2_s"] <= ref["T1_s"])


def test_reference_values_reject_what_is_not_tabulated():
    with pytest.raises(ValueError, match="version"):
        reference_values("T1", 1.5, 2)
    with pytest.raises(ValueError, match="7.0 T"):
        reference_values("T1", 7.0)
    with pytest.raises(ValueError, match="plate"):
        reference_values("PD")


# ----------------------------------------------------------------------------------- geometry
def test_sphere_centres_on_two_rings_clockwise_from_the_top():
    c = sphere_centres_mm()
    r = np.hypot(c[:, 0], c[:, 1])
    np.testing.assert_allclose(r[:10], 50.0)
    np.testing.assert_allclose(r[10:], 28.0)
    np.testing.assert_allclose(c[0], [-50.0, 0.0], atol=1e-12)  # sphere 1 straight up (dy < 0)
    angle = np.degrees(np.arctan2(c[:, 1], -c[:, 0])) % 360  # clockwise from up
    np.testing.assert_allclose(angle[:10], 36.0 * np.arange(10), atol=1e-9)
    np.testing.assert_allclose(angle[10:], [315.0, 45.0, 135.0, 225.0], atol=1e-9)
    m = sphere_centres_mm(mirrored=True)
    np.testing.assert_allclose(m[:, 1], -c[:, 1], atol=1e-12)  # mirror = left-right flip
    # the unnumbered pattern repeats every 180 deg and under the mirror
    def same_set(a, b):
        return np.linalg.norm(a[:, None] - b[None], axis=-1).min(1).max() < 1e-9

    assert same_set(sphere_centres_mm(180.0), c) and same_set(m, c)
    assert not same_set(sphere_centres_mm(36.0), c)


# ---------------------------------------------------------------------------------------- maps
@pytest.fixture(scope="module")
def twin():
    return nist_phantom_maps(matrix=(240, 240), fov_mm=250.0, plate="T1", field_strength_t=3.0, version=2)


def test_twin_has_14_spheres_of_the_right_area(twin):
    dy, dx = twin["pixel_spacing_mm"]
    area_px = np.pi * plate_geometry("T1").sphere_radius_mm ** 2 / (dy * dx)
    counts = np.bincount(twin["labels"].ravel(), minlength=N_SPHERES + 1)
    assert len(counts) == N_SPHERES + 1
    np.testing.assert_allclose(counts[1:], area_px, rtol=0.10)
    assert twin["T1"].shape == twin["PD"].shape == twin["T2"].shape == twin["labels"].shape == (240, 240)
    assert twin["body_mask"].dtype == bool and twin["labels"].dtype.kind == "i"


def test_twin_labels_numbered_clockwise_from_the_top(twin):
    centre = twin["centre_px"]
    np.testing.assert_allclose(centre, [119.5, 119.5])
    for k in range(1, N_SPHERES + 1):
        rows, cols = np.nonzero(twin["labels"] == k)
        dy, dx = rows.mean() - centre[0], cols.mean() - centre[1]
        angle = np.degrees(np.arctan2(dx, -dy)) % 360
        expected = 36.0 * (k - 1) if k <= 10 else [315.0, 45.0, 135.0, 225.0][k - 11]
        assert abs((angle - expected + 180) % 360 - 180) < 1.0, (k, angle)
        np.testing.assert_allclose([rows.mean(), cols.mean()], twin["sphere_centres_px"][k - 1], atol=0.3)
    rows1, _ = np.nonzero(twin["labels"] == 1)
    assert rows1.mean() < centre[0] - 40  # sphere 1 is on the row-0 side: the top of the image


def test_twin_values_inside_and_outside_the_spheres(twin):
    ref = twin["reference"]
    for k in range(1, N_SPHERES + 1):
        core = np.zeros_like(twin["labels"], dtype=bool)
        r, c = twin["sphere_centres_px"][k - 1]
        rows, cols = np.indices(core.shape)
        core = np.hypot(rows - r, cols - c) < 5  # well inside the 7.7-pixel radius
        np.testing.assert_allclose(twin["T1"][core], ref["T1_s"][k - 1], rtol=1e-12)
        np.testing.assert_allclose(twin["T2"][core], ref["T2_s"][k - 1], rtol=1e-12)
        np.testing.assert_allclose(twin["PD"][core], 1.0)
    assert np.all(twin["PD"][~twin["body_mask"]] <= 0.5)
    assert np.all(twin["T1"][twin["PD"] == 0] == 0)
    fill = twin["fractions"][0] == 1
    np.testing.assert_allclose(twin["T1"][fill], BACKGROUND_FLUID["T1_s"])
    np.testing.assert_allclose(twin["T2"][fill], BACKGROUND_FLUID["T2_s"])
    # the body disk has the plate's measured diameter
    dy, dx = twin["pixel_spacing_mm"]
    diameter = 2 * np.sqrt(twin["body_mask"].sum() * dy * dx / np.pi)
    assert diameter == pytest.approx(plate_geometry("T1").body_diameter_mm, rel=0.01)


def test_partial_volume_is_pd_weighted(twin):
    f, comp = twin["fractions"], twin["compartments"]
    np.testing.assert_allclose(f.sum(0), 1.0)
    edge = (f[1:N_SPHERES + 1].max(0) > 0.1) & (f[1:N_SPHERES + 1].max(0) < 0.9)
    assert edge.sum() > 100
    pd = np.tensordot(comp["PD"], f, axes=1)
    np.testing.assert_allclose(twin["PD"], pd)
    assert np.all((twin["PD"][edge] > 0) & (twin["PD"][edge] < 1))
    w = f * comp["PD"][:, None, None]
    r1 = np.tensordot(1 / comp["T1_s"], w, axes=1)[edge] / pd[edge]
    np.testing.assert_allclose(twin["T1"][edge], 1 / r1)
    binary = nist_phantom_maps(matrix=(64, 64), fov_mm=250.0, supersample=1)
    assert set(np.unique(binary["fractions"])) <= {0.0, 1.0}


def test_rotation_and_shift_move_the_spheres():
    m = nist_phantom_maps(matrix=(200, 200), fov_mm=250.0, rotation_deg=90.0, shift_mm=(10.0, -5.0))
    dy, dx = m["pixel_spacing_mm"]
    np.testing.assert_allclose(m["centre_px"], [99.5 + 10 / dy, 99.5 - 5 / dx])
    rows, cols = np.nonzero(m["labels"] == 1)
    # rotated 90 deg clockwise: sphere 1 is right of the centre (3 o'clock)
    assert cols.mean() - m["centre_px"][1] == pytest.approx(50.0 / dx, abs=0.3)
    assert rows.mean() - m["centre_px"][0] == pytest.approx(0.0, abs=0.3)


@pytest.mark.parametrize("protocol", [paper_protocol(), nist_15t_protocol(variable_tr=True)], ids=lambda p: p.name)
def test_images_from_maps_and_exact_partial_volume(protocol):
    maps = nist_phantom_maps(matrix=(96, 96), fov_mm=250.0, plate="T2", field_strength_t=1.5)
    exact, _ = nist_phantom_images(protocol, b=1.9, maps=maps)
    from_maps, _ = nist_phantom_images(protocol, b=1.9, maps=maps, partial_volume="maps")
    assert exact.shape == from_maps.shape == (protocol.n_images, 96, 96)
    assert torch.isfinite(exact).all() and torch.isfinite(from_maps).all()
    b = torch.full((96, 96), 1.9, dtype=torch.float64)
    params = torch.stack([torch.as_tensor(maps["T1"]), torch.as_tensor(maps["PD"]), b])
    torch.testing.assert_close(from_maps, signal(params, protocol, dim=0))
    pure = torch.as_tensor(maps["fractions"].max(0) == 1.0)
    torch.testing.assert_close(exact[:, pure], from_maps[:, pure])
    with_b_map, _ = nist_phantom_images(protocol, b=np.full((96, 96), 1.9), maps=maps)
    torch.testing.assert_close(with_b_map, exact)
    outside = torch.as_tensor(maps["PD"] == 0)
    assert float(exact[:, outside].abs().max()) == 0.0
