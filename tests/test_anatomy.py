"""Anatomy: the no-download MNI head, random axial slices, and the BrainWeb loader."""

import gzip

import numpy as np
import pytest

from custom_components.data import anatomy as A
from custom_components.data.anatomy import N_TISSUES, Tissue


@pytest.fixture(scope="module")
def mni():
    labels, probs, affine = A.mni_tissue_volume()
    return labels, probs, affine, None


def test_tissue_classes_are_fixed():
    assert [int(t) for t in Tissue] == list(range(N_TISSUES))
    assert (Tissue.BACKGROUND, Tissue.CSF, Tissue.GM, Tissue.WM, Tissue.FAT, Tissue.MUSCLE) == (0, 1, 2, 3, 4, 5)


def test_mni_volume_format(mni):
    labels, probs, affine, _ = mni
    assert labels.dtype == np.uint8 and labels.ndim == 3
    assert probs.dtype == np.float32 and probs.shape == (N_TISSUES,) + labels.shape
    assert affine.shape == (4, 4) and np.allclose(np.abs(np.diag(affine)[:3]), 1.0)  # 1 mm grid
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert probs.min() >= 0
    sub = (slice(None), slice(None, None, 7), slice(None, None, 7), slice(None, None, 7))
    np.testing.assert_array_equal(probs[sub].argmax(axis=0), labels[sub[1:]])


def test_mni_tissue_fractions_are_sensible(mni):
    labels, probs, _, _ = mni
    brain = np.isin(labels, [Tissue.CSF, Tissue.GM, Tissue.WM])
    n_brain = brain.sum()
    assert 1.2e6 < n_brain < 2.5e6  # voxels of 1 mm^3: the MNI brain is about 1.9 litres
    assert (labels == Tissue.WM).sum() > 0.2 * n_brain
    assert (labels == Tissue.GM).sum() > 0.2 * n_brain
    assert (labels == Tissue.CSF).sum() > 0.03 * n_brain
    for t in (Tissue.FAT, Tissue.MUSCLE, Tissue.BONE):
        assert (labels == t).sum() > 1e5
    assert (labels == Tissue.BLOOD).sum() == 0
    # fat, muscle and bone lie outside the brain: no grey or white matter where they are labelled
    non_brain = np.isin(labels, [Tissue.FAT, Tissue.MUSCLE, Tissue.BONE])
    assert probs[Tissue.GM][non_brain].max() == 0 and probs[Tissue.WM][non_brain].max() == 0


