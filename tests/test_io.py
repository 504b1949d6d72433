"""Tests of custom_components.io: DICOM/NIfTI/BIDS reading, validation and atomic writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from custom_components import io
from custom_components.io import InputError, IRSeries, load_nifti_map, load_series, save_bids_irt1, save_maps, save_series
from custom_components.physics.protocol import Protocol, nist_15t_protocol, paper_protocol

RNG = np.random.default_rng(0)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# ============================================================================ synthetic DICOM
STUDY_UID = generate_uid()
FRAME_UID = generate_uid()


def write_dicom(path: Path, pixels: np.ndarray, ti_ms: float | None, *, tr_ms: float = 1000.0,
                slope: float = 1.0, intercept: float = 0.0, ipp=(-10.0, -20.0, 30.0),
                iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), spacing=(1.5, 2.0), thickness: float = 4.0,
                image_type=("ORIGINAL", "PRIMARY", "M", "ND"), series_uid: str | None = None,
                echo_time_ms: float = 10.0, philips_scale_slope: float | None = None) -> Path:
    """A minimal MR Image Storage file (explicit VR little endian) with the given pixel values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Manufacturer = "Philips Medical Systems" if philips_scale_slope is not None else "TEST"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = FRAME_UID
    ds.ImageType = list(image_type)
    if ti_ms is not None:
        ds.InversionTime = f"{ti_ms:g}"
    ds.RepetitionTime = f"{tr_ms:g}"
    ds.EchoTime = f"{echo_time_ms:g}"
    ds.EchoTrainLength = 1
    ds.MagneticFieldStrength = "1.5"
    ds.SliceThickness = f"{thickness:g}"
    ds.ImagePositionPatient = [f"{v:g}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
    ds.PixelSpacing = [f"{v:g}" for v in spacing]
    ds.RescaleSlope = f"{slope:.10g}"
    ds.RescaleIntercept = f"{intercept:.10g}"
    pixels = np.asarray(pixels)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.tobytes()
    if philips_scale_slope is not None:
        block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        block.add_new(0x0E, "FL", float(philips_scale_slope))
    ds.save_as(path, enforce_file_format=True)
    return path


TIS_MS = [50.0, 100.0, 200.0, 400.0, 800.0]


def _ir_pixels(shape=(8, 6), n=len(TIS_MS), offset=100) -> list[np.ndarray]:
    """Distinct uint16 test images, one per TI."""
    return [(RNG.integers(0, 1000, size=shape) + offset * (i + 1)).astype(np.uint16) for i in range(n)]


def _shuffled(n: int) -> np.ndarray:
    order = RNG.permutation(n)
    while np.array_equal(order, np.arange(n)):
        order = RNG.permutation(n)
    return order


# ============================================================================ DICOM folder
def test_dicom_two_slices_shuffled_files_rescaled_and_sorted(tmp_path):
    rows, cols = 8, 6
    slopes = [0.5, 1.0, 2.0, 1.25, 3.0]
    intercepts = [0.0, 10.0, -5.0, 2.5, 100.0]
    trs = [1000.0, 1000.0, 1100.0, 1300.0, 1700.0]
    z_positions = [30.0, 34.0]
    pixels = {z: _ir_pixels((rows, cols)) for z in z_positions}
    items = [(z, i) for z in z_positions for i in range(len(TIS_MS))]
    # files named in shuffled order, no extension, plus files that are clearly not DICOM
    for k, j in enumerate(_shuffled(len(items))):
        z, i = items[j]
        write_dicom(tmp_path / f"IM{k:04d}", pixels[z][i], TIS_MS[i], tr_ms=trs[i], slope=slopes[i],
                    intercept=intercepts[i], ipp=(-10.0, -20.0, z))
    (tmp_path / "README").write_text("scanner export\n")
    (tmp_path / "info.json").write_text("{}")

    s = load_series(tmp_path)
    assert isinstance(s, IRSeries)
    assert s.data.dtype == np.float64 and s.data.shape == (rows, cols, 2, 5)
    assert s.protocol.inversion_times_s == tuple(t / 1000 for t in TIS_MS)
    assert s.protocol.repetition_time_s == tuple(t / 1000 for t in trs)
    assert s.protocol.echo_time_s == pytest.approx(0.010)
    assert s.protocol.field_strength_t == 1.5
    for k, z in enumerate(z_positions):
        for i in range(5):
            np.testing.assert_allclose(s.data[:, :, k, i], pixels[z][i] * slopes[i] + intercepts[i])
    assert len(s.files) == 10
    assert any("skipped 2" in n for n in s.notes)
    # affine: data[i, j, k] at LPS IPP + i*dr*col_dir + j*dc*row_dir + k*4 mm along the normal; RAS flips x, y
    lps = np.array([[0, 2.0, 0, -10], [1.5, 0, 0, -20], [0, 0, 4.0, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(s.affine, np.diag([-1, -1, 1, 1]) @ lps)


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_dicom_affine_matches_nibabel_for_oblique_single_slice(tmp_path):
    from nibabel.nicom import dicomwrappers
    c, sn = np.cos(0.3), np.sin(0.3)
    iop = (c, sn, 0.0, 0.0, 0.0, -1.0)
    for i, ti in enumerate(TIS_MS[:3]):
        write_dicom(tmp_path / f"f{i}", _ir_pixels((6, 5), 1, offset=50 * (i + 1))[0], ti, iop=iop,
                    ipp=(12.5, -3.0, 40.0), thickness=5.0)
    s = load_series(tmp_path)
    ds = pydicom.dcmread(tmp_path / "f0")
    lps = dicomwrappers.wrapper_from_data(ds).affine  # nibabel: data[row, column] in LPS
    ras = np.diag([-1, -1, 1, 1]) @ lps
    np.testing.assert_allclose(s.affine[:, [0, 1, 3]], ras[:, [0, 1, 3]], atol=1e-5)
    normal = np.cross(iop[:3], iop[3:]) * 5.0
    np.testing.assert_allclose(s.affine[:3, 2], normal * [-1, -1, 1], atol=1e-4)  # IOP written to 6 digits
    np.testing.assert_allclose(s.data[:, :, 0, 0], ds.pixel_array)


def test_dicom_signed_real_gives_magnitude(tmp_path):
    # Siemens-style real images: PV in [0, 4095], value = 2 PV - 4096
    pvs = [np.full((4, 4), v, dtype=np.uint16) for v in (1000, 1600, 2100, 2600)]
    for pv in pvs:
        pv[0, 0] += 7  # not constant
    for i, pv in enumerate(pvs):
        write_dicom(tmp_path / f"{i}", pv, TIS_MS[i], slope=2.0, intercept=-4096.0,
                    image_type=("ORIGINAL", "PRIMARY", "R", "NORM"))
    s = load_series(tmp_path)
    expected = np.stack([np.abs(2.0 * pv - 4096.0) for pv in pvs], axis=-1)[:, :, None, :]
    np.testing.assert_allclose(s.data, expected)
    assert s.data.min() >= 0
    assert any("signed real" in n and "magnitude" in n for n in s.notes)


def test_dicom_negative_values_without_real_flag(tmp_path):
    pvs = _ir_pixels((4, 4), 3)
    for i, pv in enumerate(pvs):  # ImageType does not say magnitude or real (GE 'OTHER')
        write_dicom(tmp_path / f"{i}", pv, TIS_MS[i], intercept=-500.0, image_type=("ORIGINAL", "PRIMARY", "OTHER"))
    s = load_series(tmp_path)
    np.testing.assert_allclose(s.data[:, :, 0, 0], np.abs(pvs[0] - 500.0))
    assert any("treated as signed real data" in n for n in s.notes)
    magnitude = tmp_path / "magnitude"
    magnitude.mkdir()
    for i, pv in enumerate(pvs):  # ImageType M with negative values contradicts itself
        write_dicom(magnitude / f"{i}", pv, TIS_MS[i], intercept=-500.0)
    with pytest.raises(InputError, match="says magnitude"):
        load_series(magnitude)


def test_dicom_philips_private_scale_slope(tmp_path):
    slopes = [1.221, 1.325, 1.853, 1.0049]
    scale_slopes = [0.131, 0.161, 0.1607, 0.101]
    pvs = _ir_pixels((5, 5), 4)
    for k, i in enumerate(_shuffled(4)):
        write_dicom(tmp_path / f"IM_{k}", pvs[i], TIS_MS[i], slope=slopes[i], intercept=0.0,
                    philips_scale_slope=scale_slopes[i], image_type=("ORIGINAL", "PRIMARY", "M_IR", "M", "IR"))
    s = load_series(tmp_path)
    for i in range(4):
        fp = (pvs[i] * slopes[i] + 0.0) / (slopes[i] * np.float32(scale_slopes[i]))
        np.testing.assert_allclose(s.data[:, :, 0, i], fp, rtol=1e-6)
    assert any("Philips" in n and "(2005,100E)" in n for n in s.notes)
    assert io.philips_scale_slope(pydicom.dcmread(tmp_path / "IM_0")) is not None


def test_dicom_missing_inversion_time(tmp_path):
    pvs = _ir_pixels((4, 4), 3)
    write_dicom(tmp_path / "a", pvs[0], 50)
    write_dicom(tmp_path / "b", pvs[1], None)
    write_dicom(tmp_path / "c", pvs[2], 200)
    with pytest.raises(InputError, match="InversionTime") as e:
        load_series(tmp_path)
    assert "b" in _one_line(e)


@pytest.mark.parametrize("keep", ["most", "header"])
def test_dicom_truncated_file(tmp_path, keep):
    for i, pv in enumerate(_ir_pixels((8, 8), 3)):
        write_dicom(tmp_path / f"x{i}", pv, TIS_MS[i])
    raw = (tmp_path / "x1").read_bytes()
    cut = len(raw) - 40 if keep == "most" else 300
    (tmp_path / "x1").write_bytes(raw[:cut])
    with pytest.raises(InputError, match="x1") as e:
        load_series(tmp_path)
    _one_line(e)


def test_dicom_corrupt_dcm_extension(tmp_path):
    for i, pv in enumerate(_ir_pixels((4, 4), 3)):
        write_dicom(tmp_path / f"x{i}.dcm", pv, TIS_MS[i])
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 40)
    with pytest.raises(InputError, match="broken.dcm"):
        load_series(tmp_path)


def test_dicom_mixed_matrix_sizes(tmp_path):
    write_dicom(tmp_path / "a", _ir_pixels((8, 8), 1)[0], 50)
    write_dicom(tmp_path / "b", _ir_pixels((8, 8), 1)[0], 100)
    write_dicom(tmp_path / "c", _ir_pixels((6, 8), 1)[0], 200)
    with pytest.raises(InputError, match="mixed series.*Rows") as e:
        load_series(tmp_path)
    _one_line(e)


def test_dicom_mixed_protocol_between_series(tmp_path):
    write_dicom(tmp_path / "a", _ir_pixels((4, 4), 1)[0], 50, echo_time_ms=10)
    write_dicom(tmp_path / "b", _ir_pixels((4, 4), 1)[0], 100, echo_time_ms=10)
    write_dicom(tmp_path / "c", _ir_pixels((4, 4), 1)[0], 200, echo_time_ms=80)
    with pytest.raises(InputError, match="EchoTime.*SeriesInstanceUID"):
        load_series(tmp_path)


def test_dicom_duplicate_ti_in_one_slice(tmp_path):
    for i, ti in enumerate([50, 100, 100, 200]):
        write_dicom(tmp_path / f"d{i}", _ir_pixels((4, 4), 1)[0], ti)
    with pytest.raises(InputError, match="two images with TI 100 ms"):
        load_series(tmp_path)


def test_dicom_too_few_tis_and_empty_folder(tmp_path):
    for i in range(2):
        write_dicom(tmp_path / f"d{i}", _ir_pixels((4, 4), 1)[0], TIS_MS[i])
    with pytest.raises(InputError, match="at least 3"):
        load_series(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing")
    with pytest.raises(InputError, match="no DICOM images"):
        load_series(empty)


def test_dicom_tis_argument_is_a_cross_check(tmp_path):
    for i, pv in enumerate(_ir_pixels((4, 4), 3)):
        write_dicom(tmp_path / f"d{i}", pv, TIS_MS[i])
    assert load_series(tmp_path, tis=[0.2, 0.05, 0.1]).protocol.n_images == 3
    with pytest.raises(InputError, match="disagree"):
        load_series(tmp_path, tis=[0.05, 0.1, 0.3])


def test_single_dicom_file_is_refused(tmp_path):
    f = write_dicom(tmp_path / "one.dcm", _ir_pixels((4, 4), 1)[0], 50)
    with pytest.raises(InputError, match="folder"):
        load_series(f)


# ============================================================================ NIfTI + sidecar
def _series(shape=(5, 4, 2), n=7, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(1.0, 100.0, size=shape + (n,))


AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.5, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("protocol", [paper_protocol(), nist_15t_protocol(variable_tr=True)], ids=["paper", "nist_vtr"])
def test_nifti_round_trip(tmp_path, protocol):
    data = _series(n=protocol.n_images)
    path = save_series(tmp_path / "ir.nii.gz", data, AFFINE, protocol, extra_sidecar={"Source": "test"})
    sidecar = json.loads((tmp_path / "ir.json").read_text())
    assert sidecar["InversionTime"] == list(protocol.inversion_times_s)
    assert sidecar["Source"] == "test"
    for key in ("RepetitionTime", "EchoTime", "EchoTrainLength", "MagneticFieldStrength"):
        assert key in sidecar
    s = load_series(path)
    np.testing.assert_allclose(s.data, data.astype(np.float32))
    np.testing.assert_allclose(s.affine, AFFINE)
    assert s.protocol == protocol
    assert str(path) in s.files and str(tmp_path / "ir.json") in s.files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_nifti_with_tis_argument(tmp_path):
    data = _series(n=4)
    p = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), p)
    with pytest.raises(InputError, match="no inversion times") as e:
        load_series(p)
    _one_line(e)
    s = load_series(p, tis=[0.1, 0.3, 0.9, 2.0], tr=5.0)
    assert s.protocol.inversion_times_s == (0.1, 0.3, 0.9, 2.0)
    assert s.protocol.repetition_time_s == 5.0
    with pytest.raises(InputError, match="3 inversion times for 4 images"):
        load_series(p, tis=[0.1, 0.3, 0.9])
    with pytest.raises(InputError, match="ms"):
        load_series(p, tis=[100, 300, 900, 2000])


def test_nifti_unsorted_tis_are_sorted_with_their_images(tmp_path):
    tis = [0.8, 0.05, 0.4, 0.1]
    trs = [2.4, 1.0, 1.3, 1.1]
    data = np.stack([np.full((3, 3, 1), 10.0 * (i + 1)) + np.arange(9).reshape(3, 3, 1) for i in range(4)], -1)
    p = tmp_path / "u.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), p)
    (tmp_path / "u.json").write_text(json.dumps({"InversionTime": tis, "RepetitionTime": trs}))
    s = load_series(p)
    order = np.argsort(tis)
    assert s.protocol.inversion_times_s == tuple(sorted(tis))
    assert s.protocol.repetition_time_s == tuple(trs[i] for i in order)
    np.testing.assert_allclose(s.data, data[..., order])
    assert any("reordered" in n for n in s.notes)
    with pytest.raises(InputError, match="duplicated"):
        load_series(p, tis=[0.8, 0.05, 0.4, 0.05])


@pytest.mark.parametrize("problem, match", [
    ("nan", r"NaN/Inf.*TI = 0\.2 s"),
    ("zero", r"TI = 0\.5 s is all zero"),
    ("constant", r"TI = 0\.05 s is constant"),
    ("negative", "negative"),
    ("3d", "expected 4D"),
    ("count", "4 inversion times for 5 images"),
])
def test_nifti_bad_values_and_shapes(tmp_path, problem, match):
    tis = [0.05, 0.1, 0.2, 0.5, 1.0]
    data = _series(shape=(4, 4, 1), n=5)
    if problem == "nan":
        data[1, 2, 0, 2] = np.nan
    elif problem == "zero":
        data[..., 3] = 0
    elif problem == "constant":
        data[..., 0] = 7.0
    elif problem == "negative":
        data[0, 0, 0, 1] = -3.0
    elif problem == "3d":
        data = data[:, :, 0, :]
    elif problem == "count":
        tis = tis[:4]
    p = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), p)
    (tmp_path / "bad.json").write_text(json.dumps({"InversionTime": tis}))
    with pytest.raises(InputError, match=match) as e:
        load_series(p)
    assert "bad.nii.gz" in _one_line(e)


def test_nifti_signed_flag_takes_magnitude(tmp_path):
    data = _series(shape=(3, 3, 1), n=4)
    data[..., 0] *= -1
    p = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), p)
    tis = [0.05, 0.2, 0.6, 1.5]
    s = load_series(p, tis=tis, signed=True)
    np.testing.assert_allclose(s.data, np.abs(data.astype(np.float32)))
    assert any("magnitude" in n for n in s.notes)
    # the same flag from a dcm2niix-style sidecar
    (tmp_path / "s.json").write_text(json.dumps({"InversionTime": tis, "ImageType": ["ORIGINAL", "PRIMARY", "R"]}))
    assert load_series(p).data.min() >= 0


