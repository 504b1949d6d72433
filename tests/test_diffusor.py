"""The qMRI Diffusor: scaling, samplers against a known posterior, and the bundle end to end (tiny)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.methods.inferers import (EnsembleDDPMInferer, ddim_sample, ddim_timesteps, ddpm_sample, ddpm_scheduler,
                                        dpmpp2m_sample, ensemble_statistics, frame_transform, logsnr_timesteps,
                                        member_frames, target_for, to_x0_eps)
from custom_components.methods.scaling import QMRIScaled, decode_maps, encode_maps

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "diffusor"
TINY = ["--network_preset", "tiny", "--n_train_slices", "2", "--n_val_slices", "1", "--crop_size", "32",
        "--val_interval", "1", "--cache_workers", "0", "--torch_threads", "1"]


def test_scaling_round_trip_and_range():
    g = torch.Generator().manual_seed(0)
    maps = torch.stack([torch.exp(torch.empty(2, 16, 16).uniform_(np.log(0.02), np.log(5.0), generator=g)),
                        torch.rand(2, 16, 16, generator=g) * 1.2, 1.2 + 0.8 * torch.rand(2, 16, 16, generator=g)], dim=1).double()
    s = torch.tensor([0.9, 1.7], dtype=torch.float64)
    y = encode_maps(maps, s)
    assert y.min() >= -1 and y.max() < 1
    np.testing.assert_allclose(decode_maps(y, s).numpy(), maps.numpy(), rtol=1e-9)
    # f(x) = 2 tanh(x) - 1 per parameter after the documented normalisation
    assert encode_maps(torch.tensor([[[[2.0]], [[1.7]], [[2.0]]]], dtype=torch.float64), torch.tensor([1.7], dtype=torch.float64)).flatten().tolist() == \
        pytest.approx([2 * np.tanh(1.0) - 1] * 3)
    t = QMRIScaled(keys=["label"])
    d = t({"image": torch.rand(7, 8, 8) * 3, "label": maps[0].float()})
    # images are divided by the 99.5th percentile of their max over TIs
    assert float(torch.quantile(d["image"].amax(0).flatten(), 0.995)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(t.inverse(d)["label"].numpy(), maps[0].numpy(), rtol=1e-4)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_prediction_targets_are_consistent(ptype):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    abar = torch.tensor(0.3, dtype=torch.float64)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    x0_hat, eps_hat = to_x0_eps(target_for(x0, eps, abar, ptype), xt, abar, ptype)
    np.testing.assert_allclose(x0_hat.numpy(), x0.numpy(), atol=1e-12)
    np.testing.assert_allclose(eps_hat.numpy(), eps.numpy(), atol=1e-12)
    # MONAI's own v (its VPredictionPrepareBatch target) agrees with ours
    sch = ddpm_scheduler(prediction_type="v_prediction")
    t = torch.tensor([300])
    v = sch.get_velocity(x0[None].float(), eps[None].float(), t)
    ours = target_for(x0, eps, sch.alphas_cumprod[300].double(), "v_prediction")
    np.testing.assert_allclose(v[0].numpy(), ours.numpy(), rtol=1e-4, atol=1e-5)


def _gaussian_denoiser(m, s, abar):
    """Exact E[x0 | x_t] for x0 ~ N(m, s^2): the 'sample' prediction of a perfect network."""
    def model(x, t):
        a = abar[t].view(-1, *([1] * (x.ndim - 1)))
        return m + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * m)
    return model


def test_grids():
    ts = ddim_timesteps(1000, 10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and np.all(np.diff(ts) < 0)
    ls = logsnr_timesteps(ddpm_scheduler().alphas_cumprod, 20)
    assert ls[0] == 999 and ls[-1] == 0 and np.all(np.diff(ls) < 0) and len(ls) >= 18


@pytest.mark.parametrize("m,s", [(0.2, 0.1), (-0.3, 0.3)])
def test_samplers_draw_the_known_gaussian_posterior(m, s):
    """Exact denoiser of x0 ~ N(m, s^2): DPM-Solver++(2M) in 20 steps and full DDPM give the right
    mean and spread; DDIM on a linear grid is too narrow with few steps (the documented pitfall)."""
    sch = ddpm_scheduler(prediction_type="sample")
    abar = sch.alphas_cumprod.double()
    model = _gaussian_denoiser(m, s, abar)
    x_T = torch.randn(20000, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = dpmpp2m_sample(model, x_T, sch.alphas_cumprod, 20, "sample")
    assert float(x.mean()) == pytest.approx(m, abs=0.01)
    assert float(x.std()) == pytest.approx(s, rel=0.06)
    x = ddpm_sample(model, x_T, sch, generator=torch.Generator().manual_seed(3))
    assert float(x.mean()) == pytest.approx(m, abs=0.01)
    assert float(x.std()) == pytest.approx(s, rel=0.06)
    x = ddim_sample(model, x_T, sch.alphas_cumprod, 10, "sample")
    assert float(x.mean()) == pytest.approx(m, abs=0.01)
    assert float(x.std()) < 0.8 * s


def test_ensemble_inferer_shapes_padding_and_statistics():
    sch = ddpm_scheduler(prediction_type="sample")
    net = lambda x, timesteps: torch.zeros_like(x[:, :3]) + 0.1  # noqa: E731 - constant x0 prediction
    inf = EnsembleDDPMInferer(sch, n_samples=4, sampler="dpm++2m", steps=5, seed=0)
    out = inf(torch.zeros(2, 7, 30, 22), net)
    assert out.shape == (2, 4, 3, 30, 22) and inf.network_evaluations == 5
    assert torch.allclose(out, torch.full_like(out, 0.1))
    mean, std = ensemble_statistics(out, torch.tensor([1.0, 2.0]))
    np.testing.assert_allclose(mean[0, 0].numpy(), np.arctanh(0.55) * 2.0, rtol=1e-5)  # T1 = 2 s atanh((y+1)/2)
    np.testing.assert_allclose(mean[1, 1].numpy(), np.arctanh(0.55) * 2.0, rtol=1e-5)  # PD scales with s
    assert float(std.abs().max()) == 0
    assert EnsembleDDPMInferer(sch, sampler="ddpm").network_evaluations == 1000


def test_frame_transforms_are_the_eight_symmetries_of_the_grid():
    x = torch.arange(12.0).reshape(1, 3, 4)  # non-square: transposes change the shape
    images = [frame_transform(x, k) for k in range(8)]
    assert len({tuple(im.flatten().tolist()) + tuple(im.shape) for im in images}) == 8  # all distinct
    for k in range(8):
        assert images[k].shape[-2:] == ((4, 3) if k & 4 else (3, 4))
        assert torch.equal(frame_transform(images[k], k, inverse=True), x)
    assert torch.equal(images[1], x.flip(-2)) and torch.equal(images[2], x.flip(-1)) and torch.equal(images[4], x.mT)
    assert member_frames(10, "dihedral") == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert member_frames(5, "flips") == [0, 1, 2, 3, 0] and member_frames(3) == [0, 0, 0]
    with pytest.raises(ValueError, match="symmetry must be one of"):
        EnsembleDDPMInferer(ddpm_scheduler(), symmetry="rotations")
    with pytest.raises(ValueError, match="n_samples must be at least 1"):
        EnsembleDDPMInferer(ddpm_scheduler(), n_samples=0)


@pytest.mark.parametrize("symmetry", ["flips", "dihedral"])
def test_symmetric_ensemble_maps_every_member_back_to_the_input_frame(symmetry):
    """Each member sees the condition in its own frame and its sample is mapped back: a network
    that returns the condition itself gives the condition for every member (non-square, padded
    input); a network with a fixed error pattern in its own frame (a ramp along its columns) gives
    members whose errors are that pattern in each member's frame, and their mean is its average
    over the frames."""
    sch = ddpm_scheduler(prediction_type="sample")
    g = torch.Generator().manual_seed(5)
    cond = torch.rand(2, 7, 10, 6, generator=g) * 2 - 1  # padded to 12 x 8 inside, cropped back
    copy_net = lambda x, timesteps: x[:, 3:6]  # noqa: E731 - x0 = the first 3 condition channels
    n = 2 * {"flips": 4, "dihedral": 8}[symmetry]
    out = EnsembleDDPMInferer(sch, n_samples=n, steps=3, seed=0, symmetry=symmetry)(cond, copy_net)
    assert out.shape == (2, n, 3, 10, 6)
    np.testing.assert_allclose(out.numpy(), cond[:, None, :3].expand_as(out).numpy(), atol=1e-6)

    def ramp_net(x, timesteps):  # a fixed pattern of the frame the network sees: 0.01 x column index
        return x[:, 3:6] + 0.01 * torch.arange(x.shape[-1], dtype=x.dtype)
    flat = torch.zeros(1, 7, 8, 8)
    out = EnsembleDDPMInferer(sch, n_samples=n, steps=3, seed=0, symmetry=symmetry)(flat, ramp_net)[0, :, 0]
    ramp = 0.01 * torch.arange(8.0).expand(8, 8)
    for j, k in enumerate(member_frames(n, symmetry)):
        np.testing.assert_allclose(out[j].numpy(), frame_transform(ramp, k, inverse=True).numpy(), atol=1e-6)
    expected = torch.stack([frame_transform(ramp, k, inverse=True) for k in range(n // 2)]).mean(0)
    np.testing.assert_allclose(out.mean(0).numpy(), expected.numpy(), atol=1e-6)
    if symmetry == "flips":  # a column ramp and its mirror image average to a constant
        np.testing.assert_allclose(out.mean(0).numpy(), 0.035, atol=1e-6)


def test_symmetry_none_is_the_plain_ensemble_and_frames_share_the_initial_noise():
    """symmetry "none" draws exactly the samples of the plain ensemble; with an equivariant network
    (here: a pointwise one) the frames change nothing, because the initial noise is drawn in the
    input's frame and transformed with the condition."""
    sch = ddpm_scheduler(prediction_type="sample")
    denoise = _gaussian_denoiser(0.1, 0.2, sch.alphas_cumprod.double())
    net = lambda x, timesteps: denoise(x.double()[:, :3], timesteps).float() + 0.1 * x[:, 3:6]  # noqa: E731 - pointwise
    cond = torch.rand(1, 7, 8, 12, generator=torch.Generator().manual_seed(6))
    kw = dict(n_samples=8, sampler="dpm++2m", steps=6, seed=3)
    plain = EnsembleDDPMInferer(sch, **kw)(cond, net)
    assert torch.equal(plain, EnsembleDDPMInferer(sch, symmetry="none", **kw)(cond, net))
    for symmetry in ("flips", "dihedral"):
        np.testing.assert_allclose(EnsembleDDPMInferer(sch, symmetry=symmetry, **kw)(cond, net).numpy(), plain.numpy(),
                                   atol=1e-5)