def test_mni_csf_is_dark_on_the_t1_weighted_template(mni):
    import nibabel as nib

    labels, _, affine, _ = mni
    img = nib.load(str(A.mni_template_paths()["t1"]))
    t1w = np.asarray(img.dataobj).astype(float)
    offset = np.rint(np.linalg.solve(img.affine, affine[:, 3])[:3]).astype(int)
    # the template region covered by the cropped volume (clip to the template's grid)
    lo = np.maximum(offset, 0)
    hi = np.minimum(offset + labels.shape, t1w.shape)
    t = t1w[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    lab = labels[lo[0] - offset[0]:hi[0] - offset[0], lo[1] - offset[1]:hi[1] - offset[1],
                 lo[2] - offset[2]:hi[2] - offset[2]]
    mean = {k: t[lab == k].mean() for k in (Tissue.CSF, Tissue.GM, Tissue.WM)}
    assert mean[Tissue.CSF] < mean[Tissue.GM] < mean[Tissue.WM]


def test_mni_head_layers_in_anatomical_order(mni):
    labels, _, _, _ = mni
    x, y, z = (s // 2 for s in labels.shape)
    ray = labels[x, y:, z + 20]  # from the centre towards anterior, above the orbits
    runs = [int(v) for i, v in enumerate(ray) if i == 0 or v != ray[i - 1]]
    outside = runs[max(i for i, v in enumerate(runs) if v in (Tissue.GM, Tissue.WM)) + 1:]
    # CSF, inner table, diploe, outer table, soft tissue, subcutaneous fat, skin, air
    assert outside == [Tissue.CSF, Tissue.BONE, Tissue.FAT, Tissue.BONE, Tissue.MUSCLE, Tissue.FAT,
                       Tissue.MUSCLE, Tissue.BACKGROUND]


def test_volume_is_cached():
    """Built once per process: later calls return the cached object (no clock involved)."""
    first = A._mni_compact()
    hits = A._mni_compact.cache_info().hits
    A.mni_tissue_volume()
    assert A._mni_compact() is first
    assert A._mni_compact.cache_info().hits >= hits + 1 and A._mni_compact.cache_info().misses == 1


def test_sample_slice_format():
    s = A.sample_slice(0)
    assert s["labels"].shape == (240, 240) and s["labels"].dtype == np.int64
    assert s["probs"].shape == (N_TISSUES, 240, 240) and s["probs"].dtype == np.float32
    np.testing.assert_allclose(s["probs"].sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(s["probs"].argmax(axis=0), s["labels"])
    assert set(np.unique(s["labels"])) <= set(range(N_TISSUES))
    assert s["pixel_size_mm"] == pytest.approx((250 / 240, 250 / 240))
    assert 0 <= s["index"] < A.n_source_slices()
    small = A.sample_slice(1, matrix=(64, 80), fov_mm=(200.0, 250.0))
    assert small["labels"].shape == (64, 80) and small["probs"].shape == (N_TISSUES, 64, 80)


def test_sample_slice_is_deterministic_by_seed():
    a, b, c = A.sample_slice(7), A.sample_slice(7), A.sample_slice(8)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["probs"], b["probs"])
    assert (a["labels"] != c["labels"]).mean() > 0.05
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(A.sample_slice(g1)["labels"], A.sample_slice(g2)["labels"])


def test_canonical_slice_is_centred_symmetric_and_to_scale(mni):
    labels3d, _, affine, _ = mni
    src = A.mni_slice_source()
    index = src.n_slices // 2
    s = A.sample_slice(0, index, deform=False, slice_thickness_mm=1.0)
    assert not s["flipped"]
    other_seed = A.sample_slice(99, index, deform=False, slice_thickness_mm=1.0)
    np.testing.assert_array_equal(s["labels"], other_seed["labels"])  # no randomness without deform
    head = s["labels"] != Tissue.BACKGROUND
    rows, cols = np.nonzero(head)
    assert abs(0.5 * (cols.min() + cols.max()) - 119.5) <= 2  # head centred left-right
    # the symmetric ICBM152 brain stays (nearly) mirror symmetric about the image centre
    brain = np.isin(s["labels"], [Tissue.CSF, Tissue.GM, Tissue.WM])
    assert (s["labels"] == s["labels"][:, ::-1])[brain].mean() > 0.95
    assert (brain == brain[:, ::-1])[head].mean() > 0.99
    # head extent in mm matches the volume at that height
    z = int(src.slice_z[index])
    head3 = labels3d[:, :, z] != Tissue.BACKGROUND
    width_mm = np.ptp(np.nonzero(head3.any(axis=1))[0]) + 1
    length_mm = np.ptp(np.nonzero(head3.any(axis=0))[0]) + 1
    px = s["pixel_size_mm"][0]
    assert (np.ptp(cols) + 1) * px == pytest.approx(width_mm, abs=3)
    assert (np.ptp(rows) + 1) * px == pytest.approx(length_mm, abs=3)
    assert s["z_mm"] == pytest.approx(affine[2, 3] + z)


def test_deformation_changes_geometry_but_keeps_labels_valid():
    index = A.n_source_slices() // 2
    ref = A.sample_slice(0, index, deform=False)
    brain_ref = np.isin(ref["labels"], [Tissue.CSF, Tissue.GM, Tissue.WM]).sum()
    for seed in range(4):
        s = A.sample_slice(seed, index, deform=True)
        assert (s["labels"] != ref["labels"]).mean() > 0.05
        assert set(np.unique(s["labels"])) <= set(range(N_TISSUES))
        for t in (Tissue.CSF, Tissue.GM, Tissue.WM, Tissue.FAT, Tissue.MUSCLE, Tissue.BONE):
            assert (s["labels"] == t).any()
        brain = np.isin(s["labels"], [Tissue.CSF, Tissue.GM, Tissue.WM]).sum()
        assert 0.6 < brain / brain_ref < 1.6  # scaling within +-12 % per axis plus elastic
        np.testing.assert_allclose(s["probs"].sum(axis=0), 1.0, atol=1e-4)
    assert (s["labels"][[0, -1], :] == Tissue.BACKGROUND).all()  # head inside the field of view


def test_axial_slices_iterates_sources_and_realisations():
    assert 60 <= A.n_source_slices() <= 200
    out = list(A.axial_slices(0, indices=[0, 5], realisations=2, matrix=(48, 48), fov_mm=250.0))
    assert [s["index"] for s in out] == [0, 0, 5, 5]
    assert not np.array_equal(out[0]["labels"], out[1]["labels"])
    assert out[0]["z_mm"] < out[2]["z_mm"]


def test_sample_slice_rejects_bad_index():
    with pytest.raises(IndexError):
        A.sample_slice(0, A.n_source_slices())


# --- BrainWeb -------------------------------------------------------------------------------

def _synthetic_brainweb(shape=(20, 24, 20)) -> np.ndarray:
    """A small head in BrainWeb's normal-model labels (0..11), (X, Y, Z)."""
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    r = np.sqrt((x / shape[0]) ** 2 + (y / shape[1]) ** 2 + (z / shape[2]) ** 2) * 2
    labels = np.zeros(shape, dtype=np.uint8)
    for radius, label in ((1.0, 6), (0.93, 4), (0.86, 7), (0.82, 11), (0.78, 10), (0.74, 1), (0.68, 2),
                          (0.5, 3)):
        labels[r < radius] = label
    labels[r < 0.12] = 1  # a ventricle
    labels[shape[0] // 2, :, :][r[shape[0] // 2] < 0.6] = 8  # a vessel plane
    labels[0, 0, 0] = 5
    labels[-1, -1, -1] = 9
    return labels


def _write_rawb(path, labels_xyz, compress=False):
    data = np.ascontiguousarray(labels_xyz.transpose(2, 1, 0)).tobytes()  # x fastest, z slowest
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_brainweb_round_trip(tmp_path, compress):
    raw = _synthetic_brainweb()
    path = tmp_path / ("model.rawb.gz" if compress else "model.rawb")
    _write_rawb(path, raw, compress)
    np.testing.assert_array_equal(A.load_brainweb_discrete(path, raw.shape, remap=False), raw)
    mapped = A.load_brainweb_discrete(path, raw.shape)
    assert mapped.dtype == np.uint8 and mapped.shape == raw.shape
    for value, (_, tissue) in A.BRAINWEB_NORMAL20_LABELS.items():
        assert (mapped[raw == value] == tissue).all()
    assert (mapped[raw == 8] == Tissue.BLOOD).all() and (mapped[raw == 7] == Tissue.BONE).all()
    assert (mapped[raw == 11] == Tissue.FAT).all()


def test_brainweb_wrong_size_is_rejected(tmp_path):
    raw = _synthetic_brainweb()
    path = tmp_path / "model.rawb"
    _write_rawb(path, raw)
    with pytest.raises(ValueError, match="bytes"):
        A.load_brainweb_discrete(path)  # 9600 bytes: no BrainWeb grid
    with pytest.raises(ValueError, match="bytes"):
        A.load_brainweb_discrete(path, (20, 24, 21))
    bad = raw.copy()
    bad[1, 1, 1] = 12
    _write_rawb(path, bad)
    with pytest.raises(ValueError, match="label 12"):
        A.load_brainweb_discrete(path, raw.shape)


def test_brainweb_shape_inferred_for_the_phantom_grid(tmp_path):
    shape = A.BRAINWEB_PHANTOM_SHAPE
    raw = np.zeros(shape, dtype=np.uint8)
    raw[90, 108, 90] = 8  # glial matter in the phantom's labels
    raw[10, 20, 30] = 10  # MS lesion
    path = tmp_path / "phantom_1.0mm_normal_crisp.rawb.gz"
    _write_rawb(path, raw, compress=True)
    mapped = A.load_brainweb_discrete(path)
    assert mapped.shape == shape
    assert mapped[90, 108, 90] == Tissue.GM and mapped[10, 20, 30] == Tissue.WM
    assert mapped.sum() == Tissue.GM + Tissue.WM


def test_brainweb_slices_match_the_slice_format(tmp_path):
    raw = _synthetic_brainweb((40, 48, 40))
    path = tmp_path / "subject.rawb"
    _write_rawb(path, raw)
    labels = A.load_brainweb_discrete(path, raw.shape)
    out = list(A.brainweb_slices(labels, 0, voxel_size_mm=0.5, matrix=(32, 32), fov_mm=30.0, realisations=2))
    assert len(out) >= 2 and len(out) % 2 == 0
    for s in out:
        assert s["labels"].shape == (32, 32) and s["labels"].dtype == np.int64
        assert s["probs"].shape == (N_TISSUES, 32, 32) and s["probs"].dtype == np.float32
        np.testing.assert_allclose(s["probs"].sum(axis=0), 1.0, atol=1e-4)
        assert set(np.unique(s["labels"])) <= set(range(N_TISSUES))
    # (the random +-10 mm shift may move this 20 mm toy head partly out of its 30 mm field of view)
    assert np.mean([(s["labels"] != Tissue.BACKGROUND).any() for s in out]) > 0.5
    again = list(A.brainweb_slices(labels, 0, voxel_size_mm=0.5, matrix=(32, 32), fov_mm=30.0, realisations=2))
    np.testing.assert_array_equal(out[-1]["probs"], again[-1]["probs"])
    # 0.5 mm voxels shown on a 1 mm grid without deformation: a 20 mm head spans about 20 pixels
    flat = next(A.brainweb_slices(labels, 0, voxel_size_mm=0.5, indices=[len(out) // 4], matrix=(32, 32),
                                  fov_mm=32.0, deform=False))
    cols = np.nonzero((flat["labels"] != Tissue.BACKGROUND).any(axis=0))[0]
    assert 18 <= np.ptp(cols) + 1 <= 22
    assert (flat["labels"] == Tissue.WM).any() and (flat["labels"] == Tissue.BONE).any()