def test_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_series(tmp_path / "missing.nii.gz")
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="corrupt.nii.gz") as e:
        load_series(bad, tis=[0.1, 0.2, 0.3])
    _one_line(e)
    p = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(_series(n=3).astype(np.float32), AFFINE), p)
    (tmp_path / "ok.json").write_text("{ not json")
    with pytest.raises(InputError, match="invalid JSON"):
        load_series(p)
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported"):
        load_series(other)


def test_load_nifti_map(tmp_path):
    m = RNG.uniform(size=(4, 3, 2))
    p = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(m.astype(np.float32), AFFINE), p)
    arr, aff = load_nifti_map(p)
    np.testing.assert_allclose(arr, m.astype(np.float32))
    np.testing.assert_allclose(aff, AFFINE)
    with pytest.raises(InputError):
        load_nifti_map(tmp_path / "nope.nii.gz")


# ============================================================================ BIDS IRT1 collection
def test_bids_irt1_round_trip(tmp_path):
    protocol = nist_15t_protocol(variable_tr=True)
    data = _series(shape=(4, 5, 2), n=protocol.n_images)
    folder = tmp_path / "anat"
    paths = save_bids_irt1(folder, "01", data, AFFINE, protocol)
    assert [p.name for p in paths][:2] == ["sub-01_inv-1_IRT1.nii.gz", "sub-01_inv-2_IRT1.nii.gz"]
    sc = json.loads((folder / "sub-01_inv-4_IRT1.json").read_text())
    assert sc["InversionTime"] == 0.4 and sc["RepetitionTime"] == 1.26
    for source in (folder, paths[3], folder / "sub-01"):
        s = load_series(source)
        np.testing.assert_allclose(s.data, data.astype(np.float32))
        np.testing.assert_allclose(s.affine, AFFINE)
        assert s.protocol == protocol
        assert len(s.files) == 2 * protocol.n_images


