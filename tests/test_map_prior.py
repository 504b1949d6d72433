"""The Diffusor with a prior over maps (issue 21, design (a)): one set of weights for any IR protocol.

Known answers: the SDEdit start from given maps against the closed-form probability-flow ODE of a
Gaussian prior; the protocol-free map scale against the PD it is defined from; the CRLB of a voxel the
protocol says nothing about; the weights card's schema; a prior bundle mapping a protocol that no
protocol-specific weights exist for, through `qmri map` and `monai.bundle run training`.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_runs import bundle_inference, tiny_training
from custom_components.methods.inferers import (DenoisingInferer, DenoisingPrepareBatch, EnsembleDDPMInferer,
                                                ddpm_scheduler, dpmpp2m_sample, logsnr_timesteps)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "diffusor"


def _gaussian_denoiser(m, s, abar):
    """Exact E[x0 | x_t] for x0 ~ N(m, s^2) (the 'sample' prediction of a perfect network)."""
    def model(x, t):
        a = abar[t].view(-1, *([1] * (x.ndim - 1)))
        return m + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * m)
    return model


@pytest.mark.parametrize("t0", [150, 400])
def test_sdedit_start_follows_the_probability_flow_ode(t0):
    """From x_t0 = sqrt(a) x_s + sqrt(1 - a) eps the probability-flow ODE of a Gaussian prior N(m, s^2)
    maps x_t0 to m + s (x_t0 - sqrt(a) m) / sqrt(a s^2 + 1 - a) (it standardises the marginal at t0), so
    over eps the result has mean m + s sqrt(a) (x_s - m) / v and std s sqrt(1 - a) / v, v = sqrt(a s^2 + 1 - a).
    The inferer's start_timestep path (DPM-Solver++ from t0, 20 steps) must reproduce it."""
    sch = ddpm_scheduler(prediction_type="sample")
    abar = sch.alphas_cumprod.double()
    m, s, x_s = 0.1, 0.3, -0.4
    a = float(abar[t0])
    v = np.sqrt(a * s**2 + 1 - a)
    denoise = _gaussian_denoiser(m, s, abar)
    seen = []

    def net(x, timesteps):
        seen.append(x.shape[1])
        return denoise(x.double(), timesteps).float()

    inf = EnsembleDDPMInferer(sch, n_samples=4000, steps=20, seed=0, clip=None, map_prior=True, start_timestep=t0)
    images = torch.rand(1, 5, 1, 1)  # reach the samples only through data-consistency (none here)
    out = inf(torch.cat([images, torch.full((1, 3, 1, 1), x_s)], dim=1), net, )[0, :, 0, 0, 0].double()
    assert set(seen) == {3}  # the prior sees the noisy maps only, never the images
    assert float(out.mean()) == pytest.approx(m + s * np.sqrt(a) * (x_s - m) / v, abs=4 * s / np.sqrt(4000) + 2e-3)
    assert float(out.std()) == pytest.approx(s * np.sqrt(1 - a) / v, rel=0.05)
    assert inf.network_evaluations == len(logsnr_timesteps(sch.alphas_cumprod, 20, t0)) <= 20
    assert logsnr_timesteps(sch.alphas_cumprod, 20, t0)[0] == t0
    # the plain sampler from pure noise is unchanged by the new argument
    x_T = torch.randn(10, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(dpmpp2m_sample(denoise, x_T, sch.alphas_cumprod, 10, "sample"),
                       dpmpp2m_sample(denoise, x_T, sch.alphas_cumprod, 10, "sample", t_max=999))


def test_map_prior_argument_checks():
    sch = ddpm_scheduler()
    with pytest.raises(ValueError, match="cannot be residual"):
        EnsembleDDPMInferer(sch, map_prior=True, residual=True)
    with pytest.raises(ValueError, match="start_timestep"):
        EnsembleDDPMInferer(sch, start_timestep=1000)


def test_denoising_validation_batches_follow_the_forward_process():
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with the same eps at every call; an oracle 'sample'
    network gives x0 back exactly."""
    sch = ddpm_scheduler(prediction_type="sample")
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    pb = DenoisingPrepareBatch(sch, timesteps=(10, 700), seed=3)
    batch = {"label": x0, "cond": torch.zeros(2, 0, 4, 4)}
    inputs, targets, _, kw = pb(batch)
    inputs2, *_ = pb(batch)
    assert inputs.shape == (4, 3, 4, 4) and torch.equal(inputs, inputs2)
    assert kw["timesteps"].tolist() == [10, 10, 700, 700]
    a = sch.alphas_cumprod[700]
    eps = (inputs[2:] - a.sqrt() * x0) / (1 - a).sqrt()
    assert float(eps.std()) == pytest.approx(1.0, rel=0.35)  # the noise is standard normal (32 values)
    out = DenoisingInferer(sch)(inputs, lambda x, timesteps: targets, timesteps=kw["timesteps"])
    assert torch.allclose(out, targets)


def test_crlb_is_infinite_where_the_protocol_says_nothing():
    from custom_components.physics.protocol import get_protocol
    from custom_components.physics.signal_model import crlb

    p = torch.tensor([[1.0, 1.0, 2.0], [1e-4, 1.0, 2.0], [1.0, 0.0, 2.0]], dtype=torch.float64)
    c = crlb(p, get_protocol("paper"), 0.02, dim=-1)
    assert float(c[0, 0]) == pytest.approx(0.0455, abs=5e-4)  # facts.md: T1 1 s, SNR 50 -> 46 ms
    assert torch.isinf(c[1:]).all()  # T1 0.1 ms: every image recovered; PD 0: no signal


def test_map_scale_does_not_depend_on_the_protocol():
    """The prior's scale comes from PD (the fit's at inference), not from how much of PD a protocol's
    images keep: for tissue of T1 2 s the images of a TR 1 s protocol keep a third of what the paper's
    keep, so their scales differ threefold; the fits' map scales agree with the true PD."""
    from custom_components.bundle.transforms import ClassicalFitd
    from custom_components.methods.scaling import map_scale, signal_scale
    from custom_components.physics.protocol import get_protocol
    from custom_components.physics.signal_model import signal

    maps = torch.zeros(3, 12, 12, dtype=torch.float64)
    maps[0], maps[2] = 2.0, 2.0
    maps[1, 2:10, 2:10] = 0.8
    maps[1, 4:8, 4:8] = 1.0
    scales, fits = [], []
    for proto in ("paper", "nist15"):
        img = signal(maps, get_protocol(proto), dim=0).float()
        fit = ClassicalFitd(proto)({"image": img})["fit"]
        scales.append(float(signal_scale(img)))
        fits.append(float(map_scale(fit[1], fit[1] > 0)))
    assert scales[1] < 0.4 * scales[0]
    assert fits == pytest.approx([1.0, 1.0], rel=1e-3)
    assert float(map_scale(torch.arange(1.0, 201.0).reshape(10, 20))) == pytest.approx(np.percentile(np.arange(1, 201), 99.5))


