"""The robustness suite's scene family (custom_components/data/scenes.py, issue 20 item 1).

Known answers: parameter ranges and draw frequencies (binomial / uniform Monte Carlo bounds over many
cheap parameter draws), sphere geometry (inner ROI = the sphere's disk eroded by 2 px, entirely in the
fluid), the signal model on the truth where nothing else acts, and the noise floor of the background
(Rayleigh mean sigma sqrt(pi/2), chi mean sigma sqrt(2) Gamma(n + 1/2) / Gamma(n)).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import special

from custom_components.data import scenes as S
from custom_components.data.phantoms import reference_values
from custom_components.physics.image_formation import effective_echo_time_s
from custom_components.physics.protocol import get_protocol
from custom_components.physics.signal_model import signal

N_DRAWS = 300  # per split and kind: params only, cheap


def _draws(split, kind, n=N_DRAWS):
    return [S.draw_scene_params(split, i, kind) for i in range(n)]


def _first(split, kind, pred, n=200):
    for i in range(n):
        p = S.draw_scene_params(split, i, kind)
        if pred(p):
            return i, p
    raise AssertionError("no draw satisfies the predicate")


# ------------------------------------------------------------------------------------- determinism
def test_same_split_and_index_give_identical_params_and_images():
    i, p = _first("validation", "plate", lambda p: p["matrix"] == 128)
    assert S.draw_scene_params("validation", i, "plate") == p
    json.dumps(p)  # JSON-able
    a = S.make_scene(p, "paper", "validation", i)
    b = S.make_scene(S.draw_scene_params("validation", i, "plate"), "paper", "validation", i)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.truth, b.truth)
    assert a.rois.keys() == b.rois.keys() and all(np.array_equal(a.rois[k], b.rois[k]) for k in a.rois)
    assert a.params == b.params
    json.dumps(a.params)


def test_splits_use_disjoint_seeds_and_differ():
    v, t = S.SPLIT_SEEDS["validation"], S.SPLIT_SEEDS["test"]
    assert v != t
    assert not {v, t} & set(S.RESERVED_SEEDS.values())  # training, its validation, comparison.py
    for kind in S.KINDS:
        dv, dt = _draws("validation", kind, 50), _draws("test", kind, 50)
        assert {tuple(p["seed"]) for p in dv}.isdisjoint({tuple(p["seed"]) for p in dt})
        assert {p["noise_seed"] for p in dv}.isdisjoint({p["noise_seed"] for p in dt})
        assert all(a != b for a, b in zip(dv, dt))
    for p in _draws("validation", "brain", 20) + _draws("test", "brain", 20):
        # training anatomy: default_rng([0 or 100003, slice]); comparison: 917203/917204
        assert len(p["anatomy_seed"]) == 4 and p["anatomy_seed"][0] not in S.RESERVED_SEEDS.values()
    pv, pt = S.draw_scene_params("validation", 0, "plate"), S.draw_scene_params("test", 0, "plate")
    pt = {**pt, "matrix": pv["matrix"]}  # same grid so the images can be compared
    a, b = S.make_scene(pv, "nist15", "validation", 0), S.make_scene(pt, "nist15", "test", 0)
    assert not np.allclose(a.images, b.images)
    with pytest.raises(ValueError):
        S.draw_scene_params("train", 0, "plate")
    with pytest.raises(ValueError):
        S.draw_scene_params("test", 0, "cube")
    with pytest.raises(ValueError, match="drawn for validation"):
        S.make_scene(pv, "nist15", "test", 0)  # a scene keeps the name of the half it was drawn in


# ------------------------------------------------------------------------------------ parameter ranges
def _binomial_ok(k, n, p, z=4.0):
    return abs(k / n - p) <= z * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("kind", S.KINDS)
def test_common_parameter_ranges_and_frequencies(kind):
    ps = _draws("validation", kind) + _draws("test", kind)
    n = len(ps)
    fov_lo, fov_hi = S.PLATE_FOV_MM if kind == "plate" else S.BRAIN_FOV_MM
    for p in ps:
        assert p["matrix"] in S.MATRIX_CHOICES
        assert fov_lo <= p["fov_mm"] <= fov_hi
        if kind == "plate":
            assert p["fov_mm"] / p["matrix"] <= S.MAX_PIXEL_MM + 1e-12
        b = p["b_field"]
        assert 1.5 <= b["low"] < b["high"] <= 2.0 and b["high"] - b["low"] >= S.B_MIN_SPAN - 1e-12
        assert 15.0 <= p["snr"] <= 100.0 and p["sigma"] == pytest.approx(1.0 / p["snr"])
        assert p["noise"] in ("rician", "ncchi")
        assert (p["n_coils"] == 1) if p["noise"] == "rician" else (8 <= p["n_coils"] <= 32)
        assert p["pe_axis"] in (-2, -1)
    # every option occurs about as often as drawn (4-sigma binomial bounds)
    assert _binomial_ok(sum(p["noise"] == "ncchi" for p in ps), n, S.NCCHI_PROBABILITY)
    assert _binomial_ok(sum(p["echo_train"] for p in ps), n, 0.5)
    assert _binomial_ok(sum(p["pe_axis"] == -1 for p in ps), n, 0.5)
    assert _binomial_ok(sum(p["b_field"]["kind"] == "linear" for p in ps), n, 0.5)
    assert {p["matrix"] for p in ps} == set(S.MATRIX_CHOICES)
    # SNR log-uniform on [15, 100]: log SNR has mean (ln 15 + ln 100) / 2 and std (ln 100 - ln 15) / sqrt(12)
    ls = np.log([p["snr"] for p in ps])
    width = math.log(100) - math.log(15)
    assert abs(ls.mean() - 0.5 * (math.log(15) + math.log(100))) < 4 * width / math.sqrt(12 * n)
    assert abs(ls.std() - width / math.sqrt(12)) < 0.1 * width / math.sqrt(12)
    coils = [p["n_coils"] for p in ps if p["noise"] == "ncchi"]
    assert min(coils) >= 8 and max(coils) <= 32 and len(set(coils)) > 10


def test_plate_parameter_ranges_and_geometry():
    ps = _draws("validation", "plate") + _draws("test", "plate")
    n = len(ps)
    for p in ps:
        assert 10.0 <= p["sphere_diameter_mm"] <= 20.0
        assert p["wall_mm"] == (1.5 if p["walls"] else 0.0)
        assert 1.5 <= p["fill_T1_s"] <= 3.0 and 0.8 * p["fill_T1_s"] <= p["fill_T2_s"] <= 0.95 * p["fill_T1_s"]
        assert len(p["sphere_PD"]) == 14 and all(0.6 <= x <= 1.0 for x in p["sphere_PD"])
        assert 160.0 <= p["body_diameter_mm"] <= min(200.0, p["fov_mm"] - S.BODY_MARGIN_MM) + 1e-9
        c = np.asarray(p["sphere_centres_mm"])
        r_out = 0.5 * p["sphere_diameter_mm"] + p["wall_mm"]
        # spheres (with walls) inside the body and apart from each other
        assert np.all(np.hypot(*c.T) + r_out <= 0.5 * p["body_diameter_mm"] - S.EDGE_GAP_MM + 1e-9)
        d = np.hypot(*(c[:, None] - c[None]).transpose(2, 0, 1))
        assert np.all(d[~np.eye(14, dtype=bool)] >= 2 * r_out + S.SPHERE_GAP_MM - 1e-9)
        # the body, shifted, stays inside the FOV with air around it
        shift = np.hypot(*p["shift_mm"])
        assert shift + 0.5 * p["body_diameter_mm"] <= 0.5 * p["fov_mm"] - 0.5 * S.BODY_MARGIN_MM + 1e-9
        assert sorted(p["slot_of_sphere"]) == list(range(14))
    assert _binomial_ok(sum(p["walls"] for p in ps), n, 0.5)
    assert _binomial_ok(sum(p["layout"] == "rings" for p in ps), n, 0.5)
    # the layout is not the project's twin: sphere 1 is not always at the top, the order is shuffled
    assert len({p["slot_of_sphere"][0] for p in ps}) == 14
    dia = np.array([p["sphere_diameter_mm"] for p in ps])
    assert dia.min() < 11 and dia.max() > 19


def test_brain_parameter_ranges():
    ps = _draws("validation", "brain") + _draws("test", "brain")
    n = len(ps)
    with_lesions = [p for p in ps if p["lesions"]]
    assert _binomial_ok(len(with_lesions), n, S.LESION_PROBABILITY)
    for p in ps:
        assert S.BRAIN_SOURCE_SLICES[0] <= p["source_slice"] <= S.BRAIN_SOURCE_SLICES[1]
        assert (p["lesion_values"] is None) == (not p["lesions"])
    for p in with_lesions:
        assert 1 <= len(p["lesions"]) <= 3
        v = p["lesion_values"]
        assert 1.2 <= v["T1_s"] <= 1.8 and 0.10 <= v["T2_s"] <= 0.20 and 0.75 <= v["PD"] <= 0.90
        assert all(4.0 <= les["radius_mm"] <= 7.0 for les in p["lesions"])
    assert {len(p["lesions"]) for p in with_lesions} == {1, 2, 3}


# ------------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("protocol, field_t", [("paper", 3.0), ("nist15", 1.5)])
def test_inner_roi_is_the_sphere_disk_eroded_by_2px_without_partial_volume(protocol, field_t):
    i, p = _first("validation", "plate", lambda p: p["walls"] and p["matrix"] <= 160)
    s = S.make_scene(p, protocol, "validation", i, noise_free=True)
    prot = get_protocol(protocol)
    ref = reference_values("T1", field_t)
    te = effective_echo_time_s(prot, p["matrix"]) if p["echo_train"] else prot.echo_time_s
    n = p["matrix"]
    dy = p["fov_mm"] / n
    assert s.pixel_spacing_mm == pytest.approx((dy, dy))
    yy, xx = np.mgrid[:n, :n]
    r = 0.5 * p["sphere_diameter_mm"] / dy
    assert set(s.rois) | set(s.params["rendered"]["dropped_rois"]) == {f"sphere {k}" for k in range(1, 15)}
    assert len(s.rois) >= 10
    for k in range(1, 15):
        name = f"sphere {k}"
        if name not in s.rois:
            continue
        roi = s.rois[name]
        assert roi.sum() >= S.MIN_ROI_PX and np.all(s.labels[roi] == k)
        cy = (n - 1) / 2 + (p["shift_mm"][0] + p["sphere_centres_mm"][k - 1][0]) / dy
        cx = (n - 1) / 2 + (p["shift_mm"][1] + p["sphere_centres_mm"][k - 1][1]) / dy
        d = np.hypot(yy - cy, xx - cx)
        # the sphere's disk (radius r px) shrunk by 2 px, up to the pixel grid
        assert np.all(roi[d <= r - 2 - 0.75]) and not np.any(roi[d > r - 2 + 0.75])
        # no partial volume: the sphere's own T1, its PD x exp(-TE/T2), the B field
        assert s.roi_t1_s[name] == ref["T1_s"][k - 1]
        np.testing.assert_allclose(s.truth[0][roi], ref["T1_s"][k - 1], rtol=1e-12)
        np.testing.assert_allclose(s.truth[1][roi], p["sphere_PD"][k - 1] * np.exp(-te / ref["T2_s"][k - 1]),
                                   rtol=1e-12)
    assert np.all(s.truth[2][s.truth_mask] >= p["b_field"]["low"] - 1e-12)
    assert np.all(s.truth[2][s.truth_mask] <= p["b_field"]["high"] + 1e-12)
    # walls carry no signal: there is a ring of PD 0 between every sphere and the fill
    assert np.sum(s.mask & ~s.truth_mask) > 0


@pytest.mark.parametrize("protocol", ["paper", "nist15"])
def test_noiseless_plate_without_echo_train_is_the_signal_model_of_the_truth(protocol):
    i, p = _first("test", "plate", lambda p: p["matrix"] == 128)
    p = {**p, "echo_train": False}
    s = S.make_scene(p, protocol, "test", i, noise_free=True)
    assert s.sigma == 0.0 and math.isinf(s.snr) and not s.echo_train_applied
    model = signal(s.truth, s.protocol, dim=0).numpy()
    roi = np.any(np.stack(list(s.rois.values())), axis=0)
    np.testing.assert_allclose(s.images[:, roi], model[:, roi], rtol=1e-10, atol=1e-12)
    # the finite TR matters: the full-recovery model (TR -> inf) of the same truth differs
    from dataclasses import replace
    full = signal(s.truth, replace(s.protocol, repetition_time_s=None), dim=0).numpy()
    assert np.max(np.abs(full[:, roi] - s.images[:, roi])) > 1e-3


def test_brain_scene_rois_lesions_and_signal_model():
    i, p = _first("validation", "brain", lambda p: len(p["lesions"]) >= 1 and p["matrix"] <= 192)
    p = {**p, "echo_train": False}
    s = S.make_scene(p, "paper", "validation", i, noise_free=True)
    assert {"WM", "GM", "CSF", "lesion"} <= set(s.rois)
    assert all(s.params["rendered"]["lesions_placed"][k]["placed"] for k in range(len(p["lesions"])))
    for name, roi in s.rois.items():
        assert roi.sum() >= S.MIN_ROI_PX and np.all(s.mask[roi])
        assert s.roi_t1_s[name] == pytest.approx(float(np.median(s.truth[0][roi])))
    rois = list(s.rois.values())
    assert not np.any(np.sum(rois, axis=0) > 1)  # disjoint
    v = p["lesion_values"]
    te = s.protocol.echo_time_s
    np.testing.assert_allclose(s.truth[0][s.rois["lesion"]], v["T1_s"], rtol=1e-12)
    np.testing.assert_allclose(s.truth[1][s.rois["lesion"]], v["PD"] * math.exp(-te / v["T2_s"]), rtol=1e-12)
    # tissue T1 in the 3 T table's ranges (+-10 % variation, 10 % other tissue at most)
    assert 0.8 * 0.8 <= s.roi_t1_s["WM"] <= 1.5 * 1.1 and 1.2 * 0.9 <= s.roi_t1_s["GM"] <= 2.0 * 1.1
    assert s.roi_t1_s["CSF"] > 2.0
    model = signal(s.truth, s.protocol, dim=0).numpy()
    m = s.truth_mask
    np.testing.assert_allclose(s.images[:, m], model[:, m], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------- noise
def _background(p, protocol, split, index):
    """Noisy and noiseless renders, and the pixels where the noiseless image is 0 at every TI."""
    noisy = S.make_scene(p, protocol, split, index)
    clean = S.make_scene(p, protocol, split, index, noise_free=True)
    bg = np.all(clean.images == 0, axis=0) & ~noisy.mask
    return noisy, bg


def test_rician_background_has_the_rayleigh_mean():
    i, p = _first("test", "plate", lambda p: p["noise"] == "rician" and p["matrix"] <= 160)
    p = {**p, "echo_train": False}
    s, bg = _background(p, "paper", "test", i)
    y = s.images[:, bg]
    m = y.size
    assert m > 20000
    sigma = s.sigma
    assert s.n_coils == 1 and s.snr == pytest.approx(1 / sigma)
    mean, se = sigma * math.sqrt(math.pi / 2), sigma * math.sqrt((4 - math.pi) / 2) / math.sqrt(m)
    assert abs(y.mean() - mean) < 4 * se
    # E[y^2] = 2 sigma^2 (std of y^2 = 2 sigma^2 for an exponential)
    assert abs((y**2).mean() - 2 * sigma**2) < 4 * 2 * sigma**2 / math.sqrt(m)


def test_ncchi_background_has_the_chi_mean():
    i, p = _first("validation", "plate", lambda p: p["noise"] == "ncchi" and p["matrix"] <= 160)
    s, bg = _background(p, "nist15", "validation", i)  # a spin echo: no echo train
    n, sigma = s.n_coils, s.sigma
    assert s.noise == "ncchi" and 8 <= n <= 32
    y = s.images[:, bg]
    m = y.size
    # y = sigma chi_{2n}: mean sigma sqrt(2) Gamma(n + 1/2) / Gamma(n), E[y^2] = 2 n sigma^2
    mean = sigma * math.sqrt(2) * math.exp(special.gammaln(n + 0.5) - special.gammaln(n))
    var = 2 * n * sigma**2 - mean**2
    assert abs(y.mean() - mean) < 4 * math.sqrt(var / m)
    assert abs(y.mean() - sigma * math.sqrt(math.pi / 2)) > 20 * math.sqrt(var / m)  # not Rayleigh
    assert abs((y**2).mean() / (2 * n * sigma**2) - 1) < 4 * math.sqrt(1 / (n * m))


def test_robustness_scenes_order_names_and_shared_params():
    scenes = S.robustness_scenes("validation", n_plates=2, n_brains=0, protocols=("paper", "nist15"))
    assert [(s.kind, s.index, s.params["rendered"]["protocol"]) for s in scenes] == [
        ("plate", 0, "paper"), ("plate", 0, "nist15"), ("plate", 1, "paper"), ("plate", 1, "nist15")]
    assert len({s.name for s in scenes}) == 4 and scenes[0].name == "validation plate 0 (paper)"
    a, b = scenes[0], scenes[1]
    assert {k: v for k, v in a.params.items() if k != "rendered"} == {k: v for k, v in b.params.items()
                                                                     if k != "rendered"}
    assert a.images.shape[0] == 7 and b.images.shape[0] == 6
    # the sphere T1s follow the protocol's field strength
    assert a.roi_t1_s["sphere 1"] == reference_values("T1", 3.0)["T1_s"][0]
    assert b.roi_t1_s["sphere 1"] == reference_values("T1", 1.5)["T1_s"][0]
