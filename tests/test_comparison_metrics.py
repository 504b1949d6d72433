"""Known-answer tests of custom_components.reporting.map_metrics."""

import numpy as np
import pytest
from scipy import ndimage, stats

from custom_components.reporting import map_metrics as mm


def _structured(rng, shape=(64, 64)):
    """A smooth positive map (T1-like, seconds) with structure on the SSIM window scale."""
    return 1.0 + 0.5 * ndimage.gaussian_filter(rng.standard_normal(shape), 3.0) / 0.1


# --- input checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b, m: mm.nrmse(a, b, m),
        lambda a, b, m: mm.ssim(a, b, m, data_range=1.0),
        lambda a, b, m: mm.tissue_bias(a, b, np.ones(m.shape, int), {1: "wm"}, mask=m),
        lambda a, b, m: mm.coverage(a, b, np.ones(m.shape), m),
        lambda a, b, m: mm.std_error_correlation(a, b, m),
        lambda a, b, m: mm.detection_auc(a, b > 0, m),
        lambda a, b, m: mm.detection_rates(a > 0, b > 0, m),
        lambda a, b, m: mm.calibration_factor(a, b, np.ones(m.shape), m),
        lambda a, b, m: mm.roi_mean_std(a, m),
    ],
)
def test_shape_mismatch_and_empty_mask_raise(call):
    a, b = np.ones((8, 8)), np.ones((8, 8))
    m = np.ones((8, 8), bool)
    with pytest.raises(ValueError, match="shape") as exc:
        call(a, b, np.ones((8, 9), bool))
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="no voxel") as exc:
        call(a, b, np.zeros_like(m))
    assert "\n" not in str(exc.value)


def test_pred_truth_shape_mismatch_raises():
    m = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        mm.nrmse(np.ones((4, 5)), np.ones((4, 4)), m)


# --- nrmse ------------------------------------------------------------------------------------


def test_nrmse_known_answer_ignores_outside_mask():
    truth = np.array([[3.0, 4.0, 1.0]])
    pred = np.array([[3.0, 5.0, 100.0]])
    mask = np.array([[True, True, False]])
    assert mm.nrmse(pred, truth, mask) == pytest.approx(1.0 / 5.0)
    assert mm.nrmse(truth, truth, mask) == 0.0


# --- ssim -------------------------------------------------------------------------------------


def test_ssim_identity_is_one(rng):
    x = _structured(rng)
    mask = np.zeros(x.shape, bool)
    mask[8:56, 10:50] = True
    assert mm.ssim(x, x, mask) == pytest.approx(1.0, abs=1e-12)


def test_ssim_symmetric(rng):
    x = _structured(rng)
    y = x + 0.1 * rng.standard_normal(x.shape)
    mask = np.zeros(x.shape, bool)
    mask[5:60, 5:60] = True
    assert mm.ssim(x, y, mask, data_range=2.0) == pytest.approx(mm.ssim(y, x, mask, data_range=2.0), rel=1e-12)


def test_ssim_decreases_with_noise_and_offset(rng):
    x = _structured(rng)
    mask = np.zeros(x.shape, bool)
    mask[8:56, 8:56] = True
    noise = rng.standard_normal(x.shape)
    noisy = [mm.ssim(x + s * noise, x, mask) for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)]
    assert noisy[0] == pytest.approx(1.0)
    assert np.all(np.diff(noisy) < 0)
    offset = [mm.ssim(x + c, x, mask) for c in (0.0, 0.05, 0.1, 0.3, 1.0)]
    assert np.all(np.diff(offset) < 0)


def test_ssim_luminance_closed_form_for_constant_offset(rng):
    mu, c = 1.2, 0.3
    truth = np.zeros((64, 64))
    truth[8:56, 8:56] = 0.8 + 0.6 * rng.random((48, 48))
    truth[20:44, 20:44] = mu  # uniform patch; window radius is int(3.5*1.5+0.5) = 5 px
    mask = np.zeros(truth.shape, bool)
    mask[8:56, 8:56] = True
    pred = truth + c
    smap = mm.ssim_map(pred, truth, mask)
    L = truth[mask].max() - truth[mask].min()
    c1 = (0.01 * L) ** 2
    expected = (2 * mu * (mu + c) + c1) / (mu**2 + (mu + c) ** 2 + c1)
    assert smap[32, 32] == pytest.approx(expected, rel=1e-9)
    assert smap[26, 38] == pytest.approx(expected, rel=1e-9)  # still >= 5 px inside the patch
    assert mm.ssim(pred, truth, mask) < 1.0