def test_bids_irt1_order_follows_inversion_time(tmp_path):
    # inv indices deliberately not in TI order
    tis = [0.9, 0.1, 0.3]
    for i, ti in enumerate(tis):
        img = np.full((3, 3, 1), 10.0 * (i + 1)) + np.arange(9).reshape(3, 3, 1)
        nib.save(nib.Nifti1Image(img.astype(np.float32), AFFINE), tmp_path / f"sub-x_inv-{i + 1}_IRT1.nii.gz")
        (tmp_path / f"sub-x_inv-{i + 1}_IRT1.json").write_text(json.dumps({"InversionTime": ti}))
    s = load_series(tmp_path)
    assert s.protocol.inversion_times_s == (0.1, 0.3, 0.9)
    assert s.data[0, 0, 0].tolist() == [20.0, 30.0, 10.0]


def test_bids_irt1_errors(tmp_path):
    protocol = nist_15t_protocol()
    data = _series(shape=(4, 4, 1), n=6)
    save_bids_irt1(tmp_path, "01", data, AFFINE, protocol)
    save_bids_irt1(tmp_path, "02", data, AFFINE, protocol)
    with pytest.raises(InputError, match="several BIDS IRT1 collections"):
        load_series(tmp_path)
    assert load_series(tmp_path / "sub-02").protocol.n_images == 6
    # a shape mismatch inside one collection
    nib.save(nib.Nifti1Image(np.ones((5, 4, 1), np.float32), AFFINE), tmp_path / "sub-02_inv-3_IRT1.nii.gz")
    with pytest.raises(InputError, match="shape") as e:
        load_series(tmp_path / "sub-02")
    _one_line(e)
    # a sidecar without InversionTime
    (tmp_path / "sub-01_inv-2_IRT1.json").write_text(json.dumps({"EchoTime": 0.01}))
    with pytest.raises(InputError, match="InversionTime"):
        load_series(tmp_path / "sub-01_inv-1_IRT1.nii.gz")
    # writing a shorter collection over a longer one would mix them
    with pytest.raises(InputError, match="mix"):
        save_bids_irt1(tmp_path, "01", data[..., :3], AFFINE, Protocol((0.1, 0.2, 0.3)))


