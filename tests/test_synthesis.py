"""Synthetic data: reproducible by seed, labels the IR model reproduces, the twin without bias."""

import numpy as np
import pytest
import torch

from custom_components.methods.fitting import fit_ir
from custom_components.physics.protocol import nist_15t_protocol, paper_protocol
from custom_components.physics.signal_model import signal
from custom_components.data.synthesis import Effects, SynthesisConfig, SyntheticIRDataset, nist_twin, render, write_dataset

SMALL = dict(n_slices=3, realisations=2, matrix=(64, 64), fov_mm=250.0)


def test_dataset_reproducible_by_seed_and_item_format():
    a = SyntheticIRDataset(SynthesisConfig(seed=3, **SMALL))
    b = SyntheticIRDataset(SynthesisConfig(seed=3, **SMALL))
    c = SyntheticIRDataset(SynthesisConfig(seed=4, **SMALL))
    assert len(a) == 6
    x, y = a[1], b[1]
    for k in ("image", "label", "mask"):
        assert torch.equal(x[k], y[k])
    assert not torch.equal(x["image"], c[1]["image"])
    assert x["image"].shape == (7, 64, 64) and x["label"].shape == (3, 64, 64) and x["mask"].shape == (1, 64, 64)
    assert x["image"].dtype == torch.float32 and torch.isfinite(x["image"]).all()
    # realisations of one slice share the anatomy, not the parameters
    m0, m1 = a[0]["mask"] > 0, a[1]["mask"] > 0
    assert 2 * (m0 & m1).sum() / (m0.sum() + m1.sum()) > 0.95  # same anatomy (edges differ with the drawn PD)
    assert not torch.equal(a[0]["label"], a[1]["label"])
    lab = x["label"]
    m = x["mask"][0] > 0
    assert m.float().mean() > 0.2
    assert (lab[0][m] > 0.1).all() and (lab[0][m] < 6).all() and (lab[2][m] > 1.5).all() and (lab[2][m] <= 2.0 + 1e-6).all()


def test_labels_are_what_the_model_reproduces():
    """Without noise and blurring, images equal the full-recovery model evaluated on the labels."""
    eff = Effects(noise="none", echo_train=False)
    it = SyntheticIRDataset(SynthesisConfig(seed=1, effects=eff, **SMALL))[0]
    m = it["mask"][0] > 0
    full = paper_protocol().with_(repetition_time_s=None)
    pred = signal(it["label"].double(), full, dim=0).float()
    np.testing.assert_allclose(pred[:, m].numpy(), it["image"][:, m].numpy(), rtol=2e-4, atol=2e-5)


def test_crop_and_wide_t1():
    ds = SyntheticIRDataset(SynthesisConfig(seed=0, crop=(32, 32), wide_t1=True, **SMALL))
    it = ds[0]
    assert it["image"].shape == (7, 32, 32)
    t1 = torch.cat([ds[i]["label"][0][ds[i]["mask"][0] > 0] for i in range(len(ds))])
    assert (t1 < 0.1).any()


def test_wide_t1_walls_put_a_shell_without_signal_around_objects(monkeypatch):
    """With ``wall_probability`` 1 every object sits in a ring of PD 0 (1-3 px) that replaces the
    tissue beneath; the default draws no wall and leaves the random stream unchanged."""
    from custom_components.data.anatomy import Tissue
    from custom_components.data.tissues import WideT1, sample_parameter_maps

    labels = np.full((96, 96), int(Tissue.WM))
    plain = sample_parameter_maps(labels, 11, wide_t1=True)
    assert all(o["wall_px"] == 0 for o in plain["objects"])
    again = sample_parameter_maps(labels, 11, wide_t1=True, wide=WideT1(wall_probability=0.0))
    assert np.array_equal(plain["T1"], again["T1"]) and np.array_equal(plain["PD"], again["PD"])
    walled = sample_parameter_maps(labels, 11, wide_t1=True, wide=WideT1(n_objects=(1, 1), wall_probability=1.0,
                                                                        semi_axis_frac=(0.1, 0.1), edge_px=(0.5, 0.5)))
    (obj,) = walled["objects"]
    assert 1.0 <= obj["wall_px"] <= 3.0
    rr, cc = np.mgrid[:96, :96]
    a = obj["semi_axes"][0]  # a circle: both semi-axes 9.6 px
    dist = np.hypot(rr - obj["centre"][0], cc - obj["centre"][1]) - a  # signed distance to the object's border
    inside, ring, outside = dist < -1, (dist > 0.5) & (dist < obj["wall_px"] - 0.5), dist > obj["wall_px"] + 1
    on_image = (rr > 0) & (rr < 95) & (cc > 0) & (cc < 95)
    assert ring[on_image].any() and (walled["PD"][ring & on_image] == 0).all()
    assert (walled["PD"][inside & on_image] > 0.4).all() and (walled["PD"][outside & on_image] > 0.4).all()
    # the dataset option reaches the tissue sampler
    import custom_components.data.tissues as T

    walls = []
    real = T.sample_parameter_maps
    monkeypatch.setattr(T, "sample_parameter_maps", lambda *a, **kw: (lambda out: walls.extend(
        o["wall_px"] for o in out["objects"]) or out)(real(*a, **kw)))
    ds = SyntheticIRDataset(SynthesisConfig(seed=0, wide_t1=True, wide_t1_walls=1.0, **SMALL))
    ds[0], ds[1]
    assert walls and all(1.0 <= w <= 3.0 for w in walls)
    assert SynthesisConfig(wide_t1_walls=0.5).wide_t1_walls == 0.5
    with pytest.raises(ValueError, match="wide_t1_walls"):
        SynthesisConfig(wide_t1_walls=1.5)
    with pytest.raises(ValueError, match="wall_probability"):
        WideT1(wall_probability=-0.1)


