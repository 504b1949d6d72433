"""Noise models against their analytic moments; echo-train blurring and k-space truncation."""

import numpy as np
import pytest
import torch

from custom_components.physics.image_formation import (add_ncchi_noise, add_rician_noise, apparent_pd, echo_times_per_line,
                                               effective_echo_time_s, fse_blur, ncchi_second_moment, rician_mean,
                                               smooth_inversion_efficiency, truncate_kspace)
from custom_components.physics.protocol import nist_15t_protocol, paper_protocol


@pytest.mark.parametrize("nu", [0.0, 0.5, 2.0, 10.0])
def test_rician_moments(nu):
    g = torch.Generator().manual_seed(1)
    y = add_rician_noise(torch.full((400_000,), nu, dtype=torch.float64), 1.0, g).numpy()
    se = y.std() / np.sqrt(y.size)
    assert abs(y.mean() - rician_mean(nu, 1.0)) < 5 * se
    assert np.mean(y**2) == pytest.approx(nu**2 + 2.0, rel=0.01)


@pytest.mark.parametrize("n_coils", [1, 4, 16])
def test_noncentral_chi_moments_and_noise_floor(n_coils):
    g = torch.Generator().manual_seed(2)
    nu = 3.0
    y = add_ncchi_noise(torch.full((200_000,), nu, dtype=torch.float64), 1.0, n_coils, g).numpy()
    assert np.mean(y**2) == pytest.approx(ncchi_second_moment(nu, 1.0, n_coils), rel=0.01)
    # the background of an RSS image is chi with 2n degrees of freedom: mean sqrt(2) Gamma(n+1/2)/Gamma(n)
    from scipy.special import gammaln
    y0 = add_ncchi_noise(torch.zeros(200_000, dtype=torch.float64), 1.0, n_coils, g).numpy()
    assert y0.mean() == pytest.approx(np.sqrt(2) * np.exp(gammaln(n_coils + 0.5) - gammaln(n_coils)), rel=0.01)
    if n_coils == 16:
        assert y0.mean() == pytest.approx(5.6, abs=0.05)  # facts.md: about 5.6 sigma


def test_noise_is_seeded():
    s = torch.ones(100, dtype=torch.float64)
    a = add_rician_noise(s, 0.1, torch.Generator().manual_seed(5))
    b = add_rician_noise(s, 0.1, torch.Generator().manual_seed(5))
    c = add_rician_noise(s, 0.1, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_echo_ordering():
    p = paper_protocol()
    t = echo_times_per_line(240, p)
    assert t[120] == pytest.approx(p.echo_spacing_s)  # centric: first echo at k = 0
    assert t.max() == pytest.approx(64 * p.echo_spacing_s)
    counts = np.bincount(np.round(t / p.echo_spacing_s).astype(int))[1:]
    assert counts.sum() == 240 and counts.min() >= 3 and counts.max() <= 4
    # centric: echo time grows with |k|
    assert np.all(np.diff(t[120:]) >= 0) and np.all(np.diff(t[:121][::-1]) >= 0)
    lin = p.with_(ordering="linear")
    assert effective_echo_time_s(lin, 240) == pytest.approx(33 * p.echo_spacing_s)
    se = nist_15t_protocol()
    assert np.all(echo_times_per_line(64, se) == se.echo_time_s)


def test_fse_blur_preserves_uniform_and_blurs_along_phase_encode_only():
    p = paper_protocol()
    img = torch.zeros(1, 64, 64, dtype=torch.float64)
    img[0, 32, 32] = 1.0
    t2 = torch.full((64, 64), 0.08, dtype=torch.float64)
    out = fse_blur(img, t2, p, pe_axis=-2).abs()[0]
    # energy spreads along rows (phase encode) but not along columns (read-out)
    assert out[:, 32].sum() > 1.5 * out[32, 32]
    np.testing.assert_allclose(out[32, :].numpy()[np.arange(64) != 32], 0, atol=1e-12)
    # a uniform object keeps its value at the centre of k-space (TE weighting excluded)
    flat = fse_blur(torch.ones(1, 32, 32, dtype=torch.float64), torch.full((32, 32), 0.1, dtype=torch.float64), p)
    np.testing.assert_allclose(flat.real.numpy(), 1.0, atol=1e-10)
    # point-spread width grows as T2 shortens
    w = []
    for t2v in (0.05, 0.1, 1.0):
        o = fse_blur(img, torch.full((64, 64), t2v, dtype=torch.float64), p).abs()[0, :, 32]
        w.append(float(o.sum() / o.max()))
    assert w[0] > w[1] > w[2]
    # a spin echo (ETL 1) does not blur
    se = fse_blur(img, t2, nist_15t_protocol()).abs()
    np.testing.assert_allclose(se.numpy(), img.numpy(), atol=1e-12)


def test_apparent_pd():
    p = paper_protocol()
    pd = torch.tensor([1.0])
    assert apparent_pd(pd, torch.tensor([0.0714]), p, 240).item() == pytest.approx(np.exp(-0.1))


def test_truncate_kspace_gibbs():
    x = torch.zeros(128, 128, dtype=torch.float64)
    x[:, 64:] = 1.0
    y = truncate_kspace(x, (64, 64)).real
    assert y.shape == (64, 64)
    np.testing.assert_allclose(truncate_kspace(torch.ones(64, 64, dtype=torch.float64), (32, 32)).real.numpy(), 1.0, atol=1e-12)
    overshoot = y.max().item()
    assert 1.05 < overshoot < 1.15  # Gibbs overshoot of about 9 %


def test_smooth_inversion_efficiency_range_and_smoothness():
    g = torch.Generator().manual_seed(3)
    b = smooth_inversion_efficiency((96, 96), g, (1.8, 2.0))
    assert b.min() >= 1.8 - 1e-12 and b.max() <= 2.0 + 1e-12
    assert (b[1:] - b[:-1]).abs().max() < 0.01 and (b[:, 1:] - b[:, :-1]).abs().max() < 0.01