def test_ssim_3d_is_per_slice_along_last_axis(rng):
    vol = np.stack([_structured(rng, (40, 40)) for _ in range(3)], axis=-1)
    pred = vol + 0.1 * rng.standard_normal(vol.shape)
    mask = np.zeros(vol.shape, bool)
    mask[5:35, 5:35, :] = True
    smap = mm.ssim_map(pred, vol, mask, data_range=1.5)
    for k in range(3):
        s2 = mm.ssim_map(pred[..., k], vol[..., k], mask[..., k], data_range=1.5)
        np.testing.assert_allclose(smap[..., k], s2, rtol=1e-12, atol=1e-14)


def test_ssim_background_is_zeroed(rng):
    x = _structured(rng)
    mask = np.zeros(x.shape, bool)
    mask[16:48, 16:48] = True
    junk = x.copy()
    junk[~mask] = 1e3 * rng.standard_normal(int((~mask).sum()))
    assert mm.ssim(junk, x, mask) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_truth_needs_data_range():
    x = np.ones((32, 32))
    mask = np.ones(x.shape, bool)
    with pytest.raises(ValueError, match="data_range"):
        mm.ssim(x, x, mask)
    assert mm.ssim(x, x, mask, data_range=1.0) == pytest.approx(1.0)


# --- tissue bias ------------------------------------------------------------------------------


def test_tissue_bias_known_answer():
    labels = np.array([[1, 1, 2, 2, 0]])
    truth = np.array([[1.0, 1.0, 2.0, 2.0, 5.0]])
    pred = np.array([[1.1, 1.3, 1.8, 1.8, 9.0]])
    out = mm.tissue_bias(pred, truth, labels, {1: "WM", 2: "GM", 3: "CSF"})
    assert out["WM"]["n"] == 2 and out["GM"]["n"] == 2
    assert out["WM"]["mean_truth"] == pytest.approx(1.0)
    assert out["WM"]["mean_pred"] == pytest.approx(1.2)
    assert out["WM"]["bias"] == pytest.approx(0.2)
    assert out["WM"]["bias_percent"] == pytest.approx(20.0)
    assert out["GM"]["bias"] == pytest.approx(-0.2)
    assert out["GM"]["bias_percent"] == pytest.approx(-10.0)
    assert out["CSF"]["n"] == 0 and np.isnan(out["CSF"]["bias"])
    masked = mm.tissue_bias(pred, truth, labels, {1: "WM"}, mask=np.array([[True, False, True, True, True]]))
    assert masked["WM"]["n"] == 1 and masked["WM"]["bias"] == pytest.approx(0.1)


# --- coverage and calibration -----------------------------------------------------------------


