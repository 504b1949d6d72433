"""The paper's learned baselines: the ResNet and the RIM (physics of the RIM, bundles end to end)."""

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

from custom_components.physics.protocol import get_protocol
from custom_components.methods.rim import (RecurrentInferenceMachine, StepwiseMSELoss, initial_estimate, likelihood_gradient,
                                   to_network_space)
from custom_components.physics.signal_model import jacobian, signal

REPO = Path(__file__).resolve().parents[1]
TINY = ["--network_preset", "tiny", "--n_train_slices", "2", "--n_val_slices", "1", "--crop_size", "32",
        "--val_interval", "1", "--cache_workers", "0", "--torch_threads", "1", "--synthesis#matrix", "[64, 64]"]


def _truth(n=2, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([0.05 + 3 * torch.rand(n, h, w, generator=g), 0.3 + torch.rand(n, h, w, generator=g),
                        1.6 + 0.4 * torch.rand(n, h, w, generator=g)], dim=1).double()


@pytest.mark.parametrize("protocol", ["paper", "nist15"])
def test_rim_likelihood_gradient_equals_the_analytic_one(protocol):
    """sigma^2 d log p / d theta by autograd = sum_n r_n dS_n/d theta with the analytic Jacobian:
    r = y - S (Gaussian) and r = y I1(yS/sigma^2)/I0(yS/sigma^2) - S (Rician)."""
    p = get_protocol(protocol)
    truth = _truth()
    g = torch.Generator().manual_seed(1)
    y = (signal(truth, p, dim=1) + 0.03 * torch.randn(2, p.n_images, 6, 5, generator=g, dtype=torch.float64)).abs()
    eta = initial_estimate(y) * torch.tensor([0.7, 0.9, 0.95], dtype=torch.float64).view(1, 3, 1, 1)
    jac = jacobian(eta, p, dim=1)  # (B, N, H, W, 3)
    s = signal(eta, p, dim=1)
    analytic_g = ((y - s).unsqueeze(-1) * jac).sum(1).permute(0, 3, 1, 2)
    np.testing.assert_allclose(likelihood_gradient(eta, y, p, None, "gaussian").numpy(), analytic_g.numpy(), rtol=1e-10, atol=1e-12)
    sigma = torch.tensor([0.03, 0.08], dtype=torch.float64)
    z = y * s / sigma.view(-1, 1, 1, 1) ** 2
    r = y * torch.special.i1e(z) / torch.special.i0e(z) - s
    analytic_r = (r.unsqueeze(-1) * jac).sum(1).permute(0, 3, 1, 2)
    np.testing.assert_allclose(likelihood_gradient(eta, y, p, sigma, "rician").numpy(), analytic_r.numpy(), rtol=1e-8, atol=1e-10)
    # an unknown noise level (NaN) falls back to the Gaussian likelihood for that item only
    mixed = likelihood_gradient(eta, y, p, torch.tensor([0.03, float("nan")], dtype=torch.float64), "rician")
    np.testing.assert_allclose(mixed[0].numpy(), analytic_r[0].numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(mixed[1].numpy(), analytic_g[1].numpy(), rtol=1e-10, atol=1e-12)
    # at the truth without noise the gradient vanishes
    clean = signal(truth, p, dim=1)
    assert likelihood_gradient(truth, clean, p, None, "gaussian").abs().max() < 1e-10


def test_rim_starts_at_the_documented_guess_and_works_for_any_protocol():
    rim = RecurrentInferenceMachine("paper", "tiny", n_steps=3)
    x = torch.rand(2, 7, 16, 12) + 0.1
    out = rim(x, torch.tensor([0.02, 0.02]), all_steps=True)
    assert out.shape == (2, 3, 3, 16, 12)
    # untrained (zero output layer): every step stays at T1 = 1 s, PD = max signal, B = 2
    start = to_network_space(initial_estimate(x))
    np.testing.assert_allclose(out[:, -1].detach().numpy(), start.numpy(), atol=1e-6)
    # the same weights run on another protocol: only the physics changes
    p15 = get_protocol("nist15")
    out15 = rim(torch.rand(1, p15.n_images, 8, 8) + 0.1, None, protocol=p15)
    assert out15.shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="inversion times"):
        rim(torch.rand(1, 5, 8, 8))
    loss = StepwiseMSELoss()(out.detach(), start)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)


