"""A protocol-free Diffusor conditioned on the classical fit and its Cramér-Rao bound (issue 21, design (b)).

Known answers: random acquisitions stay inside the issue's ranges and are reproducible; a noise-free
random-acquisition item is exactly the signal model of its own protocol at its labels; the CRLB channel at
facts.md's reference voxel (46 ms at T1 1 s, SNR 50, paper TIs); the condition does not change with the
image units; the card's schema; a tiny fit + CRLB bundle mapping protocols it has no weights for through
`qmri map --variant crlb`, and training through `monai.bundle run training`.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_runs import bundle_inference, tiny_training

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "diffusor"


def test_random_protocols_stay_in_the_issue_ranges():
    """3-12 TIs in 0.02-5 s, TR >= 1 s (or full recovery), ETL 1-64, every echo train ending before the next
    inversion (the Protocol checks it); the same seed gives the same protocol; full recovery about 20 % of
    the time (500 draws: within 4 binomial stds)."""
    from custom_components.physics.protocol import RANDOM_PROTOCOL_RANGES, random_protocol

    ps = [random_protocol(np.random.default_rng(i)) for i in range(500)]
    assert random_protocol(np.random.default_rng(7)) == ps[7]
    for p in ps:
        assert 3 <= p.n_images <= 12 and 0.02 <= p.tis.min() and p.tis.max() <= 5.0
        assert 1 <= p.echo_train_length <= 64
        if p.repetition_time_s is not None:
            assert np.min(p.repetition_time_s) >= 1.0
    full = np.mean([p.repetition_time_s is None for p in ps])
    q = RANDOM_PROTOCOL_RANGES["p_full_recovery"]
    assert abs(full - q) <= 4 * np.sqrt(q * (1 - q) / 500)
    assert len({p.n_images for p in ps}) == 10 and any(isinstance(p.repetition_time_s, tuple) for p in ps)


def test_random_acquisition_items_follow_their_own_protocol():
    """Without noise, blurring or Gibbs, each item's images are |S(label; its protocol)| with the full
    finite-TR signal model: the labels are physical maps (the output convention) for every protocol."""
    from custom_components.data.synthesis import SyntheticIRDataset
    from custom_components.physics.protocol import get_protocol
    from custom_components.physics.signal_model import signed_signal

    ds = SyntheticIRDataset(protocol="random", n_slices=3, realisations=2, matrix=(32, 32), scene="mixed",
                            effects={"noise": "none", "echo_train": False})
    sizes = set()
    for i in range(len(ds)):
        item = ds[i]
        p = get_protocol(item["protocol"])
        sizes.add(p.n_images)
        assert item["image"].shape[0] == p.n_images
        m = item["mask"][0] > 0
        model = signed_signal(item["label"].double(), p, dim=0).abs()
        np.testing.assert_allclose(item["image"][:, m].numpy(), model[:, m].numpy(), rtol=2e-5, atol=2e-6)
    assert len(sizes) > 1  # the items do not share one protocol
    from custom_components.data.synthesis import SynthesisConfig, write_dataset
    from custom_components.io import InputError

    with pytest.raises(InputError, match="protocol per item"):
        write_dataset(Path("/nonexistent/never-written"), SynthesisConfig(protocol="random", n_slices=1))


def test_crlb_channel_at_the_reference_voxel():
    """facts.md: T1 1 s, PD 1, B 2, paper TIs, SNR 50 -> CRLB(T1) = 46 ms, so the T1 channel is
    2 (log10(0.046) + 3) / 4 - 1; PD and sigma scaled together give the same channels; no signal -> 1."""
    from custom_components.methods.scaling import CRLB_LOG10_RANGE, encode_crlb
    from custom_components.physics.protocol import get_protocol
    from custom_components.physics.signal_model import crlb

    p = get_protocol("paper")
    maps = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64).reshape(3, 1, 1).repeat(1, 2, 2)
    maps[:, 1, 1] = 0.0  # background
    y = encode_crlb(maps, p, 1 / 50)
    lo, hi = CRLB_LOG10_RANGE
    exact = crlb(maps[:, 0, 0], p, 1 / 50)
    assert float(exact[0]) == pytest.approx(0.046, abs=0.001)
    for k in range(3):
        want = 2 * (np.log10(float(exact[k]) / float(maps[k, 0, 0])) - lo) / (hi - lo) - 1
        assert float(y[k, 0, 0]) == pytest.approx(want, abs=1e-6)
    assert float(y[0, 0, 0]) == pytest.approx(2 * (np.log10(0.046) + 3) / 4 - 1, abs=0.01)
    assert torch.all(y[:, 1, 1] == 1.0)
    scaled = maps.clone()
    scaled[1] *= 7.0
    torch.testing.assert_close(encode_crlb(scaled, p, 7 / 50), y)
    with pytest.raises(ValueError, match="noise std"):
        encode_crlb(maps, p, None)


def test_condition_does_not_depend_on_the_image_units():
    """Images x 3 and sigma x 3: the same CRLB channels and the same fit in network space (the scale takes
    the units), the scale 3 times larger."""
    from custom_components.bundle.transforms import fit_crlb_condition
    from custom_components.data.synthesis import Effects, nist_twin
    from custom_components.physics.protocol import get_protocol

    p = get_protocol("nist15_variable_tr")
    tw = nist_twin(p, snr=60, effects=Effects(echo_train=False), matrix=(48, 48))
    img = torch.as_tensor(tw["image"], dtype=torch.float32)
    s1, info1, fit1, _ = fit_crlb_condition(img, p, 1 / 60)
    s3, info3, fit3, _ = fit_crlb_condition(3 * img, p, 3 / 60)
    assert float(s3) == pytest.approx(3 * float(s1), rel=1e-4)
    torch.testing.assert_close(info3, info1, atol=1e-4, rtol=0)
    torch.testing.assert_close(fit3, fit1, atol=1e-4, rtol=0)


def test_crlb_card_schema():
    from custom_components.bundle.training import check_weights_card
    from custom_components.io import InputError

    ok = {"method": "diffusor", "n_images": 0, "fit_condition": True, "fit_residual": True, "crlb_condition": True}
    assert check_weights_card(ok)["crlb_condition"] is True
    for bad, msg in (({**ok, "n_images": 7}, "0 for a protocol-free"), ({**ok, "fit_condition": False}, "fit_condition must be true"),
                     ({"fit_condition": True, "crlb_condition": "yes"}, "true or false")):
        with pytest.raises(InputError, match=msg):
            check_weights_card(bad)


def test_network_sees_only_its_condition_channels():
    """network_channels k: the network gets [x, the last k input channels]; the first ones (the images)
    reach the samples only through data consistency."""
    from custom_components.methods.inferers import EnsembleDDPMInferer, ddpm_scheduler

    seen = []

    def net(x, timesteps):
        seen.append(x[:, 3:].clone())
        return torch.zeros_like(x[:, :3])

    inputs = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1, 1).repeat(1, 1, 4, 4)
    EnsembleDDPMInferer(ddpm_scheduler(), n_samples=2, steps=2, network_channels=6, residual=True)(inputs, net)
    assert all(s.shape[1] == 6 and torch.equal(s[0, :, 0, 0], torch.arange(4, 10, dtype=torch.float32)) for s in seen)
    with pytest.raises(ValueError, match="network_channels"):
        EnsembleDDPMInferer(ddpm_scheduler(), network_channels=-1)


def _tiny_crlb_bundle(root: Path) -> Path:
    from custom_components.bundle.training import write_weights_card
    from custom_components.methods.networks import diffusion_unet

    shutil.copytree(BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    torch.manual_seed(0)
    net = diffusion_unet("tiny", n_images=0, fit_condition=True, fit_residual=True, n_info=3)
    torch.save(net.state_dict(), root / "models" / "model_crlb.pt")
    write_weights_card(root / "models" / "model_crlb.json", method="diffusor", n_images=0, network_preset="tiny",
                       fit_condition=True, fit_residual=True, crlb_condition=True, prediction_type="v_prediction")
    return root


def test_crlb_weights_map_protocols_without_their_own_weights(tmp_path):
    """One tiny fit + CRLB model maps the in-vivo 9-TI and the variable-TR NIST protocols with --variant crlb
    (never chosen unasked since 0.10.1): the sidecars name the weights and say crlb_condition, the maps are finite;
    a series without background gets its noise level from the fit's residuals, and with 3 TIs (no residual
    degree of freedom) it is refused with nothing written; the bundle's inference.json refuses such weights."""
    import nibabel as nib

    from custom_components.cli import main
    from custom_components.data.synthesis import Effects, nist_twin
    from custom_components.io import InputError, save_series
    from custom_components.mapping.learned import choose_weights
    from custom_components.physics.protocol import get_protocol

    root = _tiny_crlb_bundle(tmp_path / "bundle")
    for name in ("invivo9", "nist15_variable_tr"):
        proto = get_protocol(name)
        with pytest.raises(InputError, match="or --variant crlb \\(experimental"):  # never chosen unasked (0.10.1)
            choose_weights(root, "diffusor", proto)
        assert choose_weights(root, "diffusor", proto, variant="crlb")[0].name == "model_crlb.pt"
        with pytest.raises(InputError, match="no diffusor"):  # the bundle's inference.json takes no such weights
            choose_weights(root, "diffusor", proto, protocol_free=False)
        tw = nist_twin(proto, snr=50, effects=Effects(echo_train=False), matrix=(32, 32))
        save_series(tmp_path / f"{name}.nii.gz", tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), proto)
        out = tmp_path / f"m_{name}"
        assert main(["map", str(tmp_path / f"{name}.nii.gz"), "--out", str(out), "--method", "diffusor",
                     "--bundle", str(root), "--variant", "crlb", "--samples", "2", "--steps", "2", "--quiet"]) == 0
        side = json.loads((out / "T1map.json").read_text())
        assert side["Fit"]["crlb_condition"] is True and side["Fit"]["map_prior"] is False
        assert side["Weights"]["File"] == "model_crlb.pt" and side["Weights"]["Card"]["crlb_condition"] is True
        assert side["DataConsistency"]["model"] == "finite TR with the echo train's readout"  # physical labels
        assert np.isfinite(nib.load(out / "T1map.nii.gz").get_fdata()).all()
    # no background (zeroed outside the phantom, as some scanners write it) and no --sigma: the noise level comes
    # from the fit's residuals (the sidecar says so); with 3 TIs there is no residual degree of freedom: refused,
    # nothing written
    proto = get_protocol("invivo9")
    tw = nist_twin(proto, snr=50, effects=Effects(echo_train=False), matrix=(64, 64))
    zeroed = np.where(tw["mask"][None], tw["image"], 0.0)
    save_series(tmp_path / "inner.nii.gz", zeroed.transpose(1, 2, 0)[:, :, None, :], np.eye(4), proto)
    assert main(["map", str(tmp_path / "inner.nii.gz"), "--out", str(tmp_path / "mi"), "--method", "diffusor",
                 "--bundle", str(root), "--variant", "crlb", "--samples", "1", "--steps", "1", "--quiet"]) == 0
    side = json.loads((tmp_path / "mi" / "T1map.json").read_text())
    assert "residuals" in side["Fit"]["sigma_source"] and side["Fit"]["sigma"] == pytest.approx(1 / 50, rel=0.25)
    three = get_protocol({"inversion_times_s": [0.1, 0.5, 1.5]})
    tw3 = nist_twin(three, snr=50, effects=Effects(echo_train=False), matrix=(64, 64))
    zeroed = np.where(tw3["mask"][None], tw3["image"], 0.0)
    save_series(tmp_path / "three.nii.gz", zeroed.transpose(1, 2, 0)[:, :, None, :], np.eye(4), three)
    assert main(["map", str(tmp_path / "three.nii.gz"), "--out", str(tmp_path / "mf"), "--method", "diffusor",
                 "--bundle", str(root), "--variant", "crlb", "--samples", "1", "--steps", "1", "--quiet"]) == 2
    assert not (tmp_path / "mf").exists()
    r = bundle_inference(root, root / "models" / "model_crlb.pt", tmp_path / "invivo9.nii.gz", tmp_path / "b")
    assert r.returncode != 0 and "--variant prior|crlb" in r.stdout + r.stderr and not (tmp_path / "b").exists()