def test_prior_card_schema():
    from custom_components.bundle.training import check_weights_card
    from custom_components.io import InputError

    assert check_weights_card({"method": "diffusor", "n_images": 0, "map_prior": True})["map_prior"] is True
    with pytest.raises(InputError, match="n_images must be 0 for a protocol-free model"):
        check_weights_card({"n_images": 7, "map_prior": True})
    with pytest.raises(InputError, match="n_images must be an integer >= 3"):
        check_weights_card({"n_images": 0})
    with pytest.raises(InputError, match="a map prior sees no images"):
        check_weights_card({"map_prior": True, "fit_condition": True})


def test_mixed_scenes_and_prior_items():
    """scene="mixed": brain_fraction 0 gives only random label scenes, 1 only brains; PriorMapsd puts the
    physical label in network space with the scale of its own PD and leaves an empty condition."""
    from custom_components.bundle.transforms import PriorMapsd
    from custom_components.data.synthesis import SyntheticIRDataset
    from custom_components.methods.scaling import decode_maps, map_scale

    proto = {"inversion_times_s": [0.05, 0.5, 2.5], "repetition_time_s": None, "echo_time_s": 0.0}
    common = dict(protocol=proto, n_slices=4, realisations=1, matrix=(32, 32),
                  effects={"noise": "none", "echo_train": False}, with_tissue=True)
    rand = SyntheticIRDataset(scene="mixed", brain_fraction=0.0, **common)
    brain = SyntheticIRDataset(scene="mixed", brain_fraction=1.0, **common)
    assert all("tissue" not in rand[i] for i in range(4)) and all("tissue" in brain[i] for i in range(4))
    item = brain[0]
    d = PriorMapsd()(item)
    assert d["cond"].shape == (0, 32, 32) and "image" not in d
    assert float(d["scale"]) == pytest.approx(float(map_scale(item["label"][1])))
    back = decode_maps(d["label"], d["scale"])
    m = item["label"][1] > 1e-3  # (tanh space resolves PD / scale down to about 1e-6)
    np.testing.assert_allclose(back[:, m].numpy(), item["label"][:, m].numpy(), rtol=1e-4)


