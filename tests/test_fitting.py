"""The classical fit: polarity restoration, the CRLB as its Monte-Carlo spread, ML against noise bias."""

import numpy as np
import pytest
import torch

from custom_components.methods.fitting import InversionRecoveryModel, estimate_noise_sigma, fit_ir, signal_mask
from custom_components.physics.image_formation import add_ncchi_noise, add_rician_noise
from custom_components.physics.protocol import nist_15t_protocol, paper_protocol
from custom_components.physics.signal_model import crlb, signal

FULL = paper_protocol().with_(repetition_time_s=None)


def _images(t1, pd, b, protocol):
    p = torch.tensor(np.stack(np.broadcast_arrays(t1, pd, b), -1), dtype=torch.float64)
    return signal(p, protocol, dim=-1).numpy()


@pytest.mark.parametrize("protocol", [FULL, paper_protocol(), nist_15t_protocol(variable_tr=True)], ids=lambda p: p.name)
def test_polarity_restoration_for_every_null_position(protocol):
    """Noise-free data with the signal null before, between each pair of, and after the TIs is fitted exactly.

    T1 = t_null / ln B puts the null of the full-recovery signal at t_null, so the k-th case has exactly
    k negative points before the magnitude is taken: every polarity pattern k = 0..N is exercised.
    """
    tis = protocol.tis
    b = 1.9
    edges = np.concatenate([[tis[0] / 2], np.sqrt(tis[:-1] * tis[1:]), [tis[-1] * 2]])
    t1 = edges / np.log(b)  # null at T1 ln B for full recovery: one T1 per null position k = 0..N
    y = _images(t1, 0.8, b, protocol)
    fit = InversionRecoveryModel(protocol).fit(y)
    np.testing.assert_allclose(fit.t1, t1, rtol=1e-4)
    np.testing.assert_allclose(fit.pd, 0.8, rtol=1e-4)
    np.testing.assert_allclose(fit.b, b, rtol=1e-4)
    assert np.all(fit.residual < 1e-6)


def test_exact_on_random_noise_free_voxels():
    rng = np.random.default_rng(0)
    t1 = np.exp(rng.uniform(np.log(0.06), np.log(4.0), 5000))
    pd, b = rng.uniform(0.3, 1.0, 5000), rng.uniform(1.6, 2.0, 5000)
    fit = fit_ir(_images(t1, pd, b, paper_protocol()), paper_protocol())
    np.testing.assert_allclose(fit.t1, t1, rtol=1e-3)
    np.testing.assert_allclose(fit.b, b, rtol=1e-3)
    np.testing.assert_allclose(fit.predict(), _images(t1, pd, b, paper_protocol()), atol=1e-6)


@pytest.mark.parametrize("t1", [0.5, 1.0, 1.5])
def test_crlb_equals_monte_carlo_spread_at_snr50(t1):
    """The fit is efficient: its T1 std over noise realisations is the CRLB within 15 % (SNR 50)."""
    sigma = 1 / 50
    n = 4000
    rng = np.random.default_rng(int(t1 * 10))
    y = _images(np.full(n, t1), 1.0, 2.0, FULL)
    y = np.abs(y + rng.normal(0, sigma, y.shape))
    fit = fit_ir(y, FULL)
    bound = crlb(torch.tensor([t1, 1.0, 2.0], dtype=torch.float64), FULL, sigma, dim=0)[0].item()
    assert np.std(fit.t1) == pytest.approx(bound, rel=0.15)
    assert abs(np.mean(fit.t1) - t1) < 3 * bound / np.sqrt(n) + 0.005 * t1


