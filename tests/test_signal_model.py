"""The IR signal model against closed forms, finite differences and the published CRLB table."""

import math

import numpy as np
import pytest
import torch

from custom_components.physics.protocol import Protocol, ProtocolError, nist_15t_protocol, paper_protocol
from custom_components.physics.signal_model import (apparent_parameters, crlb, crlb_t1_table, jacobian, signal,
                                            signed_jacobian, signed_signal)

FULL = paper_protocol().with_(repetition_time_s=None)
PROTOCOLS = [FULL, paper_protocol(), nist_15t_protocol(variable_tr=True)]


def test_full_recovery_is_the_papers_model():
    t1, pd, b = 0.9, 0.8, 1.93
    s = signal(torch.tensor([t1, pd, b], dtype=torch.float64), FULL, dim=0)
    expected = [abs(pd * (1 - b * math.exp(-ti / t1))) for ti in FULL.inversion_times_s]
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-12)


def test_finite_tr_closed_form_and_limits():
    # readout saturates Mz, free recovery Trec, inversion Mz -> (1-B) Mz: steady state
    p = nist_15t_protocol(variable_tr=True)
    t1, pd, b = 0.7, 1.0, 1.95
    rec = p.recovery_times_s()
    expected = [pd * (1 - b * math.exp(-ti / t1) + (b - 1) * math.exp(-r / t1)) for ti, r in zip(p.tis, rec)]
    s = signed_signal(torch.tensor([t1, pd, b], dtype=torch.float64), p, dim=0)
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-12)
    # B = 1 (saturation recovery) makes TR irrelevant; a very long TR gives the full-recovery model
    s1 = signed_signal(torch.tensor([t1, pd, 1.0], dtype=torch.float64), p, dim=0)
    np.testing.assert_allclose(s1.numpy(), [1 - math.exp(-ti / t1) for ti in p.tis], rtol=1e-12)
    long_tr = FULL.with_(repetition_time_s=1e3)
    np.testing.assert_allclose(signal(torch.tensor([t1, pd, b], dtype=torch.float64), long_tr).numpy(),
                               signal(torch.tensor([t1, pd, b], dtype=torch.float64), FULL).numpy(), rtol=1e-9)


def test_steady_state_by_simulating_repeated_inversions():
    """Bloch-style simulation of many TR periods converges to the steady-state formula."""
    p = paper_protocol()
    t1, b, ro = 2.5, 1.9, p.readout_duration_s
    for ti, tr in zip(p.tis, np.broadcast_to(p.repetition_time_s, (p.n_images,))):
        mz = 1.0
        for _ in range(50):
            mz = (1 - b) * mz  # inversion
            mz = 1 + (mz - 1) * math.exp(-ti / t1)  # recovery to TI
            sig = mz
            mz = 0.0  # readout saturates
            mz = 1 + (mz - 1) * math.exp(-(tr - ti - ro) / t1)  # recovery to the next inversion
        s = signed_signal(torch.tensor([t1, 1.0, b], dtype=torch.float64), p.with_(inversion_times_s=(ti, ti + 1e-3, ti + 2e-3), repetition_time_s=tr), dim=0)
        assert s[0].item() == pytest.approx(sig, rel=1e-9)


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


def test_crlb_scales_with_sigma_and_agrees_with_fisher_inverse():
    p = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    c1 = crlb(p, FULL, 0.02, dim=0)
    c2 = crlb(p, FULL, 0.04, dim=0)
    np.testing.assert_allclose((c2 / c1).numpy(), 2.0, rtol=1e-10)
    j = signed_jacobian(p, FULL, dim=0).numpy()
    cov = np.linalg.inv(j.T @ j) * 0.02**2
    np.testing.assert_allclose(c1.numpy(), np.sqrt(np.diag(cov)), rtol=1e-10)


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