def test_rim_learns_to_improve_its_estimate_over_the_steps():
    """A small RIM trained for 150 Adam steps on synthetic voxels: its error falls from step to step
    on held-out voxels, below the start, and with more steps (the recurrence is doing the work)."""
    p = get_protocol("paper")
    torch.manual_seed(0)

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        t1 = torch.exp(torch.empty(n, 8, 8).uniform_(np.log(0.3), np.log(2.5), generator=g))
        truth = torch.stack([t1, 0.5 + 0.5 * torch.rand(n, 8, 8, generator=g), 1.8 + 0.2 * torch.rand(n, 8, 8, generator=g)], 1)
        y = (signal(truth, p, dim=1) + 0.02 * torch.randn(n, 7, 8, 8, generator=g)).abs()
        return y.float(), to_network_space(truth).float()

    rim = RecurrentInferenceMachine(p, "tiny", n_steps=5, noise="gaussian")
    opt = torch.optim.Adam(rim.parameters(), lr=3e-3)
    loss_fn = StepwiseMSELoss()
    for it in range(150):
        y, lab = batch(8, it)
        opt.zero_grad()
        loss_fn(rim(y, all_steps=True), lab).backward()
        opt.step()
    y, lab = batch(16, 10_000)
    with torch.no_grad():
        steps = rim(y, all_steps=True)
    err = [float(((steps[:, k] - lab) ** 2).mean()) for k in range(steps.shape[1])]
    err0 = float(((to_network_space(initial_estimate(y)) - lab) ** 2).mean())
    assert err[-1] < 0.5 * err0, (err0, err)
    assert err[-1] < err[0]


def _run(args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], capture_output=True, text=True, cwd=REPO,
                       timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module", params=["resnet", "rim"])
def trained(request, tmp_path_factory):
    """A tiny ResNet / RIM trained for 2 epochs through `monai.bundle run training` (MLflow on)."""
    method = request.param
    root = tmp_path_factory.mktemp(method)
    shutil.copytree(REPO / "bundles" / method / "configs", root / "configs")
    log = _run(["training", "--config_file", str(root / "configs" / "train.json"), "--bundle_root", str(root),
                "--max_epochs", "2", "--tracking", "mlflow", *TINY])
    assert "val_t1_mape" in log and (root / "models" / "model.pt").exists()
    assert "train [2/2]" in log  # the epoch's progress bar (Ignite ProgressBar on stderr)
    state = torch.load(root / "models" / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]
    if method == "resnet":  # a finished run is not started again from epoch 0
        log = _run(["training", "--config_file", str(root / "configs" / "train.json"), "--bundle_root", str(root),
                    "--max_epochs", "1", *TINY])
        assert "nothing to train" in log and "Epoch: 1/" not in log
        assert torch.load(root / "models" / "checkpoint_last.pt", weights_only=True)["trainer"]["iteration"] == \
            state["trainer"]["iteration"]
    return method, root


def _twin_file(path, protocol="paper", matrix=40):
    from custom_components.io import save_series
    from custom_components.data.synthesis import Effects, nist_twin

    tw = nist_twin(protocol, snr=50, effects=Effects(echo_train=False), matrix=(matrix, matrix))
    save_series(path, tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), get_protocol(protocol))
    return path


