"""The Diffusor's data-consistency step (custom_components.methods.data_consistency) against known answers:
the linear-Gaussian proximal closed form with a finite-difference Jacobian of the signal model, the plain
maximum-likelihood fit in the limit of a weak prior, and the sampler with a network that is known to be wrong."""

import numpy as np
import pytest
import torch

from custom_components.data.synthesis import labels_from_maps, maps_from_labels
from custom_components.methods.data_consistency import DataConsistency
from custom_components.methods.fitting import InversionRecoveryModel
from custom_components.methods.inferers import EnsembleDDPMInferer, ddpm_scheduler, ensemble_statistics
from custom_components.methods.scaling import decode_maps, encode_maps
from custom_components.physics.image_formation import add_rician_noise
from custom_components.physics.protocol import get_protocol
from custom_components.physics.signal_model import signal


def _q(t1, pd, b):
    return torch.tensor([[pd, pd * b, np.log(t1)]], dtype=torch.float64)


@pytest.mark.parametrize("protocol_name", ["paper", "nist15", "nist15_variable_tr"])
def test_one_step_is_the_linear_gaussian_proximal_solution(protocol_name):
    """Noiseless data, Gaussian noise model, an anchor 3 % off: one Gauss-Newton step equals
    q0 + (J'J/sigma^2 + P)^-1 J'(y - s(q0))/sigma^2 to second order, with J by central differences of
    physics.signal_model.signal (the labels' model: apparent parameters for a constant TR, the finite-TR
    model with the echo train's readout for the variable TR)."""
    p = get_protocol(protocol_name)
    dc = DataConsistency(p, strength=0.05, noise="gaussian", n_iter=1)
    assert (dc.rec is None) == (protocol_name != "nist15_variable_tr")
    truth = torch.tensor([1.2, 0.9, 1.95], dtype=torch.float64)
    label_truth = labels_from_maps(truth[0], truth[1], truth[2], p)
    y = signal(maps_from_labels(label_truth, p), p).abs()[None]  # the measured images: the full physical model
    anchor = label_truth * torch.tensor([1.03, 0.99, 1.0], dtype=torch.float64)
    q0 = _q(float(anchor[0]), float(anchor[1]), float(anchor[2]))
    sigma = torch.tensor([0.01], dtype=torch.float64)

    def model(q):  # the labels' signal from q = (a, c, log T1), via the physics package
        lab = torch.stack([torch.exp(q[2]), q[0], q[1] / q[0]])
        return signal(maps_from_labels(lab, p), p)

    eps = 1e-6
    jac = torch.stack([(model(q0[0] + eps * e) - model(q0[0] - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=torch.float64)], 1)
    w = 0.05
    prior = torch.diag(torch.tensor([1 / (w * q0[0, 0]) ** 2, 1 / (2 * w * q0[0, 0]) ** 2, 1 / w**2]))
    rhs = jac.T @ (y[0] - model(q0[0])) / sigma**2
    expected = q0[0] + torch.linalg.solve(jac.T @ jac / sigma**2 + prior, rhs)
    got = dc.prox(q0, y, sigma)[0]
    assert torch.allclose(got, expected, rtol=0, atol=2e-4 * expected.abs().max())
    # and the step moved T1 most of the way to the truth (the data determine T1 to ~1 % here)
    assert abs(np.exp(float(got[2])) / float(label_truth[0]) - 1) < 0.01


def test_weak_prior_iterated_gives_the_rician_ml_fit():
    """With a very wide prior (w = 100), repeated calls (one majorization each, as over a sampler's
    steps) converge to the classical fit's Rician maximum likelihood for the same noisy voxels."""
    p = get_protocol("paper")
    gen = torch.Generator().manual_seed(3)
    t1 = torch.tensor([0.3, 0.8, 1.5, 2.5], dtype=torch.float64)
    maps = torch.stack([t1, torch.full_like(t1, 1.0), torch.full_like(t1, 1.9)])  # physical (3, V)
    sigma = 0.04
    y = add_rician_noise(signal(maps, p), sigma, generator=gen).T  # (V, N)
    fit = InversionRecoveryModel(p).fit(y.numpy(), noise="rician", sigma=sigma, n_ml_iter=40)
    lab = labels_from_maps(maps[0] * 1.1, maps[1], maps[2], p)  # anchor: T1 10 % off
    q = torch.stack([lab[1], lab[1] * lab[2], torch.log(lab[0])], 1)
    dc = DataConsistency(p, strength=100.0, noise="rician", n_iter=3)
    for _ in range(40):
        q = dc.prox(q, y, torch.full((4,), sigma, dtype=torch.float64))
    t1_dc = torch.exp(q[:, 2]).numpy()
    assert np.allclose(t1_dc, fit.t1, rtol=2e-3), (t1_dc, fit.t1)


def test_zero_strength_and_background_are_left_alone():
    p = get_protocol("paper")
    x0 = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    images = torch.rand(2, 7, 4, 4)
    assert torch.equal(DataConsistency(p, strength=0.0)(x0, images, 0.1), x0)
    # every voxel below 5 sigma: nothing to be consistent with
    assert torch.equal(DataConsistency(p, strength=0.05)(x0, images * 0.01, 0.1), x0)
    with pytest.raises(ValueError):
        DataConsistency(p, strength=-1)
    # root-sum-of-squares of 16 coils: the background's noise floor (about 5.6 sigma) is not signal
    noise = torch.randn(2, 2, 16, 7, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    background = noise.pow(2).sum(dim=(1, 2)).sqrt()  # (2, 7, 8, 8)
    assert torch.equal(DataConsistency(p, strength=0.05, noise="ncchi", n_coils=16)(x0.repeat(1, 1, 2, 2), background, 0.1),
                       x0.repeat(1, 1, 2, 2))


class _WrongNetwork(torch.nn.Module):
    """A 'sample'-prediction network that always answers the given maps (network space): a model
    whose estimate of T1 is 15 % high everywhere, whatever the images say."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, inp, timesteps=None):
        return self.x0.expand(inp.shape[0], -1, -1, -1)


@pytest.mark.parametrize("residual", [False, True])
def test_sampler_with_data_consistency_corrects_a_biased_network(residual):
    """DPM-Solver++ with a network whose T1 is 15 % high: without the step the ensemble mean is 15 %
    high; with it (SNR 100) the bias is a fraction r^2 / (r^2 + w^2) of that (r: the data's relative
    uncertainty of T1, a few %): w = 0.05 removes most of it, w = 0.5 (the data dominate) nearly all;
    the same for the residual model (the network's residual is added to the fit channels of the condition)."""
    p = get_protocol("paper")
    h = w = 4
    truth = torch.stack([torch.full((h, w), 1.0), torch.full((h, w), 0.8), torch.full((h, w), 1.9)]).double()
    lab = labels_from_maps(truth[0], truth[1], truth[2], p)
    images = signal(maps_from_labels(lab, p), p).abs()[None].float()  # noiseless, (1, 7, h, w); scale 1
    wrong = encode_maps((lab * torch.tensor([1.15, 1.0, 1.0]).view(3, 1, 1)).float(), 1.0)[None]
    fit = encode_maps(lab.float(), 1.0)[None]
    cond = torch.cat([images, fit], 1) if residual else images
    net = _WrongNetwork(wrong - fit if residual else wrong)
    sched = ddpm_scheduler(prediction_type="sample")
    means = {}
    for strength in (0.0, 0.05, 0.5):
        inf = EnsembleDDPMInferer(sched, n_samples=2, steps=5, residual=residual, seed=0)
        inf.data_consistency = DataConsistency(p, strength=strength, noise="rician")
        pred = inf(cond, net, sigma=torch.tensor([0.01]))
        means[strength] = ensemble_statistics(pred, torch.tensor([1.0]))[0][0, 0].mean().item()
    assert abs(means[0.0] / 1.0 - 1.15) < 0.01
    assert 0.0 < means[0.05] - 1.0 < 0.05
    assert abs(means[0.5] - 1.0) < 0.005


@pytest.mark.parametrize("n", [1, 2, 8, 13, 32])
def test_bessel_ratio_against_scipy(n):
    """The majorize-minimize weight I_n(z)/I_{n-1}(z) for Rician (n = 1) and noncentral-chi data."""
    from scipy import special

    from custom_components.methods.data_consistency import bessel_ratio

    z = torch.logspace(-4, 5, 400, dtype=torch.float64)
    exact = special.ive(n, z.numpy()) / special.ive(n - 1, z.numpy())
    # Rician: exact Bessel functions below z = 20, the asymptotic series above (its error there < 2e-8);
    # noncentral chi: the backward recurrence (documented error < 1.1e-3)
    assert np.allclose(bessel_ratio(n, z).numpy(), exact, rtol=5e-8 if n == 1 else 1.1e-3, atol=0)


@pytest.mark.parametrize("protocol_name", ["paper", "nist15"])
def test_posterior_std_with_a_flat_prior_is_the_cramer_rao_bound(protocol_name):
    """With a very wide prior the step's Laplace posterior std of T1 is the CRLB of physics.signal_model
    (three free parameters, Gaussian noise), which does not depend on the parametrisation of PD and B."""
    from custom_components.physics.signal_model import crlb

    p = get_protocol(protocol_name)
    phys = torch.tensor([[0.3, 0.9, 1.9], [1.0, 1.0, 2.0], [2.2, 0.7, 1.7]], dtype=torch.float64)  # (V, 3)
    sigma = 0.02
    lab = labels_from_maps(phys[:, 0], phys[:, 1], phys[:, 2], p)  # (3, V)
    images = signal(phys.T, p).abs()  # (N, V)
    dc = DataConsistency(p, strength=1e4)
    post = dc.posterior_std(lab[:, None, :], images[:, None, :], sigma)[0, 0]
    bound = crlb(phys, p, sigma, dim=-1)[:, 0]
    assert torch.allclose(post, bound, rtol=1e-3), (post, bound)
    # a narrower prior can only shrink it
    assert (DataConsistency(p, strength=0.05).posterior_std(lab[:, None, :], images[:, None, :], sigma)[0, 0] < post).all()


def _prox_t1_error(dc, p, t1, sigma, t1_factor, n_iter=30):
    """Relative T1 error after the step for noiseless images of (t1, PD 0.9, B 1.95) and a network whose
    T1 is ``t1_factor`` times the truth (PD and B right), Gaussian noise of std ``sigma`` per voxel."""
    t1 = torch.as_tensor(t1, dtype=torch.float64)
    lab = labels_from_maps(t1, torch.full_like(t1, 0.9), torch.full_like(t1, 1.95), p)  # (3, V)
    y = signal(maps_from_labels(lab, p), p).abs().T  # (V, N)
    q0 = torch.stack([lab[1], lab[1] * lab[2], torch.log(lab[0] * t1_factor)], 1)
    dc.n_iter = n_iter
    q = dc.prox(q0, y, torch.as_tensor(sigma, dtype=torch.float64))
    return (torch.exp(q[:, 2]) / lab[0] - 1).numpy()


@pytest.mark.parametrize("protocol_name", ["paper", "nist15"])
def test_crlb_bound_limits_the_networks_weight_where_t1_is_determined(protocol_name):
    """With the CRLB bound k, a network error in T1 alone reaches the result with a weight of at most
    1 / (1 + k^2) where the images determine T1 (relative CRLB r <= 10 %): the data's precision of log T1
    is at least 1 / r^2 (r from physics.signal_model.crlb, an independent implementation) and the prior's
    is 1 / (k r)^2. Without the bound (w = 0.2 > r) the network's share is larger. Where T1 is not
    determined (r > 10 %) the bound is a plain prior of width max(w, k 10 %)."""
    from custom_components.physics.signal_model import crlb

    p = get_protocol(protocol_name)
    t1 = np.array([0.5, 1.0, 1.5])
    phys = torch.tensor([[t, 0.9, 1.95] for t in t1], dtype=torch.float64)
    r_unit = (crlb(phys, p, 1.0, dim=-1)[:, 0] / phys[:, 0]).numpy()  # relative CRLB at sigma = 1
    sigma = 0.09 / r_unit  # r = 9 %: determined, but only just
    k = 4.0
    err_bound = _prox_t1_error(DataConsistency(p, 0.2, noise="gaussian", crlb_factor=k), p, t1, sigma, 1.05)
    err_free = _prox_t1_error(DataConsistency(p, 0.2, noise="gaussian"), p, t1, sigma, 1.05)
    bound = 0.05 / (1 + k**2)
    assert (np.abs(err_bound) <= 1.05 * bound).all(), (err_bound, bound)
    assert (np.abs(err_free) > 1.5 * bound).all(), (err_free, bound)
    # not determined (r = 30 %): the prior is max(w, k 10 %) = 0.4 wide, bound or not
    sigma = 0.3 / r_unit
    a = _prox_t1_error(DataConsistency(p, 0.2, noise="gaussian", crlb_factor=k), p, t1, sigma, 1.2)
    b = _prox_t1_error(DataConsistency(p, 0.4, noise="gaussian"), p, t1, sigma, 1.2)
    assert np.allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("protocol_name", ["paper", "nist15", "nist15_variable_tr"])
def test_crlb_bound_widens_the_prior_to_k_times_the_cramer_rao_bound(protocol_name):
    """Where T1 is determined, the bounded prior's width in log T1 is exactly k r, r the relative CRLB of T1
    from physics.signal_model.crlb (an independent implementation; T1's bound does not depend on how PD
    and B are parametrised, so the labels' apparent parameters give the same r)."""
    from custom_components.physics.signal_model import crlb

    p = get_protocol(protocol_name)
    t1 = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    pd, b = torch.full_like(t1, 0.9), torch.full_like(t1, 1.95)
    r_unit = crlb(torch.stack([t1, pd, b], 1), p, 1.0, dim=-1)[:, 0] / t1  # relative CRLB at sigma = 1
    sigma = 0.05 / r_unit  # r = 5 %
    k = 3.0
    dc = DataConsistency(p, 0.01, noise="gaussian", crlb_factor=k)
    lab = labels_from_maps(t1, pd, b, p)
    a0, c0, u0 = lab[1] / sigma, lab[1] * lab[2] / sigma, torch.log(lab[0])
    f1, f2, d1, d2 = dc._basis(u0)
    prec = dc._prior_precision(a0, dc._fisher(f1, f2, dc._ds_du(a0, d1, c0, d2)))
    torch.testing.assert_close(1 / prec[2].sqrt(), torch.full_like(t1, k * 0.05), rtol=1e-6, atol=0)


def test_polarity_of_a_far_off_network_is_taken_again_from_the_data():
    """A network 30 % high in T1 puts the signal's null at the wrong inversion time. With the polarity of
    its estimate the signed data pull T1 far from the truth (+58 % at T1 = 1 s, SNR ~ 180); solving again
    with the polarity of the result (the default) gives the answer the data determine (CRLB 1.3 %)."""
    p = get_protocol("paper")
    off = _prox_t1_error(DataConsistency(p, 0.2, noise="gaussian", polarity_rounds=0), p, [1.0], [0.005], 1.3)
    on = _prox_t1_error(DataConsistency(p, 0.2, noise="gaussian"), p, [1.0], [0.005], 1.3)
    assert abs(off[0]) > 0.2
    assert abs(on[0]) < 0.005