def test_rician_ml_removes_noise_floor_bias():
    """At low SNR the least-squares fit of Rician data is biased; the Rician ML fit is not."""
    t1, sigma, n = 1.2, 1 / 10, 3000
    g = torch.Generator().manual_seed(0)
    s = torch.tensor(_images(np.full(n, t1), 1.0, 2.0, FULL))
    y = add_rician_noise(s, sigma, g).numpy()
    ls = fit_ir(y, FULL)
    ml = fit_ir(y, FULL, noise="rician", sigma=sigma)
    bias_ls = np.median(ls.pd) - 1.0
    bias_ml = np.median(ml.pd) - 1.0
    assert abs(bias_ml) < abs(bias_ls) / 2
    assert abs(np.median(ml.t1) / t1 - 1) < 0.03


def test_ncchi_ml_removes_rss_bias():
    """16-coil RSS: the noise floor is ~5.6 sigma; LS is biased by >5 % at T1 1.5 s, SNR 50; ncchi ML < 1.5 %."""
    t1, sigma, n = 1.5, 1 / 50, 3000
    g = torch.Generator().manual_seed(1)
    s = torch.tensor(_images(np.full(n, t1), 1.0, 2.0, FULL))
    y = add_ncchi_noise(s, sigma, 16, g).numpy()
    ls = fit_ir(y, FULL)
    ml = fit_ir(y, FULL, noise="ncchi", sigma=sigma, n_coils=16)
    assert np.median(ls.t1) / t1 - 1 > 0.05
    assert abs(np.median(ml.t1) / t1 - 1) < 0.015


def test_noise_estimate_and_mask():
    g = torch.Generator().manual_seed(2)
    img = torch.zeros(64, 64, 7, dtype=torch.float64)
    img[16:48, 16:48] = torch.tensor(_images(1.0, 1.0, 2.0, FULL))
    for n_coils in (1, 8):
        y = add_ncchi_noise(img, 0.02, n_coils, g).numpy()
        assert estimate_noise_sigma(y, n_coils=n_coils) == pytest.approx(0.02, rel=0.05)
    m = signal_mask(add_rician_noise(img, 0.02, g).numpy(), sigma=0.02)
    assert m[16:48, 16:48].mean() > 0.99 and m[:10].mean() < 0.01


def test_shapes_mask_and_errors():
    y = _images(np.full((4, 5, 1), 0.8), 1.0, 2.0, FULL)
    mask = np.zeros((4, 5, 1), bool)
    mask[1:3] = True
    fit = fit_ir(y, FULL, mask=mask)
    assert fit.t1.shape == (4, 5, 1) and np.all(fit.t1[~mask] == 0)
    np.testing.assert_allclose(fit.t1[mask], 0.8, rtol=1e-5)
    with pytest.raises(ValueError, match="inversion times"):
        fit_ir(y[..., :6], FULL)
    with pytest.raises(ValueError, match="sigma"):
        fit_ir(y, FULL, noise="rician")


def test_reaches_the_global_least_squares_optimum():
    """The fitted magnitude-LS cost is never above that of a brute-force search (2500 T1 values x all
    polarity patterns, closed-form (a, c), B within the admissible range)."""
    prot = paper_protocol()
    rng = np.random.default_rng(7)
    n = 2000
    t1 = np.exp(rng.uniform(np.log(0.05), np.log(4.0), n))
    g = torch.Generator().manual_seed(7)
    y = add_rician_noise(torch.tensor(_images(t1, 1.0, rng.uniform(1.8, 2.0, n), prot)), 1 / 30, g).numpy()
    fit = fit_ir(y, prot)
    cost_fit = np.sum((fit.predict() - y) ** 2, axis=1)
    model = InversionRecoveryModel(prot)
    best = np.full(n, np.inf)
    for t in np.geomspace(0.004, 12.0, 2500):
        tt = np.full(n, t)
        for k in range(prot.n_images + 1):
            sg = model._signs(np.full(n, k))
            a, c = model._closed_form(sg * y, tt)
            ok = (c / a >= 0) & (c / a <= 3)
            cost = model._cost(y, a, c, np.log(tt))
            best = np.where(ok & (cost < best), cost, best)
    assert np.all(cost_fit <= best * (1 + 1e-6) + 1e-12)
