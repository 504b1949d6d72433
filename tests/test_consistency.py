"""Physics consistency of maps with their images (no ground truth): re-synthesis, residual, chi-square flag."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.cli import main
from custom_components.mapping.consistency import (flag_threshold, residual_chi2, residual_flag, residual_rms,
                                           resynthesize)
from custom_components.physics.image_formation import add_rician_noise
from custom_components.io import IRSeries, save_series
from custom_components.mapping import (MappingResult, add_consistency_maps, map_series, output_arrays,
                                       sidecars_for)
from custom_components.physics.protocol import get_protocol
from custom_components.physics.signal_model import signed_signal

N_MC = 20000


def _true_maps(rng, n=N_MC, lo=0.2, hi=3.0):
    """T1 log-uniform in [lo, hi] s, PD 1, B 2 (ideal inversion)."""
    t1 = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    return t1, np.ones(n), np.full(n, 2.0)


def _rician(t1, pd, b, protocol, sigma, seed):
    """Magnitude of the signed signal plus complex Gaussian noise of std sigma per channel (one coil)."""
    s = signed_signal(torch.from_numpy(np.stack([t1, pd, b], axis=-1)), protocol, dim=-1)
    return add_rician_noise(s, sigma, torch.Generator().manual_seed(seed)).numpy()


def _se(p, n):
    return np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("name", ["paper", "nist15", "full_recovery"])
def test_noiseless_images_of_the_maps_have_zero_residual_and_no_flag(name, rng):
    p = get_protocol("paper").with_(repetition_time_s=None) if name == "full_recovery" else get_protocol(name)
    t1, pd, b = _true_maps(rng, 2000)
    pd = pd * rng.uniform(0.5, 2.0, t1.shape)
    b = rng.uniform(1.7, 2.0, t1.shape)
    img = resynthesize(t1, pd, b, p)
    assert img.shape == (2000, p.n_images) and np.all(img >= 0)
    np.testing.assert_allclose(img, np.abs(signed_signal(torch.from_numpy(np.stack([t1, pd, b], -1)), p, dim=-1).numpy()))
    assert np.max(residual_rms(img, t1, pd, b, p)) < 1e-12
    # with a noise level: E|S| is the Rician mean, within a fraction of sigma of |S|: no flag
    assert not residual_flag(img, t1, pd, b, p, sigma=0.02).any()
    # maps of any shape: (X, Y, Z) maps with (X, Y, Z, N) data
    shaped = [x.reshape(10, 20, 10) for x in (t1, pd, b)]
    assert residual_rms(img.reshape(10, 20, 10, -1), *shaped, p).shape == (10, 20, 10)


def test_non_finite_maps_give_nan_residual_and_a_flag():
    p = get_protocol("paper")
    t1, pd, b = np.array([1.0, np.nan, 1.0, np.inf]), np.array([1.0, 1.0, np.nan, 1.0]), np.full(4, 2.0)
    img = resynthesize(np.ones(4), np.ones(4), b, p)
    r = residual_rms(img, t1, pd, b, p)
    assert r[0] < 1e-12 and np.all(np.isnan(r[1:]))
    assert np.isnan(residual_rms(img, t1, pd, b, p, sigma=0.02)[1:]).all()
    np.testing.assert_array_equal(residual_flag(img, t1, pd, b, p, 0.02), [False, True, True, True])


@pytest.mark.parametrize("name", ["paper", "nist15"])
def test_false_alarm_rate_is_alpha_with_the_true_maps(name, rng):
    p = get_protocol(name)
    alpha, sigma = 0.01, 0.02
    t1, pd, b = _true_maps(rng)
    # Gaussian noise on the magnitude: X^2 is exactly chi-square(N)
    gauss = resynthesize(t1, pd, b, p) + sigma * rng.standard_normal((N_MC, p.n_images))
    x2 = residual_chi2(gauss, t1, pd, b, p, sigma, noise="gaussian")
    assert np.mean(x2) == pytest.approx(p.n_images, rel=0.02)  # E chi2(N) = N
    frac = residual_flag(gauss, t1, pd, b, p, sigma, alpha=alpha, noise="gaussian").mean()
    print(f"{name}: Gaussian noise SNR 50, flagged fraction {frac:.5f} (alpha {alpha})")
    assert abs(frac - alpha) < 4 * _se(alpha, N_MC)
    # Rician magnitude data (one coil), SNR 50: near the nulls the noise is not Gaussian, the rate stays below 2 alpha
    ric = _rician(t1, pd, b, p, sigma, seed=3)
    frac_r = residual_flag(ric, t1, pd, b, p, sigma, alpha=alpha).mean()
    print(f"{name}: Rician noise SNR 50, flagged fraction {frac_r:.5f} (alpha {alpha})")
    assert 0.5 * alpha < frac_r < 2 * alpha


def test_residual_rms_of_the_true_maps_is_the_noise_level(rng):
    p = get_protocol("paper")
    sigma = 0.02
    t1, pd, b = _true_maps(rng)
    data = resynthesize(t1, pd, b, p) + sigma * rng.standard_normal((N_MC, p.n_images))
    r = residual_rms(data, t1, pd, b, p)
    assert r.shape == (N_MC,)
    assert np.mean(r**2) == pytest.approx(sigma**2, rel=0.03)


@pytest.mark.parametrize("factor", [1.4, 0.6])
def test_t1_wrong_by_40_percent_is_flagged(factor, rng):
    p = get_protocol("paper")
    sigma = 1 / 50
    t1, pd, b = _true_maps(rng, lo=0.3, hi=1.5)
    data = _rician(t1, pd, b, p, sigma, seed=4)
    frac = residual_flag(data, t1 * factor, pd, b, p, sigma).mean()
    print(f"T1 x {factor}: flagged fraction {frac:.4f}")
    assert frac > 0.9
    # the residual says the same in data units: several sigma
    assert np.median(residual_rms(data, t1 * factor, pd, b, p, sigma=sigma)) > 3 * sigma


def _best_pd_b(t1_s, y_signed, protocol):
    """PD, B minimising the signed-signal misfit for a fixed (wrong) T1: s = PD f1 + PD B f2 is linear."""
    f1 = signed_signal(torch.tensor([t1_s, 1.0, 0.0], dtype=torch.float64), protocol).numpy()
    f2 = signed_signal(torch.tensor([t1_s, 1.0, 1.0], dtype=torch.float64), protocol).numpy() - f1
    a, c = np.linalg.lstsq(np.stack([f1, f2], axis=1), y_signed, rcond=None)[0]
    return a, c / a


def test_the_flag_cannot_see_what_the_data_cannot_distinguish():
    """T1 40 % too long with PD and B adjusted: invisible with TIs <= 0.8 s and T1 = 3 s (nist15),
    flagged where the TIs sample the recovery (paper protocol, T1 = 1 s)."""
    alpha, sigma, n = 0.01, 0.02, 5000
    for name, t1_true, expect_flag in (("nist15", 3.0, False), ("paper", 1.0, True)):
        p = get_protocol(name)
        y = signed_signal(torch.tensor([t1_true, 1.0, 2.0], dtype=torch.float64), p).numpy()
        pd_w, b_w = _best_pd_b(1.4 * t1_true, y, p)
        ones = np.ones(n)
        data = _rician(t1_true * ones, ones, 2 * ones, p, sigma, seed=5)
        frac = residual_flag(data, 1.4 * t1_true * ones, pd_w * ones, b_w * ones, p, sigma, alpha=alpha).mean()
        if expect_flag:
            assert frac > 0.9
        else:
            assert frac < 2 * alpha


def test_threshold_is_the_chi_square_quantile():
    from scipy.stats import chi2

    assert flag_threshold(7, 1e-3) == pytest.approx(chi2.ppf(0.999, 7))
    with pytest.raises(ValueError):
        flag_threshold(7, 0.0)
    p = get_protocol("paper")
    with pytest.raises(ValueError):
        residual_flag(np.zeros((2, 7)), np.ones(2), np.ones(2), np.ones(2), p, sigma=0.0)
    with pytest.raises(ValueError):
        residual_rms(np.zeros((2, 6)), np.ones(2), np.ones(2), np.ones(2), p)


# ------------------------------------------------------------------------------ mapping integration
def _phantom(shape=(20, 20, 2), sigma=0.02, t1=0.8, seed=0):
    """IR series (X, Y, Z, N): a square of T1 ``t1`` s, PD 1, B 1.95 in a signal-free border, Rician noise."""
    p = get_protocol("paper")
    pd = np.zeros(shape)
    pd[4:-4, 4:-4] = 1.0
    t1m, bm = np.full(shape, t1), np.full(shape, 1.95)
    data = _rician(t1m.ravel(), pd.ravel(), bm.ravel(), p, sigma, seed).reshape(*shape, p.n_images)
    return IRSeries(data=data, affine=np.eye(4), protocol=p, source="phantom"), (t1m, pd, bm)


def test_map_series_adds_the_flag_to_the_classical_fit_and_keeps_its_residual():
    series, _ = _phantom()
    res = map_series(series, method="mle", progress=False)
    assert set(res.maps) == {"T1", "PD", "B", "residual", "flag"}
    flag = res.maps["flag"]
    assert flag.shape == series.data.shape[:-1] and flag.dtype == np.float32
    assert set(np.unique(flag)) <= {0.0, 1.0} and np.all(flag[~res.mask] == 0)
    assert res.info["flag_alpha"] == 1e-3 and 0 <= res.info["flagged_fraction"] < 0.02
    # the classical fit's own residual (|model| - data over the fitted voxels) is kept
    from custom_components.methods.fitting import InversionRecoveryModel

    fit = InversionRecoveryModel(series.protocol).fit(series.data, mask=res.mask, noise="rician", sigma=res.info["sigma"])
    np.testing.assert_allclose(res.maps["residual"], fit.residual)
    names = set(output_arrays(res))
    assert names == {"T1map", "PDmap", "InvEffmap", "Residualmap", "ResidualFlag"}
    side = sidecars_for(res, series, "mle")
    assert side["ResidualFlag"]["Units"] == "1" and side["ResidualFlag"]["Fit"]["flag_alpha"] == 1e-3


def test_consistency_maps_for_a_method_without_a_residual():
    """A learned-method stand-in: maps by hand, no "residual"; right maps pass, T1 40 % off is flagged."""
    series, (t1, pd, b) = _phantom()
    mask = pd > 0
    for factor, flagged in ((1.0, False), (1.4, True)):
        maps = {k: np.where(mask, v, 0).astype(np.float32) for k, v in (("T1", factor * t1), ("PD", pd), ("B", b))}
        res = add_consistency_maps(MappingResult(maps=maps, mask=mask, info={"method": "standin"}), series)
        for key in ("residual", "flag"):
            assert res.maps[key].shape == mask.shape and np.all(res.maps[key][~mask] == 0)
        r = res.maps["residual"][mask]
        sigma = res.info["flag_sigma"]
        assert sigma == pytest.approx(0.02, rel=0.1)  # estimated from the background
        if flagged:
            assert res.info["flagged_fraction"] > 0.9 and np.median(r) > 3 * sigma
        else:
            assert res.info["flagged_fraction"] < 0.02 and np.median(r) == pytest.approx(sigma, rel=0.3)
    # too few voxels to find a background and no sigma: residual only, and a note why there is no flag
    crop = (slice(7, 13), slice(7, 13), slice(0, 1))
    small = IRSeries(data=series.data[crop], affine=np.eye(4), protocol=series.protocol, source="crop")
    m = np.ones(small.data.shape[:-1], bool)
    res = add_consistency_maps(MappingResult(maps={k: maps[k][crop] for k in ("T1", "PD", "B")}, mask=m), small)
    assert "residual" in res.maps and "flag" not in res.maps and "flag_note" in res.info
    # a given sigma makes the flag
    res = add_consistency_maps(MappingResult(maps={k: maps[k][crop] for k in ("T1", "PD", "B")}, mask=m), small, sigma=0.02)
    assert res.maps["flag"].shape == m.shape and res.info["flagged_fraction"] > 0.9


def test_qmri_map_writes_the_residual_and_the_flag(tmp_path):
    series, _ = _phantom(shape=(20, 20, 1))
    src = tmp_path / "ir.nii.gz"
    save_series(src, series.data, np.eye(4), series.protocol)
    out = tmp_path / "maps"
    assert main(["map", str(src), "--out", str(out), "--method", "mle", "--quiet"]) == 0
    for stem in ("Residualmap", "ResidualFlag"):
        assert (out / f"{stem}.nii.gz").exists() and (out / f"{stem}.json").exists()
    flag = nib.load(out / "ResidualFlag.nii.gz").get_fdata()
    t1 = nib.load(out / "T1map.nii.gz").get_fdata()
    assert flag.shape == (20, 20, 1) and set(np.unique(flag)) <= {0.0, 1.0}
    assert np.all(flag[t1 == 0] == 0) and flag[t1 > 0].mean() < 0.02
    side = json.loads((out / "ResidualFlag.json").read_text())
    assert side["Units"] == "1" and side["Method"] == "mle" and "flagged_fraction" in side["Fit"]