def _tiny_prior_bundle(root: Path) -> Path:
    """A bundle folder with the shipped configs and a tiny, untrained prior (weights + card)."""
    from custom_components.bundle.training import write_weights_card
    from custom_components.methods.networks import diffusion_unet

    shutil.copytree(BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(diffusion_unet("tiny", n_images=0).state_dict(), root / "models" / "model_prior.pt")
    write_weights_card(root / "models" / "model_prior.json", method="diffusor", n_images=0, network_preset="tiny",
                       map_prior=True, prediction_type="v_prediction")
    return root


def test_prior_weights_map_a_protocol_without_its_own_weights(tmp_path):
    """With only a prior in the bundle, `qmri map --method diffusor` refuses the in-vivo 9-TI protocol
    unasked (the prior is experimental) and maps it with --variant prior: the sidecars name the prior's
    weights and its settings, the maps are finite, --start_timestep is checked."""
    import nibabel as nib

    from custom_components.cli import main
    from custom_components.data.synthesis import Effects, nist_twin
    from custom_components.io import save_series
    from custom_components.mapping.learned import choose_weights
    from custom_components.physics.protocol import get_protocol

    from custom_components.io import InputError

    root = _tiny_prior_bundle(tmp_path / "bundle")
    proto = get_protocol("invivo9")
    with pytest.raises(InputError, match="or --variant prior \\(experimental"):  # never chosen unasked
        choose_weights(root, "diffusor", proto)
    path, why = choose_weights(root, "diffusor", proto, variant="prior")
    assert path.name == "model_prior.pt" and "any protocol" in why
    tw = nist_twin(proto, snr=50, effects=Effects(echo_train=False), matrix=(32, 32))
    save_series(tmp_path / "s.nii.gz", tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), proto)
    assert main(["map", str(tmp_path / "s.nii.gz"), "--out", str(tmp_path / "m"), "--method", "diffusor",
                 "--bundle", str(root), "--variant", "prior", "--samples", "2", "--steps", "2", "--start_timestep", "300",
                 "--quiet"]) == 0
    side = json.loads((tmp_path / "m" / "T1map.json").read_text())
    fit = side["Fit"]
    assert fit["map_prior"] is True and fit["start_timestep"] == 300 and fit["network_evaluations_per_sample"] <= 2
    assert side["Weights"]["File"] == "model_prior.pt" and side["Weights"]["Card"]["map_prior"] is True
    assert side["DataConsistency"]["model"] == "finite TR with the echo train's readout"  # physical labels
    assert np.isfinite(nib.load(tmp_path / "m" / "T1map.nii.gz").get_fdata()).all()
    assert main(["map", str(tmp_path / "s.nii.gz"), "--out", str(tmp_path / "m2"), "--method", "diffusor",
                 "--bundle", str(root), "--variant", "prior", "--start_timestep", "1000", "--quiet"]) == 2
    assert not (tmp_path / "m2").exists()
    assert main(["map", str(tmp_path / "s.nii.gz"), "--out", str(tmp_path / "m3"), "--method", "diffusor",
                 "--bundle", str(root), "--variant", "prior", "--dc_anneal", "-1", "--quiet"]) == 2
    assert not (tmp_path / "m3").exists()
    assert main(["map", str(tmp_path / "s.nii.gz"), "--out", str(tmp_path / "m4"), "--method", "mle",
                 "--dc_anneal", "1", "--quiet"]) == 2  # the diffusor's flag only
    assert not (tmp_path / "m4").exists()
    # the bundle's inference.json gives networks images as their condition: it refuses a prior's weights
    r = bundle_inference(root, root / "models" / "model_prior.pt", tmp_path / "s.nii.gz", tmp_path / "b")
    assert r.returncode != 0 and "--variant prior" in r.stdout + r.stderr and not (tmp_path / "b").exists()


def test_train_prior_config_through_monai_bundle(tmp_path):
    """`monai.bundle run training` with train.json + train_prior.json: a tiny prior trains, its card says
    map_prior with no images, and the validation metric is the denoising error."""
    out, card, state = tiny_training(tmp_path / "b", "train_prior.json", "model_prior")
    assert "val_t1_mape" in out
    assert card["map_prior"] is True and card["n_images"] == 0 and "protocol" not in card
    assert state["conv_in.conv.weight"].shape[1] == 3


def test_annealed_data_consistency_strength_follows_the_noise_level():
    """dc_anneal lambda: the step at timestep t gets w_t = sqrt(w^2 + lambda^2 (1 - abar_t) / abar_t); the
    last step (t = 0) almost w itself; lambda 0 passes no per-step strength (the step's own w)."""
    sch = ddpm_scheduler(prediction_type="sample")
    abar = sch.alphas_cumprod.double()

    class Recorder:
        strength, tis = 0.05, (0.1, 0.5, 1.0)

        def __init__(self):
            self.seen = []

        def __call__(self, x0, images, sigma, strength=None):
            self.seen.append(strength)
            return x0

    for lam in (0.0, 2.0):
        dc = Recorder()
        inf = EnsembleDDPMInferer(sch, n_samples=1, steps=4, seed=0, data_consistency=dc, dc_anneal=lam)
        inf(torch.rand(1, 3, 4, 4), lambda x, timesteps: torch.zeros_like(x[:, :3]), sigma=0.01)
        ts = logsnr_timesteps(sch.alphas_cumprod, 4)
        if lam == 0:
            assert dc.seen == [None] * len(ts)
        else:
            want = [np.sqrt(0.05**2 + lam**2 * float((1 - abar[t]) / abar[t])) for t in ts]
            np.testing.assert_allclose(dc.seen, want, rtol=1e-6)
            assert dc.seen[0] > 100 and dc.seen[-1] == pytest.approx(0.05, rel=0.1)