def test_fit_residual_training_target_and_sampling():
    """fit_residual: training diffuses label - fit (the last 3 condition channels); sampling adds the
    fit back. With the exact denoiser of a Gaussian residual N(m, s^2) the ensemble is fit + m with
    spread s; values beyond the data range [-1, 1] are clipped after the sum."""
    from custom_components.methods.inferers import ConditionalDiffusionPrepareBatch
    from custom_components.methods.networks import diffusion_unet

    sch = ddpm_scheduler(prediction_type="sample")
    fit = torch.tensor([-0.5, 0.2, 0.9]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    cond = torch.cat([torch.rand(2, 7, 4, 4), fit], dim=1)
    label = fit + 0.05
    pb = ConditionalDiffusionPrepareBatch(1000, sch, residual=True)
    x0, target, _, kw = pb({"label": label, "cond": cond})
    np.testing.assert_allclose(x0.numpy(), 0.05, atol=1e-6)  # the residual, not the label
    np.testing.assert_allclose(target.numpy(), 0.05, atol=1e-6)  # "sample" prediction: the target is x0
    assert torch.equal(kw["condition"], cond)

    m, s = 0.04, 0.05  # (spreads near the schedule's floor sqrt(1 - abar_0) = 0.01 come out narrower)
    denoise = _gaussian_denoiser(m, s, sch.alphas_cumprod.double())
    net = lambda x, timesteps: denoise(x.double()[:, :3], timesteps).float()  # noqa: E731 - exact residual denoiser
    inf = EnsembleDDPMInferer(sch, n_samples=400, sampler="dpm++2m", steps=20, seed=0, residual=True)
    out = inf(torch.cat([torch.zeros(1, 7, 4, 4), fit[:1]], dim=1), net)[0]  # (S, 3, H, W)
    np.testing.assert_allclose(out[:, :2].mean(dim=0).numpy(), (fit[0, :2] + m).numpy(), atol=0.012)  # 5 SE per pixel
    assert float((out[:, :2].mean(dim=0) - fit[0, :2]).mean()) == pytest.approx(m, abs=0.002)  # pooled
    assert float(out[:, :2].std(dim=0).mean()) == pytest.approx(s, rel=0.08)  # pooled over 32 pixel-channels
    assert float(out[:, 2].max()) <= 1.0 and float(out[:, 2].mean()) > 0.9  # 0.9 + 0.04 +- 0.05, clipped at 1
    with pytest.raises(ValueError, match="fit_residual needs fit_condition"):
        diffusion_unet("tiny", fit_residual=True)


def _run(args, cwd=REPO, timeout=600):
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny Diffusor trained for 2 epochs through `monai.bundle run training`, then resumed to 3."""
    root = tmp_path_factory.mktemp("bundle")
    shutil.copytree(BUNDLE / "configs", root / "configs")
    log = _run(["training", "--config_file", str(root / "configs" / "train.json"), "--bundle_root", str(root),
                "--max_epochs", "2", "--tracking", "mlflow", *TINY])
    assert "val_t1_mape" in log
    # MLflow: a local SQLite store with the loss, the validation metrics, parameters and the merged config
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    assert {"train_loss", "val_t1_mape", "val_pd_mape"} <= set(runs[0].data.metrics) and runs[0].data.params
    assert any(a.path.startswith("config") for a in client.list_artifacts(runs[0].info.run_id))
    state = torch.load(root / "models" / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]  # 2 epochs done
    log2 = _run(["training", "--config_file", str(root / "configs" / "train.json"), "--bundle_root", str(root),
                 "--max_epochs", "3", *TINY])
    state = torch.load(root / "models" / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 3 * state["trainer"]["epoch_length"] and state["trainer"]["max_epochs"] == 3
    assert "Epoch: 1/3" not in log2  # resumed: epochs 1-2 were not run again
    return root


def test_train_resume_and_infer_through_monai_bundle(trained_tiny, tmp_path):
    root = trained_tiny
    assert (root / "models" / "model.pt").exists()
    from custom_components.data.synthesis import Effects, nist_twin
    from custom_components.io import save_series
    from custom_components.physics.protocol import paper_protocol
    tw = nist_twin("paper", snr=50, effects=Effects(echo_train=False), matrix=(48, 48), fov_mm=250.0)
    save_series(tmp_path / "twin.nii.gz", tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), paper_protocol())
    _run(["--config_file", str(root / "configs" / "inference.json"), "--bundle_root", str(root), "--network_preset", "tiny",
          "--input_path", str(tmp_path / "twin.nii.gz"), "--output_dir", str(tmp_path / "maps"), "--n_samples", "3", "--steps", "2"])
    for stem in ("T1map", "PDmap", "InvEffmap", "T1map_std", "PDmap_std", "InvEffmap_std"):
        img = nib.load(tmp_path / "maps" / f"{stem}.nii.gz")
        assert img.shape == (48, 48, 1) and np.isfinite(img.get_fdata()).all()
        side = json.loads((tmp_path / "maps" / f"{stem}.json").read_text())
        assert side["Method"] == "diffusor" and side["Fit"]["n_samples"] == 3
    assert nib.load(tmp_path / "maps" / "T1map_std.nii.gz").get_fdata().max() > 0


def _same_outputs(a: Path, b: Path, rtol=1e-4, atol=1e-5) -> set:
    """Both folders hold the same files, with equal maps and the same weights named in every sidecar."""
    names = {p.name for p in a.iterdir()}
    assert names == {p.name for p in b.iterdir()}, (sorted(names), sorted(p.name for p in b.iterdir()))
    for name in names:
        if name.endswith(".nii.gz"):
            np.testing.assert_allclose(nib.load(a / name).get_fdata(), nib.load(b / name).get_fdata(), rtol=rtol, atol=atol,
                                       err_msg=name)
        else:
            sa, sb = (json.loads((d / name).read_text()) for d in (a, b))
            assert sa["Weights"]["SHA256"] == sb["Weights"]["SHA256"] and sa["Weights"]["Card"] == sb["Weights"]["Card"]
            assert sa["Protocol"] == sb["Protocol"] and sa["Method"] == sb["Method"]
    return names


def test_bundle_inference_and_qmri_map_are_one_runner(trained_tiny, tmp_path):
    """`monai.bundle run` with inference.json and `qmri map` write the same files (Residualmap and
    ResidualFlag included) with equal maps for the same input and seed: one runner."""
    from custom_components.cli import main
    from custom_components.data.synthesis import Effects, nist_twin
    from custom_components.io import save_series
    from custom_components.physics.protocol import paper_protocol

    tw = nist_twin("paper", snr=50, effects=Effects(echo_train=False), matrix=(32, 32), fov_mm=250.0)
    save_series(tmp_path / "twin.nii.gz", tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), paper_protocol())
    _run(["--config_file", str(BUNDLE / "configs" / "inference.json"), "--bundle_root", str(trained_tiny),
          "--network_preset", "tiny", "--input_path", str(tmp_path / "twin.nii.gz"), "--output_dir", str(tmp_path / "bundle"),
          "--n_samples", "2", "--steps", "2"])
    assert main(["map", str(tmp_path / "twin.nii.gz"), "--out", str(tmp_path / "cli"), "--method", "diffusor",
                 "--bundle", str(trained_tiny), "--samples", "2", "--steps", "2", "--quiet"]) == 0
    names = _same_outputs(tmp_path / "bundle", tmp_path / "cli")
    assert {"Residualmap.nii.gz", "ResidualFlag.nii.gz", "T1map_std.nii.gz"} <= names
    side = json.loads((tmp_path / "bundle" / "ResidualFlag.json").read_text())
    assert side["Weights"]["File"] == "model.pt" and side["Fit"]["n_samples"] == 2


def test_check_properties(trained_tiny):
    from monai.bundle import ConfigWorkflow

    for cfg, kind in (("train.json", "train"), ("inference.json", "infer")):
        wf = ConfigWorkflow(config_file=str(BUNDLE / "configs" / cfg), workflow_type=kind,
                            meta_file=str(BUNDLE / "configs" / "metadata.json"), logging_file=str(BUNDLE / "configs" / "logging.conf"),
                            bundle_root=str(trained_tiny),
                            **({"network_preset": "tiny", "n_train_slices": 2, "n_val_slices": 1, "cache_workers": 0} if kind == "train" else {}))
        wf.initialize()
        assert wf.check_properties() in (None, [])


def test_qmri_map_with_diffusor_and_protocol_check(trained_tiny, tmp_path, capsys):
    from custom_components.cli import main
    from custom_components.io import save_series
    from custom_components.physics.protocol import nist_15t_protocol, paper_protocol
    from custom_components.data.synthesis import Effects, nist_twin

    root = trained_tiny
    inf = json.loads((root / "configs" / "inference.json").read_text())
    inf["network_preset"] = "tiny"
    (root / "configs" / "inference.json").write_text(json.dumps(inf))
    tw = nist_twin("paper", snr=50, effects=Effects(echo_train=False), matrix=(40, 40))
    save_series(tmp_path / "twin.nii.gz", tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), paper_protocol())
    assert main(["map", str(tmp_path / "twin.nii.gz"), "--out", str(tmp_path / "m"), "--method", "diffusor",
                 "--bundle", str(root), "--samples", "2", "--steps", "2", "--quiet"]) == 0
    assert (tmp_path / "m" / "T1map_std.nii.gz").exists()
    # another protocol: a clear one-line error, no output
    tw2 = nist_twin("nist15", snr=50, effects=Effects(echo_train=False), matrix=(40, 40))
    save_series(tmp_path / "n15.nii.gz", tw2["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), nist_15t_protocol())
    capsys.readouterr()
    assert main(["map", str(tmp_path / "n15.nii.gz"), "--out", str(tmp_path / "m2"), "--method", "diffusor",
                 "--bundle", str(root), "--quiet"]) == 2
    assert "train a model for this protocol" in capsys.readouterr().err and not (tmp_path / "m2").exists()


def test_weights_card_carries_protocol_and_variant(trained_tiny, tmp_path, capsys):
    """Training writes models/model.json beside the weights; `qmri map --weights W` maps with W's own
    protocol, image count and variant (here: a 6-TI nist15 network, fit residual), and refuses others."""
    from custom_components.cli import main
    from custom_components.io import save_series
    from custom_components.mapping.learned import BundleMapper
    from custom_components.methods.networks import diffusion_unet
    from custom_components.physics.protocol import nist_15t_protocol, paper_protocol
    from custom_components.data.synthesis import Effects, nist_twin
    from custom_components.bundle.training import read_weights_card, write_weights_card

    card = read_weights_card(trained_tiny / "models" / "model.pt")
    assert card["method"] == "diffusor" and card["network_preset"] == "tiny" and card["fit_condition"] is False
    assert card["protocol"]["inversion_times_s"] == list(paper_protocol().inversion_times_s)
    torch.save(diffusion_unet("tiny", n_images=6, fit_condition=True).state_dict(), tmp_path / "n15.pt")
    write_weights_card(tmp_path / "n15.json", method="diffusor", protocol="nist15", n_images=6, network_preset="tiny",
                       fit_condition="true", fit_residual=True)
    m = BundleMapper(trained_tiny, tmp_path / "n15.pt", {"n_samples": 2, "steps": 2})
    assert m.fit_condition and m.fit_residual and m.inferer.residual and m.protocol.n_images == 6
    tw = nist_twin("nist15", snr=50, effects=Effects(echo_train=False), matrix=(40, 40))
    save_series(tmp_path / "scan15.nii.gz", tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), nist_15t_protocol())
    assert main(["map", str(tmp_path / "scan15.nii.gz"), "--out", str(tmp_path / "m"), "--method", "diffusor", "--bundle",
                 str(trained_tiny), "--weights", str(tmp_path / "n15.pt"), "--samples", "2", "--steps", "2", "--quiet"]) == 0
    assert (tmp_path / "m" / "T1map_std.nii.gz").exists()
    tw = nist_twin("paper", snr=50, effects=Effects(echo_train=False), matrix=(40, 40))
    save_series(tmp_path / "p.nii.gz", tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), paper_protocol())
    capsys.readouterr()
    assert main(["map", str(tmp_path / "p.nii.gz"), "--out", str(tmp_path / "m2"), "--method", "diffusor", "--bundle",
                 str(trained_tiny), "--weights", str(tmp_path / "n15.pt"), "--quiet"]) == 2
    assert "train a model for this protocol" in capsys.readouterr().err and not (tmp_path / "m2").exists()
    # a card of another method, or an unreadable one: one line, exit 2
    write_weights_card(tmp_path / "n15.json", method="resnet", protocol="nist15", n_images=6, network_preset="tiny")
    assert main(["map", str(tmp_path / "scan15.nii.gz"), "--out", str(tmp_path / "m3"), "--method", "diffusor", "--bundle",
                 str(trained_tiny), "--weights", str(tmp_path / "n15.pt"), "--quiet"]) == 2
    (tmp_path / "n15.json").write_text("{not json")
    assert main(["map", str(tmp_path / "scan15.nii.gz"), "--out", str(tmp_path / "m3"), "--method", "diffusor", "--bundle",
                 str(trained_tiny), "--weights", str(tmp_path / "n15.pt"), "--quiet"]) == 2
    assert "unreadable weights card" in capsys.readouterr().err and not (tmp_path / "m3").exists()


def test_init_from_weights(tmp_path):
    from custom_components.methods.networks import diffusion_unet
    from custom_components.bundle.training import init_from_weights

    a, b, c = (diffusion_unet("tiny") for _ in range(3))
    torch.save(a.state_dict(), tmp_path / "w.pt")
    assert init_from_weights(str(tmp_path / "w.pt"), b, c) and not init_from_weights(None, b)
    for net in (b, c):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), net.state_dict().values()))


def test_init_from_weights_across_protocols(tmp_path):
    """A 7-TI fit-conditioned network warm-starts a 6-TI one: all tensors but the input conv are copied,
    the noisy-map and fit channels keep their weights, and for images constant over TI the first
    convolution gives the same response (the summed image weight is preserved)."""
    from custom_components.methods.networks import diffusion_unet
    from custom_components.bundle.training import init_from_weights

    torch.manual_seed(0)
    old = diffusion_unet("tiny", n_images=7, fit_condition=True)
    new = diffusion_unet("tiny", n_images=6, fit_condition=True)
    torch.save(old.state_dict(), tmp_path / "w7.pt")
    with pytest.raises(RuntimeError):
        init_from_weights(str(tmp_path / "w7.pt"), new)  # without a layout, shapes must match
    assert init_from_weights(str(tmp_path / "w7.pt"), new, input_layout=(3, 6, 3))
    so, sn = old.state_dict(), new.state_dict()
    changed = [k for k in so if so[k].shape != sn[k].shape]
    assert len(changed) == 1 and sn[changed[0]].shape[1] == 12
    assert all(torch.equal(so[k], sn[k]) for k in so if k not in changed)
    wo, wn = so[changed[0]], sn[changed[0]]
    assert torch.equal(wo[:, :3], wn[:, :3]) and torch.equal(wo[:, -3:], wn[:, -3:])
    conv = changed[0].rsplit(".", 1)[0]
    x_old = torch.cat([torch.randn(1, 3, 8, 8), torch.full((1, 7, 8, 8), 0.7), torch.randn(1, 3, 8, 8)], 1)
    x_new = torch.cat([x_old[:, :3], torch.full((1, 6, 8, 8), 0.7), x_old[:, -3:]], 1)
    f_old, f_new = old.get_submodule(conv), new.get_submodule(conv)
    torch.testing.assert_close(f_old(x_old), f_new(x_new), rtol=1e-5, atol=1e-5)


def test_init_from_weights_refuses_another_condition_variant(tmp_path):
    """Images-only weights (3 + 7 input channels) cannot warm-start a fit-conditioned network (3 + 7 + 3):
    without the card the channel count alone would map TIs onto the fit channels."""
    from custom_components.io import InputError
    from custom_components.methods.networks import diffusion_unet
    from custom_components.bundle.training import init_from_weights, write_weights_card

    old = diffusion_unet("tiny", n_images=7, fit_condition=False)
    torch.save(old.state_dict(), tmp_path / "w.pt")
    write_weights_card(tmp_path / "w.json", method="diffusor", protocol="paper", n_images=7, network_preset="tiny",
                       fit_condition=False)
    new = diffusion_unet("tiny", n_images=7, fit_condition=True)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    with pytest.raises(InputError, match="fit_condition=False, this network has fit_condition=True"):
        init_from_weights(str(tmp_path / "w.pt"), new, input_layout=(3, 7, 3))
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())  # untouched


def test_mapper_detects_fit_conditioned_weights(trained_tiny, tmp_path):
    from custom_components.mapping.learned import DiffusorMapper
    from custom_components.methods.networks import diffusion_unet

    torch.save(diffusion_unet("tiny", fit_condition=True).state_dict(), tmp_path / "fc.pt")
    m = DiffusorMapper(trained_tiny, tmp_path / "fc.pt", {"network_preset": "tiny", "n_samples": 2, "steps": 2})
    assert m.fit_condition
    mean, std = m.map_slice(np.random.default_rng(0).random((7, 16, 16)) + 0.1)
    assert mean.shape == (3, 16, 16) and std.shape == (3, 16, 16)
    assert not DiffusorMapper(trained_tiny, trained_tiny / "models" / "model.pt", {"network_preset": "tiny"}).fit_condition


def test_autocast_dtype_auto_uses_bf16_only_where_the_device_computes_it():
    from custom_components.methods.inferers import ConditionalDiffusionInferer, ddpm_scheduler, resolve_autocast_dtype

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
    for off in (None, "none", "None", "float32"):
        assert resolve_autocast_dtype(off) is None
    assert resolve_autocast_dtype("bfloat16") is torch.bfloat16 and resolve_autocast_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="autocast_dtype must be"):
        ConditionalDiffusionInferer(ddpm_scheduler(), autocast_dtype="int8")


def test_sampler_seed_override(trained_tiny):
    """``seed`` sets the ensemble's initial noise: the default (the bundle's seed 0) is reproducible,
    seed 0 equals it, another seed gives other samples; the deterministic methods refuse it."""
    from custom_components.io import InputError, IRSeries
    from custom_components.mapping.learned import map_series_with_bundle
    from custom_components.physics.protocol import paper_protocol
    from custom_components.data.synthesis import Effects, nist_twin

    root = trained_tiny
    inf = json.loads((root / "configs" / "inference.json").read_text())
    inf["network_preset"] = "tiny"
    (root / "configs" / "inference.json").write_text(json.dumps(inf))
    tw = nist_twin("paper", snr=50, effects=Effects(echo_train=False), matrix=(24, 24))
    series = IRSeries(tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), paper_protocol(), "twin")
    run = lambda **kw: map_series_with_bundle(series, bundle_dir=root, samples=2, steps=2, progress=False, **kw).maps["T1"]
    a, b, c, d = run(), run(), run(seed=0), run(seed=1)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.allclose(a, d)
    # the bundle draws its members in the 8 frames of the grid by default; "none" is another ensemble
    res = map_series_with_bundle(series, bundle_dir=root, samples=2, steps=2, progress=False)
    assert res.info["symmetry"] == "dihedral"
    e = run(symmetry="none")
    assert not np.allclose(a, e) and np.array_equal(run(symmetry="dihedral"), a)
    with pytest.raises(InputError, match="--symmetry must be one of"):
        map_series_with_bundle(series, bundle_dir=root, symmetry="rotations")
    with pytest.raises(InputError, match="--sampler must be one of dpm"):
        map_series_with_bundle(series, bundle_dir=root, sampler="euler")
    with pytest.raises(InputError, match="--samples must be at least 1"):
        map_series_with_bundle(series, bundle_dir=root, samples=0)
    with pytest.raises(InputError, match="diffusor only"):
        map_series_with_bundle(series, method="resnet", seed=1)