def test_baseline_bundle_infers_through_monai_bundle_and_qmri_map(trained, tmp_path, capsys):
    method, root = trained
    twin = _twin_file(tmp_path / "twin.nii.gz")
    _run(["--config_file", str(root / "configs" / "inference.json"), "--bundle_root", str(root), "--network_preset", "tiny",
          "--input_path", str(twin), "--output_dir", str(tmp_path / "maps")])
    for stem in ("T1map", "PDmap", "InvEffmap"):
        img = nib.load(tmp_path / "maps" / f"{stem}.nii.gz")
        assert img.shape == (40, 40, 1) and np.isfinite(img.get_fdata()).all()
        assert json.loads((tmp_path / "maps" / f"{stem}.json").read_text())["Method"] == method
    assert not (tmp_path / "maps" / "T1map_std.nii.gz").exists()  # deterministic: no uncertainty map

    from custom_components.cli import main
    inf = json.loads((root / "configs" / "inference.json").read_text())
    inf["network_preset"] = "tiny"
    (root / "configs" / "inference.json").write_text(json.dumps(inf))
    assert main(["map", str(twin), "--out", str(tmp_path / "m"), "--method", method, "--bundle", str(root), "--quiet"]) == 0
    side = json.loads((tmp_path / "m" / "T1map.json").read_text())
    assert side["Method"] == method and (tmp_path / "m" / "InvEffmap.nii.gz").exists()
    # one runner: the bundle path and the command line write the same files (the consistency maps
    # included) with the same maps, and name the same weights
    names = {p.name for p in (tmp_path / "maps").iterdir()}
    assert names == {p.name for p in (tmp_path / "m").iterdir()}
    assert {"Residualmap.nii.gz", "ResidualFlag.nii.gz"} <= names
    for name in sorted(n for n in names if n.endswith(".nii.gz")):
        np.testing.assert_allclose(nib.load(tmp_path / "m" / name).get_fdata(), nib.load(tmp_path / "maps" / name).get_fdata(),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    sides = [json.loads((tmp_path / d / "T1map.json").read_text()) for d in ("m", "maps")]
    assert sides[0]["Weights"]["SHA256"] == sides[1]["Weights"]["SHA256"] and sides[0]["Weights"]["File"] == "model.pt"
    # a bundle of another kind is refused with one line
    other = "rim" if method == "resnet" else "resnet"
    capsys.readouterr()
    assert main(["map", str(twin), "--out", str(tmp_path / "mx"), "--method", other, "--bundle", str(root), "--quiet"]) == 2
    assert f"is a {method} bundle" in capsys.readouterr().err and not (tmp_path / "mx").exists()
    n15 = _twin_file(tmp_path / "n15.nii.gz", "nist15")
    capsys.readouterr()
    code = main(["map", str(n15), "--out", str(tmp_path / "m15"), "--method", method, "--bundle", str(root), "--quiet"])
    if method == "rim":  # physics-driven: any protocol
        assert code == 0 and json.loads((tmp_path / "m15" / "T1map.json").read_text())["Protocol"]["InversionTime"][0] == \
            get_protocol("nist15").tis[0]
    else:  # a learned regression maps only its own protocol
        assert code == 2 and "train a model for this protocol" in capsys.readouterr().err and not (tmp_path / "m15").exists()


def test_one_command_trains_a_model_for_another_protocol(trained, tmp_path):
    """`--protocol nist15 --n_images 6 --model_name model_n15` writes models/model_n15.pt with its card
    and its own checkpoint beside the paper model's, which stay as they were; `qmri map --weights`
    then maps that protocol with it (and `qmri compare` finds it by its card)."""
    from custom_components.cli import main
    from custom_components.bundle.training import read_weights_card

    method, root = trained
    before = {p.name: p.read_bytes() for p in (root / "models").glob("*") if p.is_file()}
    _run(["training", "--config_file", str(root / "configs" / "train.json"), "--bundle_root", str(root),
          "--max_epochs", "1", "--protocol", "nist15", "--n_images", "6", "--model_name", "model_n15", *TINY])
    models = root / "models"
    assert (models / "model_n15.pt").exists() and (models / "checkpoint_last_model_n15.pt").exists()
    card = read_weights_card(models / "model_n15.pt")
    assert card["method"] == method and card["protocol"]["inversion_times_s"] == list(get_protocol("nist15").tis)
    for name, data in before.items():
        assert (models / name).read_bytes() == data, name  # the paper model, its card and checkpoint untouched
    n15 = _twin_file(tmp_path / "n15.nii.gz", "nist15")
    assert main(["map", str(n15), "--out", str(tmp_path / "m"), "--method", method, "--bundle", str(root),
                 "--weights", str(models / "model_n15.pt"), "--quiet"]) == 0
    assert nib.load(tmp_path / "m" / "T1map.nii.gz").shape == (40, 40, 1)
    from custom_components.bundle.training import checkpoint_name

    assert checkpoint_name("model") == "checkpoint_last.pt"
    with pytest.raises(ValueError, match="plain file stem"):
        checkpoint_name("../x")


def test_baseline_check_properties(trained):
    from monai.bundle import ConfigWorkflow

    method, root = trained
    configs = REPO / "bundles" / method / "configs"
    for cfg, kind in (("train.json", "train"), ("inference.json", "infer")):
        wf = ConfigWorkflow(config_file=str(configs / cfg), workflow_type=kind, meta_file=str(configs / "metadata.json"),
                            logging_file=str(configs / "logging.conf"), bundle_root=str(root),
                            **({"network_preset": "tiny", "n_train_slices": 2, "n_val_slices": 1, "cache_workers": 0} if kind == "train" else {}))
        wf.initialize()
        assert wf.check_properties() in (None, [])


def test_resnet_exports_to_torchscript(tmp_path):
    """`monai.bundle ckpt_export` writes a TorchScript ResNet that gives the eager network's output."""
    from custom_components.methods.networks import resnet_mapper

    net = resnet_mapper("tiny").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    configs = REPO / "bundles" / "resnet" / "configs"
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"),
                        "--ckpt_file", str(tmp_path / "model.pt"), "--meta_file", str(configs / "metadata.json"),
                        "--config_file", str(configs / "inference.json"), "--network_preset", "tiny"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ts = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(1, 7, 24, 20)
    np.testing.assert_allclose(ts(x).detach().numpy(), net(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_cosine_learning_rate():
    from custom_components.bundle.training import cosine_learning_rate

    assert cosine_learning_rate(5, 1e-3, 1e-5, 10, 20) == 1e-3
    assert cosine_learning_rate(15, 1e-3, 1e-5, 10, 20) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_learning_rate(20, 1e-3, 1e-5, 10, 20) == pytest.approx(1e-5)


def test_validation_curve_script_reads_training_logs(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import validation_curve
    finally:
        sys.path.pop(0)
    log = tmp_path / "a.log"
    log.write_text("2026-11-25 13:03:01,198 - INFO - Epoch[5] Metrics -- val_pd_mape: 8.7877 val_t1_mape: 33.6359 \n"
                   "2026-11-25 13:03:02,000 - INFO - Epoch: 6/60, Iter: 1/64 -- train_loss: 0.02 \n"
                   "2026-11-25 13:07:48,148 - INFO - Epoch[10] Metrics -- val_pd_mape: 7.6255 val_t1_mape: 26.6790 \n")
    assert validation_curve.read_curve(log, "val_t1_mape") == {5: 33.6359, 10: 26.679}
    assert validation_curve.main([str(log), "--labels", "resnet"]) == 0
    assert "| resnet: val_t1_mape | 33.6 | 26.7 |" in capsys.readouterr().out
    assert validation_curve.main([str(log), "--metric", "nope"]) == 2


def test_shipped_rim_improves_its_estimate_over_the_steps_on_a_synthetic_slice():
    """The shipped RIM on a held-out synthetic brain slice: the T1 error in tissue falls from the
    start (T1 = 1 s everywhere) through the steps, and the last step is the best third of them."""
    from custom_components.methods.scaling import QMRIScaled, decode_maps
    from custom_components.data.synthesis import SyntheticIRDataset
    from custom_components.bundle.training import load_weights

    ds = SyntheticIRDataset(protocol="paper", n_slices=994, realisations=4, matrix=(96, 96), wide_t1=True, seed=777)
    item = QMRIScaled(keys=["label"])(ds[4 * 500])
    sigma = 1.0 / (item["snr"] * item["scale"])
    rim = load_weights(RecurrentInferenceMachine("paper", "compact"), str(REPO / "bundles" / "rim" / "models" / "model.pt")).eval()
    with torch.no_grad():
        steps = rim(item["image"][None].float(), sigma.reshape(1).float(), all_steps=True)[0]
    truth = decode_maps(item["label"], 1.0)
    tissue = (item["mask"][0] > 0) & (truth[0] > 0.1) & (truth[0] < 3.0)
    assert tissue.sum() > 500

    def t1_error(t1):
        return float(((t1 - truth[0]).abs() / truth[0])[tissue].mean())

    start = t1_error(torch.ones_like(truth[0]))
    errs = [t1_error(decode_maps(steps[k], 1.0)[0]) for k in range(steps.shape[0])]
    assert errs[-1] < 0.5 * start, (start, errs)
    assert errs[-1] <= min(errs[:3])


@pytest.mark.parametrize("method", ["resnet", "rim"])
def test_a_volume_in_one_batch_gives_each_slice_its_own_maps(method):
    """The shipped ResNet / RIM map a 3-slice volume in one batch of slices (each with its own signal
    scale and a different T1): the maps equal those of each slice mapped alone (float32 rounding)."""
    from custom_components.io.series import IRSeries
    from custom_components.mapping.learned import map_series_with_bundle

    p = get_protocol("paper")
    maps = torch.zeros(3, 32, 32, 3, dtype=torch.float64)
    maps[0] = torch.tensor([0.5, 1.0, 1.6])
    maps[1, 6:-6, 6:-6] = torch.tensor([1.0, 3.0, 0.5])  # three signal scales
    maps[2] = 1.95
    img = signal(maps, p, dim=0).numpy().transpose(1, 2, 3, 0) + 0.01
    vol = map_series_with_bundle(IRSeries(img, np.eye(4), p, "volume"), method=method, progress=False, sigma=0.01)
    for z in range(3):
        one = map_series_with_bundle(IRSeries(img[:, :, z:z + 1], np.eye(4), p, "slice"), mask=vol.mask[:, :, z:z + 1],
                                     method=method, progress=False, sigma=0.01)
        for k in ("T1", "PD", "B"):
            np.testing.assert_allclose(vol.maps[k][:, :, z], one.maps[k][:, :, 0], rtol=1e-4, atol=1e-5)
