"""Tissue parameter distributions and random T1/T2/PD maps."""

import numpy as np
import pytest

from custom_components.data import anatomy as A
from custom_components.data import tissues as T
from custom_components.data.anatomy import N_TISSUES, Tissue

TOL = T.Variation().max_rel_deviation  # within-tissue variation is clipped to this (relative)


@pytest.fixture(scope="module")
def mni_slices():
    n = A.n_source_slices()
    return [A.sample_slice(seed, index) for seed, index in enumerate((n // 6, n // 3, n // 2, 2 * n // 3, 5 * n // 6))]


def _blocks(shape=(60, 64)) -> np.ndarray:
    """Labels with a block of every tissue (no partial volume)."""
    labels = np.zeros(shape, dtype=np.int64)
    w = shape[1] // N_TISSUES
    for t in Tissue:
        labels[8:-8, t * w:(t + 1) * w] = t
    return labels


def test_table_covers_every_tissue_in_seconds():
    p = T.TISSUE_PARAMETERS_3T
    assert set(p) == set(Tissue)
    assert p[Tissue.WM].t1_s == (0.80, 1.50) and p[Tissue.GM].t1_s == (1.20, 2.00)
    assert p[Tissue.CSF].t1_s == (3.00, 4.50) and p[Tissue.FAT].t1_s == (0.30, 0.50)
    assert p[Tissue.MUSCLE].t1_s == (1.20, 1.50) and p[Tissue.BLOOD].t1_s == (1.60, 2.10)
    assert p[Tissue.WM].t2_s == (0.060, 0.100) and p[Tissue.CSF].t2_s == (1.3, 2.0)
    assert p[Tissue.BACKGROUND].pd == (0.0, 0.0) and p[Tissue.BONE].pd[1] <= 0.05
    for t, q in p.items():
        assert q.t1_s[1] < 10 and q.t2_s[1] <= q.t1_s[0], t  # seconds, T2 < T1
        assert 0 <= q.pd[0] <= q.pd[1] <= 1
        if q.t1_typical_s is not None:
            assert q.t1_s[0] <= q.t1_typical_s <= q.t1_s[1]
    with pytest.raises(ValueError):
        T.TissueParameters((1.0, 0.5), (0.1, 0.1), (0.5, 0.5))


def test_maps_format_and_determinism(mni_slices):
    s = mni_slices[2]
    a, b, c = (T.sample_parameter_maps(s, seed) for seed in (5, 5, 6))
    for key in ("T1", "T2", "PD"):
        assert a[key].shape == (240, 240) and a[key].dtype == np.float32
        np.testing.assert_array_equal(a[key], b[key])
        assert np.isfinite(a[key]).all()
    assert a["mask"].dtype == bool and a["mask"].shape == (240, 240)
    both = a["mask"] & c["mask"]
    assert both.sum() > 10000 and not np.allclose(a["T1"][both], c["T1"][both])
    assert a["objects"] == []


def test_sampled_t1_stays_in_documented_ranges():
    labels = _blocks()
    for seed in range(12):
        m = T.sample_parameter_maps(labels, seed)
        for t in (Tissue.WM, Tissue.GM, Tissue.CSF, Tissue.FAT, Tissue.MUSCLE, Tissue.BLOOD):
            p = T.TISSUE_PARAMETERS_3T[t]
            t1, t2, pd = m["T1"][labels == t], m["T2"][labels == t], m["PD"][labels == t]
            assert p.t1_s[0] <= m["means"][t][0] <= p.t1_s[1]
            assert t1.min() >= p.t1_s[0] * (1 - TOL) - 1e-6 and t1.max() <= p.t1_s[1] * (1 + TOL) + 1e-6, t
            assert t2.min() >= p.t2_s[0] * (1 - TOL) - 1e-6 and t2.max() <= p.t2_s[1] * (1 + TOL) + 1e-6, t
            assert pd.min() >= p.pd[0] * (1 - TOL) - 1e-6 and pd.max() <= min(1.0, p.pd[1] * (1 + TOL)) + 1e-6, t
            # spatial variation exists but is a few per cent
            assert 0.003 < t1.std() / t1.mean() < 0.06
        bg = labels == Tissue.BACKGROUND
        assert (m["PD"][bg] == 0).all() and not m["mask"][bg].any()
        np.testing.assert_allclose(m["T1"][bg], 1.0)
        assert not m["mask"][labels == Tissue.BONE].any()  # apparent PD <= 0.05


def test_partial_volume_mixes_pd_linearly_and_rates_by_magnetisation():
    f = np.zeros((N_TISSUES, 4, 4), dtype=np.float32)
    f[Tissue.WM] = 0.7
    f[Tissue.CSF] = 0.3
    still = T.Variation(smooth_rel_std=0.0, texture_rel_std=0.0)
    m = T.sample_parameter_maps(f, 1, variation=still)
    (t1w, t2w, pdw), (t1c, t2c, pdc) = m["means"][Tissue.WM], m["means"][Tissue.CSF]
    pd = 0.7 * pdw + 0.3 * pdc
    np.testing.assert_allclose(m["PD"], pd, rtol=1e-5)
    np.testing.assert_allclose(m["T1"], pd / (0.7 * pdw / t1w + 0.3 * pdc / t1c), rtol=1e-5)
    np.testing.assert_allclose(m["T2"], pd / (0.7 * pdw / t2w + 0.3 * pdc / t2c), rtol=1e-5)
    assert t1w < m["T1"][0, 0] < t1c


def test_default_maps_have_no_short_t1_but_wide_maps_do(mni_slices):
    default_t1, wide_t1, wide_n = [], [], 0
    for i, s in enumerate(mni_slices):
        m = T.sample_parameter_maps(s, 100 + i)
        default_t1.append(m["T1"][m["mask"]])
        w = T.sample_parameter_maps(s, 200 + i, wide_t1=True)
        wide_t1.append(w["T1"][w["mask"]])
        wide_n += len(w["objects"])
        assert (w["T2"] <= w["T1"] * (1 + 1e-5)).all()
        assert w["PD"].min() >= 0 and w["PD"].max() <= 1 + 1e-6
        assert all(0.02 <= o["T1_s"] <= 4.5 and o["T2_s"] < o["T1_s"] for o in w["objects"])
    default_t1, wide_t1 = np.concatenate(default_t1), np.concatenate(wide_t1)
    assert default_t1.min() >= 0.25
    assert (wide_t1 < 0.1).mean() > 0.002
    assert wide_t1.min() < 0.05 and wide_t1.max() > 3.0
    assert wide_n >= 2 * len(mni_slices)
    # a wider spread, not only a tail: log-T1 coverage of 0.05-0.5 s grows
    edges = np.array([0.05, 0.5])
    wide_share = T.t1_histogram_coverage(wide_t1, edges_s=edges)[1][0]
    assert wide_share > T.t1_histogram_coverage(default_t1, edges_s=edges)[1][0]


def test_realisations_differ_and_are_reproducible(mni_slices):
    s = mni_slices[1]
    r1 = T.sample_realisations(s, 3, n=4)
    r2 = T.sample_realisations(s, 3, n=4)
    assert len(r1) == 4
    for a, b in zip(r1, r2):
        np.testing.assert_array_equal(a["T1"], b["T1"])
    wm = s["labels"] == Tissue.WM
    means = [np.median(r["T1"][wm]) for r in r1]
    assert len(set(np.round(means, 4))) == 4


def test_inputs_labels_fractions_and_slice_dicts_agree(mni_slices):
    s = mni_slices[0]
    from_dict = T.sample_parameter_maps(s, 9)
    from_probs = T.sample_parameter_maps(s["probs"], 9)
    np.testing.assert_array_equal(from_dict["T1"], from_probs["T1"])
    from_labels = T.sample_parameter_maps(s["labels"], 9)
    pure = (s["probs"].max(axis=0) > 0.999) & from_dict["mask"]
    np.testing.assert_allclose(from_labels["T1"][pure], from_dict["T1"][pure], rtol=1e-3)
    with pytest.raises(ValueError):
        T.sample_parameter_maps(np.zeros((3, 4, 4)), 0)
    with pytest.raises(ValueError):
        T.sample_parameter_maps(np.full((4, 4), 9), 0)


def test_t1_histogram_coverage_sums_to_one():
    edges, frac = T.t1_histogram_coverage([np.full((4, 4), 0.5), np.full((4, 4), 2.0)])
    assert frac.sum() == pytest.approx(1.0) and len(edges) == len(frac) + 1
    assert frac[np.searchsorted(edges, 0.5, side="right") - 1] == pytest.approx(0.5)
