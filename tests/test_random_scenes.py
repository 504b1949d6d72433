"""Random label scenes (custom_components.data.random_scenes): the drawn parameters follow the stated
distributions, the objects' walls carry no signal, and the dataset renders them like any scene."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from custom_components.data.random_scenes import RandomLabelScenes, gaussian_random_field
from custom_components.data.synthesis import Effects, SynthesisConfig, SyntheticIRDataset, maps_from_labels
from custom_components.physics.protocol import get_protocol
from custom_components.physics.signal_model import signal


def test_label_t1_is_log_uniform_and_t2_below_t1():
    """Without texture and objects every label is one (T1, T2, PD): over 150 scenes the labels' T1 pass a
    Kolmogorov-Smirnov test against log-uniform on 0.02-5 s; T2 <= min(T1, 2 s) and PD in 0.3-1 or 0."""
    scene = RandomLabelScenes(texture=(0.0, 0.0), n_objects=(0, 0))
    t1s, bg = [], 0
    for i in range(150):
        s = scene(np.random.default_rng([7, i]), i, 0, (40, 40))
        for lab in np.unique(s["labels"]):
            sel = s["labels"] == lab
            t1, t2, pd = (np.unique(s[k][sel]) for k in ("T1", "T2", "PD"))
            assert t1.size == t2.size == pd.size == 1  # one value per label
            assert t2[0] <= min(t1[0], 2.0)
            bg += pd[0] == 0.0
            assert pd[0] == 0.0 or 0.3 <= pd[0] <= 1.0
            t1s.append(t1[0])
    u = (np.log(t1s) - math.log(0.02)) / (math.log(5.0) - math.log(0.02))
    assert stats.kstest(u, "uniform").pvalue > 0.01
    assert 40 < bg < 110  # a signal-free label in about half of the 150 scenes (binomial, p = 0.5)
    np.testing.assert_array_equal(scene(np.random.default_rng([7, 3]), 3, 0, (40, 40))["T1"],
                                  scene(np.random.default_rng([7, 3]), 3, 0, (40, 40))["T1"])


def test_objects_with_walls_are_disks_in_a_signal_free_shell():
    """Every object is a disk of one (T1, T2, PD); with walls on, each disk is surrounded by PD 0."""
    scene = RandomLabelScenes(n_objects=(3, 3), wall_probability=1.0, wall_px=(2.0, 2.0), texture=(0.0, 0.0),
                              object_radius=(0.1, 0.1))
    s = scene(np.random.default_rng(5), 0, 0, (100, 100))
    walls = s["labels"] == -1
    assert walls.any() and (s["PD"][walls] == 0).all() and not s["mask"][walls].any()
    k = int(s["labels"].max())
    for lab in range(k - 2, k + 1):  # the three objects (drawn last)
        sel = s["labels"] == lab
        assert np.unique(s["T1"][sel]).size == 1
        assert 0 < sel.sum() <= math.pi * 10.0**2 + 2 * math.pi * 10  # a disk of radius 10 px (or less if covered)


def test_gaussian_random_field_has_the_stated_correlation_length():
    """The field's autocorrelation at lag d is exp(-d^2 / (4 l^2)) for a Gaussian filter of std l."""
    rng = np.random.default_rng(0)
    lag, corr = 6, 5.0
    acf = np.mean([np.mean(f * np.roll(f, lag, axis=1)) for f in (gaussian_random_field((128, 128), corr, rng)
                                                                  for _ in range(20))])
    assert acf == pytest.approx(math.exp(-lag**2 / (4 * corr**2)), abs=0.05)


def test_dataset_renders_random_label_scenes_by_the_signal_model():
    """`SynthesisConfig(scene="random_labels")`: without noise, blurring or Gibbs the images are the
    magnitude signal of the label maps; bad settings are refused."""
    cfg = SynthesisConfig(protocol="nist15", n_slices=2, realisations=1, matrix=(24, 24), scene="random_labels",
                          random_scenes={"n_labels": [3, 3]},
                          effects=Effects(noise="none", echo_train=False, gibbs_factor=1))
    ds = SyntheticIRDataset(cfg)
    item = ds[1]
    p = get_protocol("nist15")
    maps = maps_from_labels(item["label"].double(), p)
    expected = signal(maps, p, dim=0).abs()
    torch.testing.assert_close(item["image"].double(), expected.float().double(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="scene must be one of"):
        SynthesisConfig(scene="faces")
    with pytest.raises(ValueError, match="random_scenes is for"):
        SynthesisConfig(random_scenes={"n_labels": [2, 3]})
    with pytest.raises(ValueError, match="n_labels"):
        RandomLabelScenes(n_labels=(0, 3))