# ============================================================================ writers
def _maps(shape=(4, 3, 2)):
    return {"T1": RNG.uniform(0.1, 3, shape), "PD": RNG.uniform(0, 1, shape), "B": RNG.uniform(1.5, 2, shape)}


def test_save_maps_writes_float32_and_sidecars(tmp_path):
    maps = _maps()
    out = tmp_path / "results" / "maps"
    written = save_maps(out, maps, AFFINE, {"T1": {"Units": "s", "value": np.float64(1.5)}})
    assert set(written) == {"T1", "PD", "B"}
    for name, arr in maps.items():
        img = nib.load(out / f"{name}.nii.gz")
        assert img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.get_fdata(), arr.astype(np.float32))
        np.testing.assert_allclose(img.affine, AFFINE)
        assert (out / f"{name}.json").is_file()
    assert json.loads((out / "T1.json").read_text()) == {"Units": "s", "value": 1.5}
    assert sorted(p.name for p in out.parent.iterdir()) == ["maps"]


def test_save_maps_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    real_save = nib.save
    calls = []

    def flaky_save(img, filename):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_save(img, filename)

    monkeypatch.setattr(nib, "save", flaky_save)
    out = tmp_path / "maps"
    with pytest.raises(InputError, match="disk full"):
        save_maps(out, _maps(), AFFINE, {})
    assert len(calls) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind

    def crash(img, filename):
        raise RuntimeError("boom")

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(RuntimeError):
        save_maps(out, _maps(), AFFINE, {})
    assert list(tmp_path.iterdir()) == []


