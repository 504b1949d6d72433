"""The Diffusor's ensemble statistics: one member at the sampler's clip cannot dominate the mean or
the std (issue 19 item 4), the estimator is consistent for members of known distributions, and
the std keeps the calibration of the plain ensemble std (closed form: Student's t)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from custom_components.methods.inferers import ROBUST_CLIP, ensemble_statistics
from custom_components.methods.scaling import EPS, T1_SCALE_S, decode_maps, encode_maps
from custom_components.reporting.map_metrics import coverage

PLAIN = {"robust_clip": None}  # the estimator before issue 19: mean and std of the decoded members


def _members(t1: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """T1 members (N, S) in s -> network-space samples (N, S, 3, 1, 1), PD 0.8 and B 1.9 throughout."""
    maps = torch.stack([t1, torch.full_like(t1, 0.8 * scale), torch.full_like(t1, 1.9)], dim=-1)[..., None, None]
    return encode_maps(maps, scale)


def _t1(samples: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = ensemble_statistics(samples, torch.ones(samples.shape[0], dtype=samples.dtype), **kw)
    return mean[:, 0, 0, 0], std[:, 0, 0, 0]


CLIP_T1_S = T1_SCALE_S * math.atanh(1 - EPS)  # a member at y = 1 (the sampler's clip) decodes to 14.5 s


def test_one_member_at_the_clip_cannot_dominate_csf():
    """CSF-like ensembles, 10 members T1 ~ N(4 s, 0.3 s); member 0 replaced by the clip (14.5 s).
    Plain statistics: the mean moves by exactly (14.5 - x0) / 10, about +1 s = 3.5 sigma, and the
    std becomes about 10.5 x sqrt(0.1 x 0.9 x 10 / 9) = 3.3 s. Robust: the clamped member counts
    as at most m + c s, so replacing a typical member moves the mean by about c sigma / S = 0.4
    sigma; the noise of s at S = 10 (s up to ~2.5 sigma) and the clamping of other members widen
    that, but not beyond 1.5 sigma in 4000 ensembles."""
    assert CLIP_T1_S == pytest.approx(14.5, abs=0.01)
    g = torch.Generator().manual_seed(1)
    mu, sigma, S, N = 4.0, 0.3, 10, 4000
    t1 = mu + sigma * torch.randn(N, S, generator=g, dtype=torch.float64)
    clean = _members(t1)
    hit = clean.clone()
    hit[:, 0, 0] = 1.0  # the clip
    m_clean, s_clean = _t1(clean)
    m_hit, s_hit = _t1(hit)
    shift = m_hit - m_clean
    assert float(shift.abs().mean()) < 0.5 * sigma and float(shift.abs().max()) < 1.5 * sigma
    assert float((s_hit / s_clean).median()) < 2.0  # the std stays of the order of the members' spread
    # the plain statistics fail the same bounds by far
    p_clean, ps_clean = _t1(clean, **PLAIN)
    p_hit, ps_hit = _t1(hit, **PLAIN)
    np.testing.assert_allclose((p_hit - p_clean).numpy(), ((CLIP_T1_S - t1[:, 0]) / S).numpy(), rtol=1e-6)
    assert float((p_hit - p_clean).min()) > 0.8
    assert float((ps_hit / ps_clean).median()) > 8


def test_one_member_anywhere_has_bounded_influence_both_ways():
    """The bound does not depend on where the odd member lies: at the clip (T1 14.5 s), at T1 = 0
    (y = -1) or between, it moves the mean of 10 members N(1 s, 0.05 s) by less than 1.5 sigma
    (0.5 sigma on average). The plain mean moves by 1.7-2.3 sigma for T1 = 0 and 27 sigma at the clip."""
    g = torch.Generator().manual_seed(2)
    mu, sigma, S, N = 1.0, 0.05, 10, 2000
    t1 = mu + sigma * torch.randn(N, S, generator=g, dtype=torch.float64)
    clean = _members(t1)
    m_clean, _ = _t1(clean)
    p_clean, _ = _t1(clean, **PLAIN)
    for y in (-1.0, -0.5, 0.5, 0.9, 1.0):
        odd = clean.clone()
        odd[:, 0, 0] = y
        shift = (_t1(odd)[0] - m_clean).abs()
        assert float(shift.mean()) < 0.5 * sigma and float(shift.max()) < 1.5 * sigma, y
        if y in (-1.0, 1.0):
            assert float((_t1(odd, **PLAIN)[0] - p_clean).abs().min()) > 1.5 * sigma


@pytest.mark.parametrize("mu,sigma", [(1.0, 0.05), (4.0, 0.3)])
def test_consistent_for_gaussian_members(mu, sigma):
    """Large ensembles of Gaussian members: mean -> mu and std -> sigma (a Gaussian clamped at
    c = 4 sigma keeps 1 - 2[(c phi(c) + Q(c)) - c^2 Q(c)] = 0.99988 of its variance)."""
    g = torch.Generator().manual_seed(3)
    S = 20001
    t1 = mu + sigma * torch.randn(4, S, generator=g, dtype=torch.float64)
    m, s = _t1(_members(t1))
    c = ROBUST_CLIP
    q = stats.norm.sf(c)
    kept = 1 - 2 * ((c * stats.norm.pdf(c) + q) - c * c * q)
    assert kept == pytest.approx(0.99988, abs=1e-5)
    np.testing.assert_allclose(m.numpy(), mu, atol=4 * sigma / math.sqrt(S))
    np.testing.assert_allclose(s.numpy(), sigma * math.sqrt(kept), rtol=4 / math.sqrt(2 * S))


def test_consistent_for_members_gaussian_in_network_space():
    """Members Gaussian in the network's space near the top of the tanh range (CSF: y ~ N(y(4 s),
    0.01), T1 std 0.16 s) are right-skewed in seconds; the mean and std converge to the moments of decode(y),
    computed here by quadrature (Gauss-Hermite), not by the estimator."""
    y0, sy, S = float(encode_maps(torch.tensor([4.0, 1.0, 1.0]).reshape(3, 1, 1), 1.0)[0, 0, 0]), 0.01, 20001
    z, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    t = T1_SCALE_S * np.arctanh(np.clip((y0 + sy * z + 1) / 2, EPS, 1 - EPS))
    mean_q = float(np.sum(w * t))
    std_q = float(np.sqrt(np.sum(w * (t - mean_q) ** 2)))
    assert mean_q - 4.0 > 0.008  # skewed: the mean of the decoded members is above decode(mean y) = 4 s
    g = torch.Generator().manual_seed(4)
    y = (y0 + sy * torch.randn(4, S, generator=g, dtype=torch.float64)).clamp(-1, 1)
    samples = _members(torch.full((4, S), 1.0, dtype=torch.float64))
    samples[:, :, 0] = y[..., None, None]
    m, s = _t1(samples)
    np.testing.assert_allclose(m.numpy(), mean_q, atol=4 * std_q / math.sqrt(S))
    np.testing.assert_allclose(s.numpy(), std_q, rtol=0.02)  # the clamp cuts only the far tail (< 0.1 % of members)


def test_contaminated_ensembles_estimate_the_clean_distribution():
    """95 % of members N(4 s, 0.3 s), 5 % at the clip. Robust: those count as m + 4 s, so the mean
    moves by about 0.05 x 4 sigma = 0.06 s and the variance grows by about 0.05 x (4 sigma)^2, to
    a std of about 1.3 sigma (0.4 s). Plain: 4 + 0.05 x 10.5 = 4.5 s and sqrt(0.05 x 0.95) x 10.5
    = 2.3 s."""
    g = torch.Generator().manual_seed(5)
    S = 4000
    t1 = 4.0 + 0.3 * torch.randn(3, S, generator=g, dtype=torch.float64)
    samples = _members(t1)
    samples[:, : S // 20, 0] = 1.0
    m, s = _t1(samples)
    np.testing.assert_allclose(m.numpy(), 4.0, atol=0.1)
    assert np.all((s.numpy() > 0.3) & (s.numpy() < 1.5 * 0.3))
    pm, ps = _t1(samples, **PLAIN)
    np.testing.assert_allclose(pm.numpy(), 4.0 + 0.05 * (CLIP_T1_S - 4.0), atol=0.05)
    np.testing.assert_allclose(ps.numpy(), math.sqrt(0.05 * 0.95) * (CLIP_T1_S - 4.0), rtol=0.05)


def test_std_keeps_the_calibration_of_the_plain_ensemble():
    """Truth and 10 members drawn from the same Gaussian (a calibrated sampler): (t - mean) /
    (std sqrt(1 + 1/S)) is Student-t with S - 1 degrees of freedom, so the fraction of truths within
    1 and 2 std of the mean is P(|T_9| < k / sqrt(1.1)) = 0.66 / 0.92. Both the plain and the robust
    std give it (the project's coverage metric)."""
    g = torch.Generator().manual_seed(6)
    S, N, mu, sigma = 10, 20000, 1.2, 0.04
    draws = mu + sigma * torch.randn(N, S + 1, generator=g, dtype=torch.float64)
    truth, t1 = draws[:, 0].numpy(), draws[:, 1:]
    expected = {k: 2 * stats.t.cdf(k / math.sqrt(1 + 1 / S), S - 1) - 1 for k in (1.0, 2.0)}
    mask = np.ones(N, bool)
    for kw in ({}, PLAIN):
        m, s = _t1(_members(t1), **kw)
        cov = coverage(truth, m.numpy(), s.numpy(), mask)
        for k in (1.0, 2.0):
            assert cov[k] == pytest.approx(expected[k], abs=0.012), (kw, k)


def test_known_answers_without_outliers_and_small_ensembles():
    # members at evenly spaced Gaussian quantiles: nothing beyond c robust stds, so exactly the plain statistics
    q = torch.tensor(stats.norm.ppf((np.arange(10) + 0.5) / 10), dtype=torch.float64)
    samples = _members((2.5 + 0.2 * q)[None])
    for a, b in zip(ensemble_statistics(samples, 1.0), ensemble_statistics(samples, 1.0, **PLAIN)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # decoded members: the mean is the mean of atanh-decoded values, scale applied to PD
    y = torch.tensor([[-0.2, 0.1]], dtype=torch.float64)[..., None, None, None].expand(1, 2, 3, 1, 1)
    mean, std = ensemble_statistics(y, 2.0)
    phys = decode_maps(y, 2.0)
    torch.testing.assert_close(mean, phys.mean(1))
    torch.testing.assert_close(std, phys.std(1))  # S = 2: nothing is clamped, ddof 1
    mean1, std1 = ensemble_statistics(y[:, :1], 2.0)
    torch.testing.assert_close(mean1, phys[:, 0]) and torch.testing.assert_close(std1, torch.zeros_like(std1))
    with pytest.raises(ValueError, match="robust_clip must be positive"):
        ensemble_statistics(y, 2.0, robust_clip=0.0)