def test_wide_t1_objects_sets_the_object_count(monkeypatch):
    """``wide_t1_objects`` reaches the tissue sampler; no objects leave only brain tissue T1."""
    import custom_components.data.tissues as T

    seen = []
    real = T.sample_parameter_maps

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append(len(out["objects"]))
        return out

    monkeypatch.setattr(T, "sample_parameter_maps", spy)
    for lo_hi in ((9, 9), (0, 0)):
        ds = SyntheticIRDataset(SynthesisConfig(seed=0, wide_t1=True, wide_t1_objects=lo_hi, **SMALL))
        seen.clear()
        items = [ds[i] for i in range(len(ds))]
        assert seen == [lo_hi[0]] * len(ds)
        t1 = torch.cat([it["label"][0][it["mask"][0] > 0] for it in items])
    # without objects T1 stays within the tissues' ranges x the global scale (0.75-1.33): nothing below 0.1 s
    assert float(t1.min()) > 0.1
    assert SynthesisConfig(wide_t1_objects=[2, 4]).wide_t1_objects == (2, 4)
    for bad in ((5, 2), (-1, 3), "many", (1,)):
        with pytest.raises(ValueError, match="wide_t1_objects"):
            SynthesisConfig(wide_t1_objects=bad)


def test_snr_is_as_drawn():
    ds = SyntheticIRDataset(SynthesisConfig(seed=0, effects=Effects(snr_range=(40, 40), echo_train=False), **SMALL))
    it = ds[0]
    bg = it["image"][:, it["mask"][0] == 0]
    # Rician background: E[y^2] = 2 sigma^2
    assert float(torch.sqrt((bg**2).mean() / 2)) == pytest.approx(1 / 40, rel=0.08)


def test_write_dataset(tmp_path):
    cfg = SynthesisConfig(seed=0, **SMALL)
    out = write_dataset(tmp_path / "d", cfg, n_items=2, progress=False)
    import json

    import nibabel as nib
    dl = json.loads((out / "dataset.json").read_text())
    assert len(dl["training"]) == 2
    img = nib.load(out / dl["training"][1]["image"]).get_fdata()
    ref = SyntheticIRDataset(cfg)[1]["image"].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(img[:, :, 0, :], ref, rtol=1e-6)


def test_variable_tr_labels_keep_true_b():
    p = nist_15t_protocol(variable_tr=True)
    t1 = torch.full((8, 8), 0.9, dtype=torch.float64)
    out = render(t1, torch.full_like(t1, 0.1), torch.ones_like(t1), torch.full_like(t1, 1.9), p,
                 Effects(noise="none", echo_train=False))
    np.testing.assert_allclose(out["label"][2].numpy(), 1.9)
    np.testing.assert_allclose(out["image"].numpy(), signal(out["label"], p, dim=0).numpy(), rtol=1e-10)


def test_classical_fit_unbiased_on_the_twin_at_snr50():
    """Sphere means of the Rician-ML fit over 8 noise realisations are within 1 % for T1 0.1-2 s."""
    prot = paper_protocol()
    ests = {}
    for seed in range(8):
        tw = nist_twin(prot, snr=50, effects=Effects(noise="rician", echo_train=True), seed=seed)
        ref = tw["reference"]["T1_s"]
        from custom_components.reporting.evaluation import locate_spheres
        if seed == 0:
            layout = locate_spheres(tw["image"], tw["pixel_spacing_mm"], t1_map=tw["label"][0], reference_t1_s=ref)
            rois = {k: layout.roi_mask(k) for k in range(1, 15)}
        for k, roi in rois.items():
            fit = fit_ir(tw["image"][:, roi].T, prot, noise="rician", sigma=1 / 50)
            ests.setdefault(k, []).append(fit.t1)
    for k in range(1, 15):
        t1 = ref[k - 1]
        if 0.1 <= t1 <= 2.0:
            mean = np.mean(np.concatenate(ests[k]))
            assert mean == pytest.approx(t1, rel=0.01), f"sphere {k}: {mean * 1000:.1f} ms vs {t1 * 1000:.1f} ms"


def test_truth_is_what_the_finite_tr_model_reproduces():
    """The output convention (``truth``, :func:`maps_from_labels` of a label) is the physical, TR-corrected
    (PD, B): without noise and blurring the images equal the full finite-TR model on it, and B is the
    field's own value (not the apparent one)."""
    from custom_components.data.synthesis import maps_from_labels

    p = nist_15t_protocol()  # TR 1 s: apparent and physical (PD, B) differ most
    t1 = torch.full((8, 8), 2.0, dtype=torch.float64)
    out = render(t1, torch.full_like(t1, 0.1), torch.ones_like(t1), torch.full_like(t1, 1.9), p,
                 Effects(noise="none", echo_train=False))
    np.testing.assert_allclose(out["truth"][2].numpy(), 1.9)
    assert float(out["label"][2].max()) < 1.5  # the training label is apparent
    np.testing.assert_allclose(out["image"].numpy(), signal(out["truth"], p, dim=0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(maps_from_labels(out["label"], p).numpy(), out["truth"].numpy(), rtol=1e-12)