def test_save_maps_rejects_bad_maps_before_writing(tmp_path):
    out = tmp_path / "maps"
    with pytest.raises(InputError, match="cannot be converted"):
        save_maps(out, {"T1": np.ones((3, 3, 1)), "bad": [[1, 2], [3]]}, AFFINE, {})
    with pytest.raises(InputError, match="share one grid"):
        save_maps(out, {"T1": np.ones((3, 3, 1)), "PD": np.ones((3, 4, 1))}, AFFINE, {})
    with pytest.raises(InputError, match="invalid map name"):
        save_maps(out, {"../T1": np.ones((3, 3, 1))}, AFFINE, {})
    with pytest.raises(InputError, match="JSON"):
        save_maps(out, {"T1": np.ones((3, 3, 1))}, AFFINE, {"T1": {"x": object()}})
    assert list(tmp_path.iterdir()) == []


def test_save_maps_existing_folder_and_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "maps"
    save_maps(out, _maps(), AFFINE, {})
    (out / "keep.txt").write_text("user file")
    new = {"T1": np.full((4, 3, 2), 2.0)}
    with pytest.raises(InputError, match="exists.*--overwrite") as e:
        save_maps(out, new, AFFINE, {})
    _one_line(e)
    old_pd = (out / "PD.nii.gz").read_bytes()
    save_maps(out, new, AFFINE, {"T1": {"Units": "s"}}, overwrite=True)
    np.testing.assert_allclose(nib.load(out / "T1.nii.gz").get_fdata(), 2.0)
    assert (out / "PD.nii.gz").read_bytes() == old_pd and (out / "keep.txt").read_text() == "user file"
    # a failure while overwriting leaves the old files and no temporary file
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(img, filename):
        raise OSError("simulated")

    monkeypatch.setattr(nib, "save", fail)
    with pytest.raises(InputError):
        save_maps(out, {"T1": np.zeros((4, 3, 2)), "PD": np.zeros((4, 3, 2))}, AFFINE, {}, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # an empty existing folder is fine without overwrite
    monkeypatch.undo()
    empty = tmp_path / "empty"
    empty.mkdir()
    save_maps(empty, new, AFFINE, {})
    assert (empty / "T1.nii.gz").is_file()


def test_save_maps_never_overwrites_inputs(tmp_path):
    p = save_series(tmp_path / "T1.nii.gz", _series(n=3), AFFINE, Protocol((0.1, 0.5, 1.0)))
    with pytest.raises(InputError, match="overwrite an input"):
        save_maps(tmp_path, {"T1": np.ones((5, 4, 2))}, AFFINE, {}, overwrite=True, protect=[p])
    with pytest.raises(InputError, match="input path"):
        save_maps(p, {"T1": np.ones((5, 4, 2))}, AFFINE, {}, overwrite=True, protect=[p])


def test_save_series_is_atomic_and_checks_shape(tmp_path, monkeypatch):
    protocol = Protocol((0.1, 0.5, 1.0))
    with pytest.raises(InputError, match="shape"):
        save_series(tmp_path / "x.nii.gz", _series(n=4), AFFINE, protocol)
    with pytest.raises(InputError, match="contradict"):
        save_series(tmp_path / "x.nii.gz", _series(n=3), AFFINE, protocol, extra_sidecar={"InversionTime": [1]})

    def fail(img, filename):
        raise OSError("simulated")

    monkeypatch.setattr(nib, "save", fail)
    with pytest.raises(InputError):
        save_series(tmp_path / "x.nii.gz", _series(n=3), AFFINE, protocol)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_series(tmp_path / "x.nii.gz", _series(n=3), AFFINE, protocol)
    with pytest.raises(InputError, match="exists"):
        save_series(tmp_path / "x.nii.gz", _series(n=3), AFFINE, protocol, overwrite=False)


# ============================================================================ real scans
def _nist_root() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    for cand in (os.environ.get("QMRI_NIST_DIR"), here / "shared" / "data" / "nist_phantom_ir",
                 here.parent / "shared" / "data" / "nist_phantom_ir", Path("/work/shared/data/nist_phantom_ir")):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


REAL_SCANS = {  # folder: (matrix, TR per image in s)
    "site1_20200218/plate5": (192, [1.0, 1.0, 1.0, 1.26, 1.86, 2.46]),
    "site2_20180925/plate5": (192, [1.0, 1.0, 1.0, 1.26, 1.86, 2.46]),
    "site3_ge/plate4": (256, [1.0] * 6),
    "site3_ge/plate5": (256, [1.0] * 6),
    "site4_philips/plate4": (192, [1.0] * 6),
    "site4_philips/plate5": (192, [1.0] * 6),
}


@pytest.mark.parametrize("folder", sorted(REAL_SCANS))
def test_real_nist_scans(folder):
    root = _nist_root()
    if root is None or not (root / folder).is_dir():
        pytest.skip(f"real scan folder {folder} not available")
    matrix, trs = REAL_SCANS[folder]
    s = load_series(root / folder)
    assert s.data.shape == (matrix, matrix, 1, 6)
    assert s.protocol.inversion_times_s == pytest.approx((0.05, 0.1, 0.2, 0.4, 0.6, 0.8))
    tr = np.broadcast_to(np.asarray(s.protocol.repetition_time_s, float), (6,))
    np.testing.assert_allclose(tr, trs)
    assert s.protocol.field_strength_t == 1.5 and s.protocol.echo_train_length == 1
    assert np.isfinite(s.data).all() and s.data.min() >= 0
    assert np.linalg.det(s.affine[:3, :3]) != 0
    np.testing.assert_allclose(s.voxel_size_mm[:2], 250.0 / matrix, rtol=0.01)  # 250 mm field of view
    if folder.startswith("site2"):
        assert any("signed real" in n for n in s.notes)
    if folder.startswith("site4"):
        assert any("Philips" in n for n in s.notes)
    # physical sanity: each sphere's mean signal follows the IR magnitude curve (drop to a null, rise)
    assert _median_ir_residual(s.data[:, :, 0], s.tis_s) < 0.01
    if folder.startswith("site4"):
        # the Philips display values PV*RS+RI (RS differs per image) do not: FP is the right scale
        files = sorted(Path(f) for f in s.files)
        dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.InversionTime))
        display = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss], -1)
        assert _median_ir_residual(display, s.tis_s) > 0.05