def test_train_crlb_config_through_monai_bundle(tmp_path):
    """`monai.bundle run training` with train.json + train_crlb.json: a tiny model trains on random
    acquisitions; its card says crlb_condition with no images, and its input has 3 + 3 + 3 channels."""
    out, card, state = tiny_training(tmp_path / "b", "train_crlb.json", "model_crlb", "--init_from", "")
    assert "val_t1_mape" in out
    assert card["crlb_condition"] is True and card["n_images"] == 0 and "protocol" not in card
    assert state["conv_in.conv.weight"].shape[1] == 9


def test_warm_start_from_fit_conditioned_weights_zeroes_the_crlb_channels(tmp_path):
    """train_crlb.json starts from the paper's fit-conditioned weights: the noisy-map and fit channels of the
    first convolution are copied, the CRLB channels (which replace the 7 image channels) start at zero, so
    the warm-started network first computes what the fit-conditioned one computes without its images."""
    from custom_components.bundle.training import init_from_weights, write_weights_card
    from custom_components.methods.networks import diffusion_unet

    torch.manual_seed(0)
    old = diffusion_unet("tiny", n_images=7, fit_condition=True, fit_residual=True)
    torch.save(old.state_dict(), tmp_path / "fc.pt")
    write_weights_card(tmp_path / "fc.json", method="diffusor", n_images=7, network_preset="tiny", fit_condition=True,
                       fit_residual=True)
    new = diffusion_unet("tiny", n_images=0, fit_condition=True, fit_residual=True, n_info=3)
    assert init_from_weights(str(tmp_path / "fc.pt"), new, input_layout=(3, 3, 3), middle="zeros")
    w_old, w_new = old.state_dict()["conv_in.conv.weight"], new.state_dict()["conv_in.conv.weight"]
    assert w_new.shape[1] == 9
    assert torch.equal(w_new[:, :3], w_old[:, :3]) and torch.equal(w_new[:, -3:], w_old[:, -3:])
    assert torch.count_nonzero(w_new[:, 3:6]) == 0
    with pytest.raises(ValueError, match="middle"):
        init_from_weights(str(tmp_path / "fc.pt"), new, input_layout=(3, 3, 3), middle="copy")