def _gaussian_estimate(rng, s=0.05, n=100_000):
    truth = rng.uniform(0.5, 2.0, size=(100, n // 100))
    mean = truth + s * rng.standard_normal(truth.shape)
    return truth, mean, np.ones(truth.shape, bool)


def test_coverage_monte_carlo(rng):
    s = 0.05
    truth, mean, mask = _gaussian_estimate(rng, s)
    cov = mm.coverage(truth, mean, np.full(truth.shape, s), mask)
    assert set(cov) == {1.0, 2.0}
    assert cov[1.0] == pytest.approx(0.683, abs=0.01)
    assert cov[2.0] == pytest.approx(0.954, abs=0.01)
    half = mm.coverage(truth, mean, np.full(truth.shape, s / 2), mask)
    assert half[1.0] == pytest.approx(0.383, abs=0.01)
    assert half[2.0] == pytest.approx(0.683, abs=0.01)


def test_coverage_known_answer():
    truth = np.zeros((1, 4))
    mean = np.array([[0.5, 1.0, 1.5, 3.0]])
    cov = mm.coverage(truth, mean, np.ones((1, 4)), np.ones((1, 4), bool), k=(1.0, 2.0, 3.0))
    assert cov == {1.0: 0.5, 2.0: 0.75, 3.0: 1.0}


def test_calibration_factor(rng):
    s = 0.05
    truth, mean, mask = _gaussian_estimate(rng, s)
    assert mm.calibration_factor(truth, mean, np.full(truth.shape, s / 2), mask) == pytest.approx(2.0, abs=0.03)
    assert mm.calibration_factor(truth, mean, np.full(truth.shape, s), mask) == pytest.approx(1.0, abs=0.015)
    std = np.full(truth.shape, s / 2)
    std[:, :10] = 0.0  # ignored
    std[:, 10:20] = np.nan  # ignored
    f = mm.calibration_factor(truth, mean, std, mask, target=0.954)
    assert f == pytest.approx(4.0, abs=0.1)


def test_calibration_factor_known_quantile():
    z = np.array([[0.5, 1.0, 2.0, 4.0, 8.0]])
    f = mm.calibration_factor(np.zeros_like(z), z, np.ones_like(z), np.ones(z.shape, bool), target=0.5)
    assert f == pytest.approx(2.0)
    with pytest.raises(ValueError, match="target"):
        mm.calibration_factor(np.zeros_like(z), z, np.ones_like(z), np.ones(z.shape, bool), target=1.5)


# --- std / error correlation ------------------------------------------------------------------


def test_std_error_correlation(rng):
    std = rng.uniform(0.01, 0.2, size=(200, 100))
    mask = np.ones(std.shape, bool)
    mono = mm.std_error_correlation(std, np.exp(30 * std), mask)
    assert mono["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert 0.8 < mono["pearson"] < 1.0
    indep = mm.std_error_correlation(std, rng.random(std.shape), mask)
    assert abs(indep["spearman"]) < 0.02 and abs(indep["pearson"]) < 0.02


def test_std_error_correlation_ties_match_scipy():
    std = np.array([[1.0, 2.0, 2.0, 3.0, 5.0, 5.0]])
    err = np.array([[1.0, 2.0, 3.0, 4.0, 4.0, 0.5]])
    out = mm.std_error_correlation(std, err, np.ones(std.shape, bool))
    assert out["spearman"] == pytest.approx(stats.spearmanr(std.ravel(), err.ravel()).statistic)
    assert out["pearson"] == pytest.approx(stats.pearsonr(std.ravel(), err.ravel()).statistic)


# --- detection --------------------------------------------------------------------------------


def test_detection_auc_perfect_reversed_random(rng):
    is_bad = rng.random((100, 100)) < 0.1
    mask = np.ones(is_bad.shape, bool)
    perfect = is_bad + 0.01 * rng.random(is_bad.shape)
    assert mm.detection_auc(perfect, is_bad, mask) == 1.0
    assert mm.detection_auc(-perfect, is_bad, mask) == 0.0
    assert mm.detection_auc(rng.random(is_bad.shape), is_bad, mask) == pytest.approx(0.5, abs=0.03)
    assert np.isnan(mm.detection_auc(perfect, np.zeros_like(is_bad), mask))


def test_detection_auc_by_hand():
    # bad scores {0.35, 0.8}, good {0.1, 0.4}: pairs won 1 + 2 of 4 -> 0.75
    score = np.array([[0.1, 0.4, 0.35, 0.8]])
    bad = np.array([[False, False, True, True]])
    mask = np.ones(score.shape, bool)
    assert mm.detection_auc(score, bad, mask) == pytest.approx(0.75)
    # ties: bad {2, 3}, good {1, 2}: 2>1 (1), 2=2 (1/2), 3>1 (1), 3>2 (1) -> 3.5 / 4
    score = np.array([[1.0, 2.0, 2.0, 3.0]])
    bad = np.array([[False, True, False, True]])
    assert mm.detection_auc(score, bad, mask) == pytest.approx(0.875)
    # the masked-out voxel would otherwise win every pair
    score = np.array([[1.0, 2.0, 2.0, 3.0, -9.0]])
    bad = np.array([[False, True, False, True, True]])
    assert mm.detection_auc(score, bad, np.array([[True] * 4 + [False]])) == pytest.approx(0.875)


def test_detection_rates_known_answer():
    flag = np.array([[True, True, True, False, False, False]])
    bad = np.array([[True, True, False, True, False, False]])
    mask = np.ones(flag.shape, bool)
    r = mm.detection_rates(flag, bad, mask)
    assert r["n_bad"] == 3 and r["n_flagged"] == 3
    assert r["sensitivity"] == pytest.approx(2 / 3)
    assert r["specificity"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx(2 / 3)
    none = mm.detection_rates(np.zeros_like(flag), bad, mask)
    assert none["sensitivity"] == 0.0 and np.isnan(none["precision"]) and none["specificity"] == 1.0


# --- roi --------------------------------------------------------------------------------------


def test_roi_mean_std():
    v = np.array([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = np.array([[True, True, True, True, False]])
    mean, std = mm.roi_mean_std(v, mask)
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(np.sqrt(5.0 / 3.0))
    one = mm.roi_mean_std(v, np.array([[True, False, False, False, False]]))
    assert one[0] == 1.0 and np.isnan(one[1])


def test_ssim_map_matches_explicit_window(rng):
    """Brute force at an interior voxel: normalised 11x11 Gaussian weights, N/(N-1) moments."""
    x = _structured(rng)
    y = x + 0.2 * rng.standard_normal(x.shape)
    mask = np.ones(x.shape, bool)
    r = np.arange(-5, 6)
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    i, j, L = 30, 33, 2.0
    px, py = x[i - 5 : i + 6, j - 5 : j + 6], y[i - 5 : i + 6, j - 5 : j + 6]
    mx, my = np.sum(w * px), np.sum(w * py)
    cn = 121 / 120
    vx, vy = cn * (np.sum(w * px * px) - mx * mx), cn * (np.sum(w * py * py) - my * my)
    vxy = cn * (np.sum(w * px * py) - mx * my)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    expected = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert mm.ssim_map(x, y, mask, data_range=L)[i, j] == pytest.approx(expected, rel=1e-10)


# --- ssim against scikit-image (an outside reference) ------------------------------------------


@pytest.mark.parametrize("sigma", [1.5, 1.0])
def test_ssim_map_equals_scikit_image_on_a_full_mask(rng, sigma):
    """skimage.metrics.structural_similarity with the same settings (Gaussian window of ``sigma``
    truncated at 3.5 sigma, K1 0.01, K2 0.03, sample covariance, same data_range) gives the same
    local SSIM at every pixel. Intentional difference: skimage's mean drops a border of half a window,
    the project's mean is over the mask (here the whole image)."""
    from skimage.metrics import structural_similarity  # test extra: scikit-image

    x = _structured(rng)
    y = x + 0.2 * rng.standard_normal(x.shape) + 0.1
    mask = np.ones(x.shape, bool)
    L = 2.5
    mean_ref, map_ref = structural_similarity(x, y, data_range=L, gaussian_weights=True, sigma=sigma,
                                              use_sample_covariance=True, full=True)
    ours = mm.ssim_map(x, y, mask, data_range=L, sigma=sigma)
    np.testing.assert_allclose(ours, map_ref, rtol=1e-10, atol=1e-12)
    pad = int(3.5 * sigma + 0.5)
    assert np.mean(ours[pad:-pad, pad:-pad]) == pytest.approx(mean_ref, rel=1e-10)
    assert mm.ssim(x, y, mask, data_range=L, sigma=sigma) == pytest.approx(np.mean(map_ref), rel=1e-10)


def test_masked_and_3d_ssim_equal_scikit_image_of_the_zero_filled_slices(rng):
    """The project's mask = skimage's SSIM of the maps set to 0 outside the mask, averaged over the
    mask; 3-D = skimage per slice along the last axis (channel_axis=-1)."""
    from skimage.metrics import structural_similarity  # test extra: scikit-image

    vol = np.stack([_structured(rng, (48, 40)) for _ in range(3)], axis=-1)
    pred = vol * (1 + 0.05 * rng.standard_normal(vol.shape))
    mask = np.zeros(vol.shape, bool)
    mask[6:40, 5:33, :] = True
    mask[20:30, 10:20, 1] = False  # a hole: the mask differs between slices
    L = 3.0
    _, map_ref = structural_similarity(np.where(mask, pred, 0), np.where(mask, vol, 0), data_range=L,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=True,
                                       channel_axis=-1, full=True)
    assert mm.ssim(pred, vol, mask, data_range=L) == pytest.approx(np.mean(map_ref[mask]), rel=1e-10)
    np.testing.assert_allclose(mm.ssim_map(pred[..., 1], vol[..., 1], mask[..., 1], data_range=L)[mask[..., 1]],
                               map_ref[..., 1][mask[..., 1]], rtol=1e-10)