def _median_ir_residual(images: np.ndarray, tis: np.ndarray) -> float:
    """Median over the phantom's spheres of the RMS misfit of |A (1 - B exp(-TI/T1))|, relative to max.

    Grid search over T1 (5 ms-5 s) and B (0.5-2.5) with A solved in closed form: fast and robust.
    """
    from scipy import ndimage

    t1 = np.geomspace(0.005, 5.0, 300)[:, None, None]
    b = np.linspace(0.5, 2.5, 201)[None, :, None]
    shapes = np.abs(1 - b * np.exp(-tis / t1)).reshape(-1, len(tis))  # (T1 x B, N)
    last = images[..., -1]
    labels, n = ndimage.label(ndimage.binary_erosion(last > 0.3 * last.max(), iterations=2))
    residuals = []
    for k in range(1, n + 1):
        inside = labels == k
        if not 30 <= inside.sum() <= 3000:  # sphere-sized blobs only
            continue
        curve = images[inside].mean(axis=0)
        amp = shapes @ curve / (shapes ** 2).sum(axis=1)
        rms = np.sqrt(np.mean((amp[:, None] * shapes - curve) ** 2, axis=1))
        residuals.append(float(rms.min() / curve.max()))
    assert len(residuals) >= 8, f"found only {len(residuals)} spheres"
    return float(np.median(residuals))


@pytest.mark.parametrize("value", ["inf", "-1", "0", "nan", "lots"])
def test_input_size_limit_must_be_a_positive_number(monkeypatch, value):
    from custom_components.io import InputError, max_input_bytes

    monkeypatch.setenv("QMRI_MAX_INPUT_GB", value)
    with pytest.raises(InputError, match="QMRI_MAX_INPUT_GB must be a positive number of GB"):
        max_input_bytes()
    monkeypatch.setenv("QMRI_MAX_INPUT_GB", "0.5")
    assert max_input_bytes() == 500_000_000
