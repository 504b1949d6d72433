"""DICOM folders as scanners write them (issue 22, item 4): Enhanced MR multi-frame files, files not in
TI order, several series in one folder, a TR per image. Every file is built here with pydicom; every
test compares with the values written (pixels, TIs, TRs, geometry), not just "no exception"."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EnhancedCTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_io import FRAME_UID, STUDY_UID, write_dicom  # noqa: E402

from custom_components.io import InputError, load_series  # noqa: E402

RNG = np.random.default_rng(22)
SHAPE = (8, 8)
TIS_MS = [50.0, 100.0, 200.0, 400.0]
C, S = f"{np.cos(0.3):.6f}", f"{np.sin(0.3):.6f}"
IOP = [C, S, "0", "0", "0", "-1"]  # oblique: rows along (cos, sin, 0), columns along -z (LPS)
SPACING = ["1.5", "2"]
THICKNESS = 4.0


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def _pixels(n: int) -> list[np.ndarray]:
    """Distinct uint16 images, not constant."""
    return [(RNG.integers(0, 1000, size=SHAPE) + 150 * (i + 1)).astype(np.uint16) for i in range(n)]


def _ipp(k: int) -> list[str]:
    """ImagePositionPatient of slice k: 4 mm steps along the slice normal (row x column direction)."""
    iop = np.array([float(v) for v in IOP])
    normal = np.cross(iop[:3], iop[3:])
    return [f"{v:g}" for v in np.array([-10.0, 20.0, 35.0]) + k * THICKNESS * normal]


def _retag(path: Path, **tags) -> Path:
    """Set header attributes of a DICOM file written by :func:`write_dicom`."""
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def _classic(folder: Path, frames: list[dict], series_uid: str | None = None) -> None:
    """One classic MR Image Storage file per frame, the same values as :func:`write_enhanced`."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    for n, fr in enumerate(frames):
        write_dicom(folder / f"IM{n:03d}", fr["pixels"], fr["ti"], tr_ms=fr["tr"], slope=fr["slope"],
                    intercept=fr["intercept"], ipp=[float(v) for v in fr["ipp"]], iop=[float(v) for v in IOP],
                    spacing=[float(v) for v in SPACING], thickness=THICKNESS, series_uid=uid)


