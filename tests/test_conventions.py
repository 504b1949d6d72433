"""One parameter convention for every method's output maps (issue 19, item 3).

Every method writes the (T1, PD, B) of the full finite-TR model s_n = PD (1 - B e^{-TI/T1} +
(B - 1) e^{-Trec/T1}) (TR-corrected PD and B; docs/physics.md). The networks were trained on
apparent (PD, B) labels; the decode converts them with the exact inverse of apparent_parameters.
Known answers: the full-recovery model on apparent parameters reproduces the finite-TR signal; a
noiseless scene through the image-formation chain is explained by its truth (no consistency flag)
whichever method's decode path it goes through; the twin's B truth lies in the B field's range.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from custom_components.data.synthesis import Effects, labels_from_maps, maps_from_labels, nist_twin, render
from custom_components.io import IRSeries
from custom_components.mapping import MappingResult, add_consistency_maps, map_series
from custom_components.mapping.learned import decode_prediction
from custom_components.methods.scaling import decode_maps, encode_maps
from custom_components.physics.protocol import Protocol, get_protocol
from custom_components.physics.signal_model import apparent_parameters, physical_parameters, signed_signal

# TR 1 s (the nist15 scans' TR, a one-echo readout of 10 ms) and an echo-train protocol (ETL 16 x 10 ms)
TR1 = get_protocol("nist15")
ETL16 = Protocol(inversion_times_s=(0.05, 0.2, 0.5, 1.0, 1.6), repetition_time_s=2.5, echo_time_s=0.01,
                 echo_train_length=16, echo_spacing_s=0.01, name="etl16")
VARIABLE_TR = get_protocol("nist15_variable_tr")


def _random_params(n, seed=0):
    g = np.random.default_rng(seed)
    return torch.tensor(np.stack([np.exp(g.uniform(np.log(0.05), np.log(5.0), n)), g.uniform(0.1, 2.0, n),
                                  g.uniform(0.5, 2.0, n)]), dtype=torch.float64)


@pytest.mark.parametrize("protocol", [TR1, ETL16, get_protocol("paper")], ids=["tr1", "etl16", "paper"])
def test_physical_parameters_is_the_exact_inverse_and_reproduces_the_signal(protocol):
    x = _random_params(2000)
    app = apparent_parameters(x, protocol, dim=0)
    torch.testing.assert_close(physical_parameters(app, protocol, dim=0), x, rtol=1e-10, atol=1e-12)
    # the defining property, against the signal itself: the full-recovery model on the apparent
    # parameters is the finite-TR signal of the physical ones, and back
    full = replace(protocol, repetition_time_s=None)
    s = signed_signal(x, protocol, dim=0)
    torch.testing.assert_close(signed_signal(app, full, dim=0), s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(signed_signal(physical_parameters(app, protocol, dim=0), protocol, dim=0),
                               signed_signal(app, full, dim=0), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(app, x)  # at these TRs the conventions differ


def test_physical_parameters_clips_where_no_physical_b_exists():
    """B_app E >= 1 has no B: the estimate is clipped to the apparent value of B = b_max."""
    t1 = 2.0
    e = np.exp(-TR1.recovery_times_s()[0] / t1)
    app = torch.tensor([[t1, t1, t1, 0.0], [1.0, 1.0, 1.0, 0.0], [1.2 / e, 0.999 / e, 2.0 / (1 + e), 0.0]], dtype=torch.float64)
    out = physical_parameters(app, TR1, dim=0)  # default b_max: 2, the largest B of any inversion
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out[2, :3].numpy(), 2.0)  # clipped to b_max
    np.testing.assert_allclose(out[:, 3].numpy(), 0.0)  # no tissue (T1 = PD = B = 0) stays 0
    # the clipped parameters still reproduce the signal of the clipped apparent ones
    full = replace(TR1, repetition_time_s=None)
    torch.testing.assert_close(signed_signal(out[:, :1], TR1), signed_signal(apparent_parameters(out[:, :1], TR1), full))


def test_labels_are_apparent_only_for_a_constant_finite_tr():
    t1, pd, b = (torch.full((2, 2), v, dtype=torch.float64) for v in (2.0, 1.0, 1.9))
    lab = labels_from_maps(t1, pd, b, TR1)
    assert lab[2, 0, 0] < 1.6  # apparent B at TR 1 s, T1 2 s: 1.9 / (1 + 0.9 e^{-0.99/2})
    torch.testing.assert_close(maps_from_labels(lab, TR1), torch.stack([t1, pd, b]))
    for p in (VARIABLE_TR, replace(TR1, repetition_time_s=None)):  # no apparent parameters: physical labels
        torch.testing.assert_close(labels_from_maps(t1, pd, b, p), torch.stack([t1, pd, b]))
        torch.testing.assert_close(maps_from_labels(labels_from_maps(t1, pd, b, p), p), torch.stack([t1, pd, b]))


def _noiseless_scene(protocol, t1_s=2.0, b=1.9, n=6):
    """A uniform n x n patch (T1 2 s, T2 80 ms, PD 1) through the image-formation chain, no noise,
    no echo-train blurring: images, training label, truth in the output convention."""
    full = lambda v: torch.full((n, n), v, dtype=torch.float64)  # noqa: E731
    out = render(full(t1_s), full(0.08), full(1.0), full(b), protocol, Effects(noise="none", echo_train=False))
    return out["image"].numpy(), out["label"], out["truth"]


def _series(images, protocol):
    return IRSeries(data=images.transpose(1, 2, 0)[:, :, None, :], affine=np.eye(4), protocol=protocol, source="test")


def _flags(maps3, images, protocol, sigma):
    """Consistency flag of (3, H, W) maps on the images at noise sigma (no ground truth used)."""
    mask = np.ones(images.shape[1:] + (1,), bool)
    res = MappingResult(maps={k: np.asarray(maps3[i], np.float64)[:, :, None] for i, k in enumerate(("T1", "PD", "B"))},
                        mask=mask, info={"sigma": sigma})
    return add_consistency_maps(res, _series(images, protocol), alpha=1e-3)


@pytest.mark.parametrize("protocol", [TR1, ETL16, VARIABLE_TR], ids=["tr1", "etl16", "variable_tr"])
def test_noiseless_truth_gives_no_flags_under_every_methods_convention(protocol):
    """TR 1 s, T1 2 s (and an echo train, and a TR that varies per image): the noiseless truth is
    explained by the maps of every method's decode path: the classical fit's (it estimates the
    full model's parameters) and the learned methods' (a perfect network outputs the training label
    in network space; the decode turns it into the output convention)."""
    sigma = 0.01  # SNR 100: a residual of 1 % of PD is about 2.5 sigma per image, flagged
    images, label, truth = _noiseless_scene(protocol)
    # the truth itself
    r = _flags(truth.numpy(), images, protocol, sigma)
    assert r.maps["flag"].sum() == 0 and float(r.maps["residual"].max()) < 1e-6
    # the classical fit: estimates the truth, no flag
    fit = map_series(_series(images, protocol), method="ls", mask=np.ones(images.shape[1:] + (1,), bool),
                     sigma=sigma, progress=False)
    np.testing.assert_allclose(fit.maps["B"][:, :, 0], truth[2].numpy(), rtol=1e-3)
    np.testing.assert_allclose(fit.maps["PD"][:, :, 0], truth[1].numpy(), rtol=1e-3)
    assert fit.maps["flag"].sum() == 0
    # the learned decode path, a single estimate (ResNet, RIM) and an ensemble (Diffusor)
    scale = torch.tensor([1.3])
    y = encode_maps(label.float()[None], scale)  # (1, 3, H, W): the network's perfect output
    maps, std = decode_prediction(y, scale, protocol)
    assert std is None
    np.testing.assert_allclose(maps[0].numpy(), truth.numpy(), rtol=2e-4, atol=1e-6)
    assert _flags(maps[0].numpy(), images, protocol, sigma).maps["flag"].sum() == 0
    mean, std = decode_prediction(y[:, None].expand(1, 4, *y.shape[1:]), scale, protocol)
    np.testing.assert_allclose(mean[0].numpy(), truth.numpy(), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(std[0].numpy(), 0.0, atol=1e-4)
    assert _flags(mean[0].numpy(), images, protocol, sigma).maps["flag"].sum() == 0


def test_the_apparent_labels_read_as_output_maps_are_flagged():
    """What the learned methods wrote before (the decode without the conversion): the apparent
    label at TR 1 s, T1 2 s, re-synthesised with the full model, is far from the images."""
    images, label, truth = _noiseless_scene(TR1)
    scale = torch.tensor([1.3])
    old = decode_maps(encode_maps(label.float()[None], scale), scale)[0].numpy()  # the old decode_prediction
    r = _flags(old, images, TR1, 0.01)
    assert r.maps["flag"].all()
    assert float(r.maps["residual"].min()) > 10 * 0.01  # more than 10 sigma RMS over the TIs


def test_the_comparison_scores_against_the_output_convention():
    """The twin's truth B lies in the smooth B field's range (1.8-2.0) whatever T1; the training label
    at TR 1 s does not (apparent B, down to about 1.2 for long T1)."""
    from custom_components.reporting.comparison import brain_cases, twin_case

    case = twin_case(50.0, protocol="nist15")
    b = case.truth[2][case.mask]
    assert b.min() >= 1.8 - 1e-6 and b.max() <= 2.0 + 1e-6
    tw = nist_twin("nist15", snr=None, seed=0, matrix=(96, 96))
    m = tw["mask"]
    assert tw["truth"][2][m].min() >= 1.8 - 1e-6 and tw["label"][2][m].min() < 1.5
    np.testing.assert_allclose(maps_from_labels(tw["label"], get_protocol("nist15")), tw["truth"], rtol=1e-9, atol=1e-12)
    brain = brain_cases(1, protocol="nist15", matrix=48)[0]
    bb = brain.truth[2][brain.mask]
    assert bb.min() >= 1.8 - 1e-4 and bb.max() <= 2.0 + 1e-4
