"""The IR signal model against closed forms, finite differences and the published CRLB table."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.optimize import least_squares

from custom_components.physics.protocol import Protocol, ProtocolError, nist_15t_protocol, paper_protocol
from custom_components.physics.signal_model import (apparent_parameters, crlb, crlb_t1_table, jacobian, signal,
                                            signed_jacobian, signed_signal)

FULL = paper_protocol().with_(repetition_time_s=None)
PROTOCOLS = [FULL, paper_protocol(), nist_15t_protocol(variable_tr=True)]


def _relax(mz, dt, t1, m0):
    """Free longitudinal relaxation dMz/dt = (M0 - Mz) / T1 over dt, integrated numerically."""
    if dt <= 0:
        return mz
    sol = solve_ivp(lambda t, m: (m0 - m) / t1, (0.0, dt), [mz], method="DOP853", rtol=1e-12, atol=1e-14)
    return float(sol.y[0, -1])


def _bloch_signal(t1, pd, b, protocol):
    """Signed Mz at each TI by simulating the sequence, not by its closed form.

    Start at equilibrium Mz = PD; every TR: inversion Mz -> (1 - B) Mz, free relaxation for TI, the
    signal is Mz there, the echo train saturates Mz (Mz = 0 until its end), free relaxation until
    the next inversion. Full recovery (TR None) = the first period from equilibrium; otherwise
    periods are repeated until Mz at TI no longer changes (the steady state).
    """
    ro = protocol.readout_duration_s
    trs = [None] * protocol.n_images if protocol.repetition_time_s is None else \
        np.broadcast_to(protocol.repetition_time_s, (protocol.n_images,))
    out = []
    for ti, tr in zip(protocol.tis, trs):
        mz, prev = pd, np.inf
        for _ in range(50):
            mz = _relax((1.0 - b) * mz, ti, t1, pd)
            sample = mz
            if tr is None or abs(sample - prev) < 1e-13:
                break
            prev = sample
            mz = _relax(0.0, tr - ti - ro, t1, pd)
        out.append(sample)
    return np.array(out)


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
@pytest.mark.parametrize("t1,pd,b", [(0.3, 0.8, 1.93), (1.2, 1.0, 2.0), (4.2, 0.9, 1.7)])
def test_signal_equals_a_bloch_simulation_of_the_sequence(protocol, t1, pd, b):
    """Inversion, relaxation, saturating readout, repeated TRs: the model is the simulated steady state."""
    expected = _bloch_signal(t1, pd, b, protocol)
    p = torch.tensor([t1, pd, b], dtype=torch.float64)
    np.testing.assert_allclose(signed_signal(p, protocol, dim=0).numpy(), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(signal(p, protocol, dim=0).numpy(), np.abs(expected), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("t1,b", [(0.5, 2.0), (1.2, 1.85)])
def test_known_limits(t1, b):
    """TI -> 0: PD |1 - B|; signed zero at the null TI = T1 ln B; TI >> T1: PD (full recovery).
    Saturation recovery (B = 1) does not depend on TR; a very long TR is full recovery."""
    pd = 0.7
    prot = Protocol(inversion_times_s=(1e-7, t1 * math.log(b), 19.0))
    p = torch.tensor([t1, pd, b], dtype=torch.float64)
    s = signed_signal(p, prot, dim=0).numpy()
    assert s[0] == pytest.approx(pd * (1 - b), rel=1e-6)
    assert abs(s[1]) < 1e-14
    assert s[2] == pytest.approx(pd, rel=1e-6)
    assert signal(p, prot, dim=0).numpy()[0] == pytest.approx(pd * abs(1 - b), rel=1e-6)
    sat = torch.tensor([t1, pd, 1.0], dtype=torch.float64)
    p15 = nist_15t_protocol(variable_tr=True)
    np.testing.assert_allclose(signed_signal(sat, p15, dim=0).numpy(), signed_signal(sat, p15.with_(repetition_time_s=None), dim=0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(signal(p, FULL.with_(repetition_time_s=1e3)).numpy(), signal(p, FULL).numpy(), rtol=1e-9)


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_jacobian_matches_finite_differences(protocol):
    rng = np.random.default_rng(0)
    params = np.stack([np.exp(rng.uniform(np.log(0.05), np.log(4), 64)), rng.uniform(0.3, 1.2, 64),
                       rng.uniform(1.5, 2.0, 64)], axis=-1)
    p = torch.tensor(params, dtype=torch.float64)
    j = signed_jacobian(p, protocol, dim=-1)  # (64, N, 3)
    for i in range(3):
        h = 1e-6 * p[:, i:i + 1].abs()
        dp = torch.zeros_like(p)
        dp[:, i:i + 1] = h
        fd = (signed_signal(p + dp, protocol, -1) - signed_signal(p - dp, protocol, -1)) / (2 * h)
        np.testing.assert_allclose(j[..., i].numpy(), fd.numpy(), rtol=1e-5, atol=1e-8)
    # the magnitude Jacobian is sign(s) times the signed one, and matches autograd away from the null
    pa = p.clone().requires_grad_(True)
    s = signal(pa, protocol, -1)
    g = torch.autograd.grad(s.sum(), pa)[0]
    np.testing.assert_allclose(g.numpy(), jacobian(p, protocol, -1).sum(-2).numpy(), rtol=1e-8, atol=1e-12)


def test_channel_layout_batched_images():
    p = paper_protocol()
    maps = torch.rand(2, 3, 5, 4, dtype=torch.float64) + torch.tensor([0.5, 0.5, 1.5], dtype=torch.float64).view(1, 3, 1, 1)
    img = signal(maps, p, dim=1)
    assert img.shape == (2, p.n_images, 5, 4)
    one = signal(maps[1, :, 2, 3], p, dim=0)
    np.testing.assert_allclose(img[1, :, 2, 3].numpy(), one.numpy())
    assert signed_jacobian(maps, p, dim=1).shape == (2, p.n_images, 5, 4, 3)


def test_apparent_parameters_reproduce_constant_tr_signal():
    p = paper_protocol()
    params = torch.tensor([[4.2, 1.0, 2.0], [0.9, 0.7, 1.9]], dtype=torch.float64)
    app = apparent_parameters(params, p, dim=-1)
    np.testing.assert_allclose(signal(app, FULL, -1).numpy(), signal(params, p, -1).numpy(), rtol=1e-12)
    # facts.md: TR 10 s leaves CSF (T1 4.2 s) with an apparent B near 1.8
    assert 1.8 < app[0, 2].item() < 1.86
    with pytest.raises(ValueError):
        apparent_parameters(params, nist_15t_protocol(variable_tr=True), dim=-1)


def test_crlb_reproduces_published_table():
    """facts.md: T1 CRLB (ms), PD 1, B 2, paper TIs, full recovery, SNR 20/50/100."""
    table_ms = np.array([[18, 7.3, 3.6], [41, 16, 8.1], [114, 46, 23], [495, 198, 99], [2900, 1160, 580]])
    got = crlb_t1_table([0.2, 0.5, 1.0, 2.0, 4.0], [20, 50, 100], FULL) * 1000
    np.testing.assert_allclose(got, table_ms, rtol=0.03)


@pytest.mark.parametrize("protocol,t1", [(FULL, 1.0), (paper_protocol(), 2.0)], ids=["full_recovery", "paper_tr10"])
def test_crlb_equals_the_spread_of_a_plain_least_squares_estimator(protocol, t1):
    """Monte Carlo: at SNR 200 an ordinary least-squares fit (scipy, signed data) is nearly unbiased
    and efficient, so its std over noise realisations is the CRLB of (T1, PD, B)."""
    truth = np.array([t1, 1.0, 1.9])
    sigma, n = 1 / 200, 400
    p = torch.tensor(truth, dtype=torch.float64)
    clean = signed_signal(p, protocol, dim=0).numpy()

    def residual(theta, y):
        return signed_signal(torch.from_numpy(theta), protocol, dim=0).numpy() - y

    rng = np.random.default_rng(11)
    est = np.array([least_squares(residual, truth, args=(clean + rng.normal(0, sigma, clean.shape),),
                                  x_scale=truth, xtol=1e-12, ftol=1e-12).x for _ in range(n)])
    bound = crlb(p, protocol, sigma, dim=0).numpy()
    # std of a sample std over n Gaussian draws is about 1/sqrt(2n) = 3.5 %: allow 4 of those
    np.testing.assert_allclose(est.std(axis=0, ddof=1), bound, rtol=0.14)
    assert np.all(np.abs(est.mean(axis=0) - truth) < 4 * bound / np.sqrt(n) + 1e-3 * truth)
    # the bound scales with sigma
    np.testing.assert_allclose(crlb(p, protocol, 2 * sigma, dim=0).numpy(), 2 * bound, rtol=1e-10)


@pytest.mark.parametrize("bad", [
    dict(inversion_times_s=(0.1, 0.05, 0.2)),
    dict(inversion_times_s=(0.1, 0.1, 0.2)),
    dict(inversion_times_s=(0.1, 0.2)),
    dict(inversion_times_s=(50, 100, 250)),
    dict(inversion_times_s=(0.1, 0.2, 0.3), repetition_time_s=(1.0, 1.0)),
    dict(inversion_times_s=(0.1, 0.2, 0.3), repetition_time_s=0.25),
])
def test_protocol_rejects_inconsistent_input(bad):
    with pytest.raises(ProtocolError):
        Protocol(**bad)


def test_protocol_round_trip(tmp_path):
    p = nist_15t_protocol(variable_tr=True)
    import json
    (tmp_path / "p.json").write_text(json.dumps(p.to_dict()))
    assert Protocol.from_json(tmp_path / "p.json") == p