def write_enhanced(path: Path, frames: list[dict], *, per_frame: bool = True, sop: str = EnhancedMRImageStorage,
                   drop_ti: int | None = None, iop_of: dict[int, list[str]] | None = None,
                   spacing_of: dict[int, list[str]] | None = None, philips_ss: list[float] | None = None) -> Path:
    """One Enhanced MR Image Storage file holding ``frames`` (dicts: pixels, ti, tr, slope, intercept, ipp).

    per_frame: orientation, pixel measures, MR timing and rescale in each frame's functional groups
    (True), or in the shared group (False: then every frame must have the same TR and rescale).
    drop_ti: index of a frame written without MRModifierSequence InversionTimes. iop_of, spacing_of:
    per-frame orientation/spacing overrides (inconsistent geometry). philips_ss: a Philips MR Scale
    Slope per frame, in a private per-frame sequence (2005,xx0F), as Philips' enhanced files keep it.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Manufacturer = "Philips Medical Systems" if philips_ss else "TEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY_UID, generate_uid(), FRAME_UID
    ds.SeriesNumber, ds.SeriesDescription = 7, "IR_SE enhanced"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T1", "NONE"]
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.MagneticFieldStrength = 1.5
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = SHAPE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.stack([fr["pixels"] for fr in frames]).astype(np.uint16).tobytes()

    def timing(fr):
        return [_item(RepetitionTime=f"{fr['tr']:g}", EchoTrainLength=1)]

    shared = _item(MREchoSequence=[_item(EffectiveEchoTime=10.0)],
                   MRImageFrameTypeSequence=[_item(FrameType=["ORIGINAL", "PRIMARY", "T1", "NONE"],
                                                   ComplexImageComponent="MAGNITUDE")])
    if not per_frame:
        shared.PlaneOrientationSequence = [_item(ImageOrientationPatient=IOP)]
        shared.PixelMeasuresSequence = [_item(PixelSpacing=SPACING, SliceThickness=f"{THICKNESS:g}")]
        shared.MRTimingAndRelatedParametersSequence = timing(frames[0])
        shared.PixelValueTransformationSequence = [_item(RescaleSlope=f"{frames[0]['slope']:g}",
                                                         RescaleIntercept=f"{frames[0]['intercept']:g}",
                                                         RescaleType="US")]
    ds.SharedFunctionalGroupsSequence = [shared]
    items = []
    for n, fr in enumerate(frames):
        fg = _item(PlanePositionSequence=[_item(ImagePositionPatient=fr["ipp"])],
                   FrameContentSequence=[_item(InStackPositionNumber=n + 1)])
        if n != drop_ti:
            fg.MRModifierSequence = [_item(InversionRecovery="YES", InversionTimes=[fr["ti"]])]
        if per_frame:
            fg.PlaneOrientationSequence = [_item(ImageOrientationPatient=(iop_of or {}).get(n, IOP))]
            fg.PixelMeasuresSequence = [_item(PixelSpacing=(spacing_of or {}).get(n, SPACING),
                                              SliceThickness=f"{THICKNESS:g}")]
            fg.MRTimingAndRelatedParametersSequence = timing(fr)
            fg.PixelValueTransformationSequence = [_item(RescaleSlope=f"{fr['slope']:g}",
                                                         RescaleIntercept=f"{fr['intercept']:g}", RescaleType="US")]
        if philips_ss:
            inner = Dataset()
            inner.private_block(0x2005, "Philips MR Imaging DD 001", create=True).add_new(0x0E, "FL", philips_ss[n])
            fg.private_block(0x2005, "Philips MR Imaging DD 005", create=True).add_new(0x0F, "SQ", [inner])
        items.append(fg)
    ds.PerFrameFunctionalGroupsSequence = items
    ds.save_as(path, enforce_file_format=True)
    return path


def _item(**attrs) -> Dataset:
    d = Dataset()
    for k, v in attrs.items():
        setattr(d, k, v)
    return d


def _frames(n_slices=2, tis=TIS_MS, trs=None, slopes=None, intercepts=None) -> list[dict]:
    """Frames of an IR series, slice-major and TI in increasing order (callers shuffle them)."""
    trs = trs or [1000.0] * len(tis)
    slopes = slopes or [1.0] * len(tis)
    intercepts = intercepts or [0.0] * len(tis)
    out = []
    for k in range(n_slices):
        px = _pixels(len(tis))
        for n, ti in enumerate(tis):
            out.append(dict(pixels=px[n], ti=ti, tr=trs[n], slope=slopes[n], intercept=intercepts[n], ipp=_ipp(k),
                            slice=k, index=n))
    return out


def _expected(frames: list[dict], n_slices: int, n_ti: int) -> np.ndarray:
    """data[row, column, slice, TI] the reader must give: PV * RescaleSlope + RescaleIntercept."""
    out = np.empty(SHAPE + (n_slices, n_ti))
    for fr in frames:
        out[:, :, fr["slice"], fr["index"]] = fr["pixels"] * fr["slope"] + fr["intercept"]
    return out


def _expected_affine(n_slices: int) -> np.ndarray:
    """RAS affine of data[row, column, slice] from the geometry written (LPS -> RAS flips x and y)."""
    iop = np.array([float(v) for v in IOP])
    lps = np.eye(4)
    lps[:3, 0] = iop[3:] * float(SPACING[0])
    lps[:3, 1] = iop[:3] * float(SPACING[1])
    first, second = (np.array([float(v) for v in _ipp(k)]) for k in (0, 1))
    lps[:3, 2] = second - first  # the slice step as written (6 digits): 4 mm along the normal
    np.testing.assert_allclose(lps[:3, 2], np.cross(iop[:3], iop[3:]) * THICKNESS, atol=1e-4)
    lps[:3, 3] = first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# ============================================================================ 1. Enhanced MR multi-frame
@pytest.mark.parametrize("per_frame", [True, False], ids=["per-frame groups", "shared groups"])
def test_enhanced_multiframe_equals_classic_files(tmp_path, per_frame):
    n_slices = 2
    trs = [1000.0, 1000.0, 1260.0, 1860.0] if per_frame else None  # Siemens-like TR growing with TI
    slopes = [0.5, 2.0, 1.25, 3.0] if per_frame else [2.0] * 4
    intercepts = [0.0, 10.0, -5.0, 2.5] if per_frame else [3.0] * 4
    frames = _frames(n_slices, trs=trs, slopes=slopes, intercepts=intercepts)
    order = RNG.permutation(len(frames))  # frames stored neither by slice nor by TI
    write_enhanced((tmp_path / "enh").mkdir() or tmp_path / "enh" / "multi.dcm", [frames[i] for i in order],
                   per_frame=per_frame)
    _classic(tmp_path / "classic", frames)

    enh, cla = load_series(tmp_path / "enh"), load_series(tmp_path / "classic")
    # known answers: the values written
    assert enh.data.shape == (8, 8, n_slices, 4)
    np.testing.assert_array_equal(enh.data, _expected(frames, n_slices, 4))
    assert enh.protocol.inversion_times_s == tuple(t / 1000 for t in TIS_MS)
    tr_s = tuple(t / 1000 for t in (trs or [1000.0] * 4))
    assert enh.protocol.repetition_time_s == (tr_s if per_frame else tr_s[0])
    assert enh.protocol.echo_time_s == pytest.approx(0.010) and enh.protocol.echo_train_length == 1
    assert enh.protocol.field_strength_t == 1.5
    np.testing.assert_allclose(enh.affine, _expected_affine(n_slices), atol=1e-6)
    # and the same as the equivalent classic single-frame files
    np.testing.assert_array_equal(enh.data, cla.data)
    np.testing.assert_allclose(enh.affine, cla.affine, atol=1e-9)
    assert enh.protocol == cla.protocol
    assert enh.files == [str(tmp_path / "enh" / "multi.dcm")]
    assert any("enhanced multi-frame" in n and "8 frames of 1 file" in n for n in enh.notes)
    assert "InversionTimes (0018,9079)" in enh.protocol.timing_provenance["inversion_times_s"]
    assert "RepetitionTime" in enh.protocol.timing_provenance["repetition_time_s"]


def test_enhanced_frame_without_inversion_time_is_refused(tmp_path):
    frames = _frames(1, tis=TIS_MS[:3])
    write_enhanced(tmp_path / "m.dcm", frames, drop_ti=1)
    with pytest.raises(InputError) as e:
        load_series(tmp_path)
    msg = _one_line(e)
    assert "m.dcm: frame 2 of 3 has no inversion time" in msg and "InversionTimes (0018,9079)" in msg


def test_enhanced_without_any_inversion_time_keeps_the_refusal(tmp_path):
    frames = _frames(1, tis=TIS_MS[:1]) * 3
    write_enhanced(tmp_path / "m.dcm", frames, drop_ti=None)
    ds = pydicom.dcmread(tmp_path / "m.dcm")
    for fg in ds.PerFrameFunctionalGroupsSequence:
        del fg.MRModifierSequence
    ds.save_as(tmp_path / "m.dcm")
    with pytest.raises(InputError, match=r"multi-frame \(enhanced\) DICOM without per-frame inversion times .* "
                                         "not supported") as e:
        load_series(tmp_path)
    _one_line(e)


def test_multiframe_that_is_not_enhanced_mr_is_refused(tmp_path):
    write_enhanced(tmp_path / "ct.dcm", _frames(1, tis=TIS_MS[:3]), sop=EnhancedCTImageStorage)
    with pytest.raises(InputError, match=r"multi-frame \(enhanced\) DICOM of SOP class .*Enhanced CT.* not "
                                         "supported") as e:
        load_series(tmp_path)
    _one_line(e)


@pytest.mark.parametrize("problem", ["orientation", "spacing", "position"])
def test_enhanced_frames_with_inconsistent_geometry_are_refused(tmp_path, problem):
    frames = _frames(1, tis=TIS_MS[:3])
    kw = {}
    if problem == "orientation":
        kw["iop_of"] = {2: ["1", "0", "0", "0", "1", "0"]}
    elif problem == "spacing":
        kw["spacing_of"] = {1: ["1.5", "2.5"]}
    else:  # frame 2 moved 3 mm along the rows, in the slice's plane: the same slice position, another grid
        frames[1]["ipp"] = [f"{float(v) + 3 * float(d):g}" for v, d in zip(frames[1]["ipp"], IOP[:3])]
    write_enhanced(tmp_path / "g.dcm", frames, **kw)
    with pytest.raises(InputError) as e:
        load_series(tmp_path)
    msg = _one_line(e)
    if problem == "position":
        assert "ImagePositionPatient of g.dcm frame 2" in msg and "within one slice" in msg
    else:
        key = "ImageOrientationPatient" if problem == "orientation" else "PixelSpacing"
        assert f"frames with inconsistent geometry: {key}" in msg and "frame 1" in msg


def test_enhanced_philips_per_frame_scale_slope(tmp_path):
    slopes, ss = [1.221, 1.325, 1.853], [0.131, 0.161, 0.1607]
    frames = _frames(1, tis=TIS_MS[:3], slopes=slopes)
    write_enhanced(tmp_path / "p.dcm", frames, philips_ss=ss)
    ds = pydicom.dcmread(tmp_path / "p.dcm")  # a top-level scale slope too: each frame's own one wins
    ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True).add_new(0x0E, "FL", 9.5)
    ds.save_as(tmp_path / "p.dcm")
    s = load_series(tmp_path)
    for n, fr in enumerate(frames):  # Philips floating-point value FP = (PV*RS + RI) / (RS*SS)
        fp = (fr["pixels"] * slopes[n]) / (slopes[n] * np.float32(ss[n]))
        np.testing.assert_allclose(s.data[:, :, 0, n], fp, rtol=1e-6)
    assert any("Philips" in n for n in s.notes)


# ============================================================================ 2. files not in TI order
def test_shuffled_names_and_instance_numbers_give_the_sorted_series(tmp_path):
    frames = _frames(2, slopes=[1.0, 0.5, 2.0, 1.5], intercepts=[0.0, 5.0, 0.0, -2.0])
    uid = generate_uid()
    _classic(tmp_path / "sorted", frames, series_uid=uid)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    order = RNG.permutation(len(frames))
    instance = RNG.permutation(len(frames)) + 1  # InstanceNumber not following TI either
    for k, i in enumerate(order):
        fr = frames[i]
        f = write_dicom(shuffled / f"{RNG.integers(10**6):06d}_{k}", fr["pixels"], fr["ti"], tr_ms=fr["tr"],
                        slope=fr["slope"], intercept=fr["intercept"], ipp=[float(v) for v in fr["ipp"]],
                        iop=[float(v) for v in IOP], spacing=[float(v) for v in SPACING], thickness=THICKNESS,
                        series_uid=uid)
        _retag(f, InstanceNumber=int(instance[k]))
    a, b = load_series(tmp_path / "sorted"), load_series(shuffled)
    np.testing.assert_array_equal(b.data, a.data)
    np.testing.assert_array_equal(b.data, _expected(frames, 2, 4))
    assert b.protocol == a.protocol and b.protocol.inversion_times_s == tuple(t / 1000 for t in TIS_MS)
    np.testing.assert_allclose(b.affine, _expected_affine(2), atol=1e-6)


# ============================================================================ 3. several series in one folder
def _series(folder: Path, number: int, description: str, tis, *, tr_ms=1000.0, iop=IOP, spacing=SPACING,
            uid: str | None = None, shape=SHAPE) -> None:
    uid = uid or generate_uid()
    for n, ti in enumerate(tis):
        px = (RNG.integers(0, 1000, size=shape) + 100).astype(np.uint16)
        f = write_dicom(folder / f"S{number}_{n}", px, ti, tr_ms=tr_ms, ipp=[float(v) for v in _ipp(0)],
                        iop=[float(v) for v in iop], spacing=[float(v) for v in spacing], series_uid=uid)
        _retag(f, SeriesNumber=number, SeriesDescription=description)


def test_ir_series_and_localizer_are_refused_with_a_list(tmp_path):
    _series(tmp_path, 5, "T1_IR", TIS_MS)
    _series(tmp_path, 1, "localizer", [None, None, None], iop=["1", "0", "0", "0", "1", "0"], shape=(8, 6))
    with pytest.raises(InputError) as e:
        load_series(tmp_path)
    msg = _one_line(e)
    assert "mixed series: 2 DICOM series in one folder" in msg
    assert "series found: #1 'localizer' (3 images, no InversionTime); #5 'T1_IR' (4 images, TI 50, 100, 200, 400 ms)" in msg
    assert "put each series in its own folder" in msg


@pytest.mark.parametrize("second", ["same TIs, TR 3 s", "other pixel spacing", "same TIs, same protocol"])
def test_two_ir_series_are_refused_with_a_list(tmp_path, second):
    _series(tmp_path, 5, "IR_a", TIS_MS)
    kw = {"tr_ms": 3000.0} if second.endswith("TR 3 s") else {"spacing": ["1.0", "1.0"]} if "spacing" in second else {}
    _series(tmp_path, 6, "IR_b", TIS_MS[:3], **kw)
    with pytest.raises(InputError) as e:
        load_series(tmp_path)
    msg = _one_line(e)
    assert "#5 'IR_a' (4 images, TI 50, 100, 200, 400 ms); #6 'IR_b' (3 images, TI 50, 100, 200 ms)" in msg
    if "spacing" in second:
        assert "PixelSpacing is [1, 1] in S6_0 but [1.5, 2] in S5_0 (different SeriesInstanceUID)" in msg
    else:
        assert "holds 4 inversion times" in msg


def test_one_series_per_ti_is_one_ir_series(tmp_path):
    # the Siemens NIST layout: each TI its own series (and its own TR), 2 slices each
    trs = [1000.0, 1000.0, 1260.0, 1860.0]
    frames = _frames(2, trs=trs)
    uids = [generate_uid() for _ in TIS_MS]
    for k, fr in enumerate(frames):
        f = write_dicom(tmp_path / f"x{RNG.integers(10**6)}_{k}", fr["pixels"], fr["ti"], tr_ms=fr["tr"],
                        ipp=[float(v) for v in fr["ipp"]], iop=[float(v) for v in IOP],
                        spacing=[float(v) for v in SPACING], thickness=THICKNESS, series_uid=uids[fr["index"]])
        _retag(f, SeriesNumber=10 + fr["index"], SeriesDescription=f"IR TI{fr['ti']:g}")
    s = load_series(tmp_path)
    np.testing.assert_array_equal(s.data, _expected(frames, 2, 4))
    assert s.protocol.repetition_time_s == tuple(t / 1000 for t in trs)
    assert any("4 DICOM series (one per TI)" in n for n in s.notes)
    # a fifth series repeating TI 100 ms at the same slices is not part of it
    _series(tmp_path, 20, "IR TI100 repeat", [100.0])
    with pytest.raises(InputError) as e:
        load_series(tmp_path)
    msg = _one_line(e)
    assert "two images with TI 100 ms at slice position" in msg and "come from different series" in msg
    assert "#11 'IR TI100' (2 images, TI 100 ms)" in msg and "#20 'IR TI100 repeat' (1 image, TI 100 ms)" in msg


# ============================================================================ 4. a TR per image
def test_tr_growing_with_ti_follows_its_ti_after_sorting(tmp_path):
    tis = [800.0, 50.0, 400.0, 100.0, 600.0, 200.0]  # written out of order, each with its own TR
    trs = {50.0: 1000.0, 100.0: 1000.0, 200.0: 1000.0, 400.0: 1260.0, 600.0: 1860.0, 800.0: 2460.0}
    uid = generate_uid()
    px = {ti: p for ti, p in zip(tis, _pixels(len(tis)))}
    for k, ti in enumerate(tis):
        f = write_dicom(tmp_path / f"IMG{(k * 7) % 6}", px[ti], ti, tr_ms=trs[ti], series_uid=uid)
        _retag(f, InstanceNumber=k + 1)
    s = load_series(tmp_path)
    assert s.protocol.inversion_times_s == (0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
    assert s.protocol.repetition_time_s == (1.0, 1.0, 1.0, 1.26, 1.86, 2.46)
    for n, ti in enumerate(sorted(tis)):
        np.testing.assert_array_equal(s.data[:, :, 0, n], px[ti])
    assert s.protocol.timing_provenance["repetition_time_s"] == "DICOM RepetitionTime (0018,0080)"


def test_tr_differing_between_slices_of_one_ti_is_refused(tmp_path):
    frames = _frames(2, trs=[1000.0, 1000.0, 1260.0, 1860.0])
    frames[4 + 2]["tr"] = 1300.0  # slice 1, TI 200 ms
    _classic(tmp_path, frames)
    with pytest.raises(InputError) as e:
        load_series(tmp_path)
    msg = _one_line(e)
    assert "RepetitionTime differs between slices at TI 200 ms: 1260 ms" in msg and "but 1300 ms" in msg


def test_tr_missing_in_one_image_is_refused(tmp_path):
    frames = _frames(1)
    _classic(tmp_path, frames)
    _retag(tmp_path / "IM002", RepetitionTime=None)
    with pytest.raises(InputError, match=r"RepetitionTime \(0018,0080\) is missing in IM002") as e:
        load_series(tmp_path)
    _one_line(e)
