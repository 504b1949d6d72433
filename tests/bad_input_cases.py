"""The bad-input catalogue: inputs that `qmri map` must refuse with one line and a non-zero exit, leaving
no output behind and its inputs untouched.

Each :class:`Case` builds its input in an empty folder and returns the `qmri` arguments; ``expect`` is a
piece of the one-line error. ``tests/test_bad_input.py`` runs every case; ``scripts/bad_input_catalogue.py``
runs them too and writes the table in docs/bad_input.md with the message each one gives.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io as _io
import json
import pickle
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from custom_components.io import save_bids_irt1, save_series
from custom_components.physics.protocol import get_protocol, nist_15t_protocol
from custom_components.physics.signal_model import signal

REPO = Path(__file__).resolve().parents[1]
OUT = "maps"  # every case writes (or would write) into <folder>/maps


def _series(protocol="paper", shape=(8, 8, 1)) -> np.ndarray:
    p = get_protocol(protocol) if isinstance(protocol, str) else protocol
    t1 = np.linspace(0.3, 2.0, int(np.prod(shape))).reshape(shape)
    params = np.stack([t1, np.full(shape, 100.0), np.full(shape, 1.95)])
    return signal(params, p).numpy().transpose(1, 2, 3, 0).astype(np.float32)


def _nifti(d: Path, data=None, protocol="paper", sidecar=True, name="scan.nii.gz") -> Path:
    p = get_protocol(protocol) if isinstance(protocol, str) else protocol
    data = _series(p) if data is None else data
    path = save_series(d / name, data, np.eye(4), p)
    if not sidecar:
        (d / name.replace(".nii.gz", ".json")).unlink()
    return path


def _map(path, *extra) -> list[str]:
    return ["map", str(path), "--out", str(path.parent / OUT), "--quiet", *extra]


class Evil:
    """An object whose unpickling runs code: it would create a file named PWNED beside the weights."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def _dicom(path: Path, pixels: np.ndarray, ti_ms: float | None, series_uid: str, tr_ms: float = 1000.0,
           te_ms: float = 10.0, series: tuple[int, str] | None = None, iop=(1, 0, 0, 0, 1, 0)) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3", series_uid, "1.2.3.4"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = f"{tr_ms:g}", f"{te_ms:g}", 1
    if ti_ms is not None:
        ds.InversionTime = f"{ti_ms:g}"
    if series is not None:
        ds.SeriesNumber, ds.SeriesDescription = series
    ds.MagneticFieldStrength, ds.SliceThickness = "1.5", "4"
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], list(iop), [1, 1]
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


# ------------------------------------------------------------------------------------------ builders
def wrong_ti_count_for_model(d):
    return _map(_nifti(d, protocol="nist15"), "--method", "resnet", "--weights",
                str(REPO / "bundles" / "resnet" / "models" / "model.pt"))


def no_shipped_weights_for_protocol(d):
    """No --weights: qmri map chooses among the shipped weights by their cards; none has TR 3 s."""
    return _map(_nifti(d, protocol=get_protocol("paper").with_(repetition_time_s=3.0)), "--method", "diffusor")


def wrong_tr_for_model(d):
    return _map(_nifti(d, protocol=get_protocol("paper").with_(repetition_time_s=3.0)), "--method", "resnet", "--weights",
                str(REPO / "bundles" / "resnet" / "models" / "model.pt"))


def tis_missing(d):
    return _map(_nifti(d, sidecar=False))


def tis_duplicated(d):
    return _map(_nifti(d, sidecar=False), "--tis", "0.05,0.1,0.25,0.25,0.85,1.5,2.5", "--tr", "10")


def tis_count_differs_from_images(d):
    return _map(_nifti(d, sidecar=False), "--tis", "0.05,0.1,0.25,0.5,0.85,1.5", "--tr", "10")


def tis_not_numbers(d):
    return _map(_nifti(d, sidecar=False), "--tis", "0.05,a,0.25,0.5,0.85,1.5,2.5", "--tr", "10")


def tis_negative(d):
    return _map(_nifti(d, sidecar=False), "--tis", "-0.05,0.1,0.25,0.5,0.85,1.5,2.5", "--tr", "10")


def ti_longer_than_tr(d):
    return _map(_nifti(d, sidecar=False), "--tis", "0.05,0.1,0.25,0.5,0.85,1.5,2.5", "--tr", "1")


def mismatched_image_shapes(d):
    p = nist_15t_protocol()
    files = save_bids_irt1(d, "01", _series(p), np.eye(4), p)
    import nibabel as nib

    odd = nib.Nifti1Image(np.ones((6, 8, 1), np.float32), np.eye(4))
    nib.save(odd, str(files[2]))
    return ["map", str(d), "--out", str(d / OUT), "--quiet"]


def _raw_nifti(d: Path, x: np.ndarray) -> Path:
    """A NIfTI written with nibabel alone (save_series itself refuses non-finite data) + its sidecar."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(x, np.eye(4)), str(d / "scan.nii.gz"))
    (d / "scan.json").write_text(json.dumps({"InversionTime": list(get_protocol("paper").tis), "RepetitionTime": 10.0}))
    return d / "scan.nii.gz"


def nan_in_image(d):
    x = _series()
    x[2, 3, 0, 4] = np.nan
    return _map(_raw_nifti(d, x))


def inf_in_image(d):
    x = _series()
    x[1, 1, 0, 0] = np.inf
    return _map(_raw_nifti(d, x))


def fse_echo_train_longer_than_tr(d):
    """A dcm2niix-style FSE sidecar: EchoTime is the effective TE (0.1 s), 64 echoes, TR 4 s."""
    path = _raw_nifti(d, _series())
    path.with_name("scan.json").write_text(json.dumps({"InversionTime": list(get_protocol("paper").tis),
                                                       "RepetitionTime": 4.0, "EchoTime": 0.1, "EchoTrainLength": 64}))
    return _map(path)


def negative_magnitude(d):
    x = _series()
    x[0, 0, 0, 0] = -5.0
    return _map(_nifti(d, x))


def all_zero_images(d):
    return _map(_nifti(d, np.zeros_like(_series())))


def constant_image(d):
    x = _series()
    x[..., 3] = 7.0
    return _map(_nifti(d, x))


def three_d_instead_of_four_d(d):
    import nibabel as nib

    nib.save(nib.Nifti1Image(_series()[..., 0], np.eye(4)), str(d / "scan.nii.gz"))
    return _map(d / "scan.nii.gz", "--tis", "0.05,0.1,0.25,0.5,0.85,1.5,2.5", "--tr", "10")


def dicom_mixing_protocols(d):
    folder = d / "dicom"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, ti in enumerate((50, 100, 200, 400, 800)):
        _dicom(folder / f"a{i}.dcm", rng.integers(100, 900, (8, 8)), ti, "1.2.3.1", tr_ms=1000)
    for i, ti in enumerate((50, 100, 200, 400, 800)):
        _dicom(folder / f"b{i}.dcm", rng.integers(100, 900, (8, 8)), ti, "1.2.3.2", tr_ms=3000)
    return ["map", str(folder), "--out", str(d / OUT), "--quiet"]


def dicom_mixing_echo_times(d):
    # one series per TI is normal (the Siemens NIST scans; their TR even grows with TI), but images
    # of one IR series must share matrix, geometry, echo time, field and image type
    folder = d / "dicom"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, ti in enumerate((50, 100, 200, 400, 800)):
        _dicom(folder / f"s{i}.dcm", rng.integers(100, 900, (8, 8)), ti, f"1.2.3.{i}", te_ms=10 if i < 3 else 80)
    return ["map", str(folder), "--out", str(d / OUT), "--quiet"]


def dicom_ir_series_and_localizer(d):
    """An IR series (#5, 5 TIs) and the localizer of the same exam (#1, 3 images, no TI, sagittal) in one folder."""
    folder = d / "dicom"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, ti in enumerate((50, 100, 200, 400, 800)):
        _dicom(folder / f"IM{i:04d}", rng.integers(100, 900, (8, 8)), ti, "1.2.3.5", series=(5, "T1_IR_SE"))
    for i in range(3):
        _dicom(folder / f"IM{5 + i:04d}", rng.integers(100, 900, (8, 8)), None, "1.2.3.1", series=(1, "localizer"),
               iop=(0, 1, 0, 0, 0, -1))
    return ["map", str(folder), "--out", str(d / OUT), "--quiet"]


def dicom_enhanced_frame_without_ti(d):
    """One Enhanced MR multi-frame file of 4 frames (one slice, TI 50-400 ms) whose frame 3 has no inversion time."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

    def item(**attrs):
        x = Dataset()
        for k, v in attrs.items():
            setattr(x, k, v)
        return x

    folder = d / "dicom"
    folder.mkdir()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = EnhancedMRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = EnhancedMRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3", "1.2.3.7", "1.2.3.4"
    ds.ImageType, ds.ComplexImageComponent, ds.MagneticFieldStrength = ["ORIGINAL", "PRIMARY", "T1", "NONE"], "MAGNITUDE", 1.5
    ds.NumberOfFrames, ds.Rows, ds.Columns = 4, 8, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(0).integers(100, 900, (4, 8, 8)).astype(np.uint16).tobytes()
    ds.SharedFunctionalGroupsSequence = [item(
        PlaneOrientationSequence=[item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])],
        PixelMeasuresSequence=[item(PixelSpacing=[1, 1], SliceThickness=4)],
        MRTimingAndRelatedParametersSequence=[item(RepetitionTime=1000, EchoTrainLength=1)],
        MREchoSequence=[item(EffectiveEchoTime=10.0)])]
    frames = []
    for n, ti in enumerate((50.0, 100.0, 200.0, 400.0)):
        fg = item(PlanePositionSequence=[item(ImagePositionPatient=[0, 0, 0])])
        if n != 2:
            fg.MRModifierSequence = [item(InversionRecovery="YES", InversionTimes=[ti])]
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.save_as(folder / "enhanced.dcm", enforce_file_format=True)
    return ["map", str(folder), "--out", str(d / OUT), "--quiet"]


def truncated_nifti(d):
    path = _nifti(d)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return _map(path)


def not_an_image(d):
    (d / "scan.nii.gz").write_text("this is a text file, not a NIfTI image\n")
    (d / "scan.json").write_text(json.dumps({"InversionTime": [0.05, 0.1, 0.25, 0.5, 0.85, 1.5, 2.5]}))
    return _map(d / "scan.nii.gz")


def sidecar_not_json(d):
    path = _nifti(d)
    (d / "scan.json").write_text("{InversionTime: [0.05, 0.1")
    return _map(path)


def huge_input(d):
    """A header declaring 20000 x 20000 x 100 x 7 float32 voxels (the file holds none of them)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((20000, 20000, 100, 7))
    hdr.set_data_dtype(np.float32)
    with open(d / "scan.nii", "wb") as f:
        f.write(hdr.binaryblock + b"\0" * (352 - len(hdr.binaryblock)))
    (d / "scan.json").write_text(json.dumps({"InversionTime": [0.05, 0.1, 0.25, 0.5, 0.85, 1.5, 2.5],
                                             "RepetitionTime": 10.0}))
    return _map(d / "scan.nii")


def output_folder_not_empty(d):
    path = _nifti(d)
    (d / OUT).mkdir()
    (d / OUT / "T1map.nii.gz").write_bytes(b"an earlier result")
    return _map(path)


def output_would_overwrite_the_input(d):
    path = _nifti(d, name="T1map.nii.gz")  # an input series that happens to be named like an output map
    return ["map", str(path), "--out", str(d), "--overwrite", "--quiet"]


def mask_shape_differs(d):
    import nibabel as nib

    path = _nifti(d)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 1), np.float32), np.eye(4)), str(d / "mask.nii.gz"))
    return _map(path, "--mask", str(d / "mask.nii.gz"))


def weights_with_hidden_code(d):
    path = _nifti(d)
    with open(d / "evil.pt", "wb") as f:
        pickle.dump({"conv.weight": Evil(str(d / "PWNED"))}, f)
    _card(d / "evil.json", "resnet")
    return _map(path, "--method", "resnet", "--weights", str(d / "evil.pt"))


def weights_in_a_torch_zip_with_hidden_code(d):
    path = _nifti(d)
    torch.save({"conv.weight": Evil(str(d / "PWNED"))}, d / "evil.pt")
    _card(d / "evil.json", "resnet")
    return _map(path, "--method", "resnet", "--weights", str(d / "evil.pt"))


def weights_of_another_network(d):
    path = _nifti(d)
    torch.save({"not.a.layer": torch.zeros(3)}, d / "other.pt")
    _card(d / "other.json", "resnet")
    return _map(path, "--method", "resnet", "--weights", str(d / "other.pt"))


def weights_file_missing(d):
    return _map(_nifti(d), "--method", "resnet", "--weights", str(d / "nowhere.pt"))


def diffusor_symmetry_unknown(d):
    return _map(_nifti(d), "--method", "diffusor", "--symmetry", "rotations")


def diffusor_sampler_unknown(d):
    return _map(_nifti(d), "--method", "diffusor", "--sampler", "euler")


def diffusor_no_samples(d):
    return _map(_nifti(d), "--method", "diffusor", "--samples", "0")


def diffusor_dc_crlb_negative(d):
    return _map(_nifti(d), "--method", "diffusor", "--dc_crlb", "-1")


def fit_with_dc_crlb(d):
    return _map(_nifti(d), "--method", "mle", "--dc_crlb", "3")


def weights_card_with_code(d):
    """The shipped RIM weights with a card whose network_preset is a MONAI "$" expression that would
    create PWNED beside them when the config is parsed (issue 19, item 1)."""
    import shutil

    path = _nifti(d)
    shutil.copyfile(REPO / "bundles" / "rim" / "models" / "model.pt", d / "w.pt")
    card = json.loads((REPO / "bundles" / "rim" / "models" / "model.json").read_text())
    card["network_preset"] = f"$__import__('pathlib').Path({str(d / 'PWNED')!r}).write_text('owned') and 'compact'"
    (d / "w.json").write_text(json.dumps(card))
    return _map(path, "--method", "rim", "--weights", str(d / "w.pt"))


def device_with_code(d):
    """A --device value that was pasted into the config expression "$torch.device('...')"."""
    evil = f"cpu') if __import__('pathlib').Path({str(d / 'PWNED')!r}).write_text('owned') else ('cpu"
    return _map(_nifti(d), "--method", "rim", "--device", evil)


def _card(path: Path, method: str):
    card = json.loads((REPO / "bundles" / method / "models" / "model.json").read_text())
    path.write_text(json.dumps(card))


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    build: Callable[[Path], list[str]]
    expect: str
    #: a context manager active while `qmri` runs (an :data:`INTERNAL_CASES` entry plants a bug with it)
    patch: Callable[[], contextlib.AbstractContextManager] | None = None

    def as_expected(self, o: "Outcome") -> bool:
        """Bad input: one line, exit 2. An internal error (``patch``): its traceback and exit 1, not
        dressed up as bad input. Either way nothing is left behind, the inputs are untouched, no file's code runs."""
        if self.patch is None:
            shown = o.code == 2 and o.stderr.startswith("qmri: error: ") and "\n" not in o.stderr
        else:
            shown = o.code == 1 and "Traceback (most recent call last)" in o.stderr and "qmri: error" not in o.stderr
        return shown and self.expect in o.stderr and not o.new_files and o.inputs_unchanged and not o.code_ran


CASES = [
    Case("wrong_ti_count_for_model", "6 TIs (1.5 T NIST protocol) into the ResNet weights trained for the paper's 7 (--weights)",
         wrong_ti_count_for_model, "train a model for this protocol"),
    Case("no_shipped_weights_for_protocol", "the paper's TIs with TR 3 s into the Diffusor: no shipped weights' card has that timing",
         no_shipped_weights_for_protocol, "no diffusor weights in"),
    Case("wrong_tr_for_model", "the paper's TIs with TR 3 s into the ResNet weights trained for TR 10 s (--weights)",
         wrong_tr_for_model, "trained for TR 10.0 s"),
    Case("tis_missing", "4D NIfTI without sidecar and without --tis", tis_missing, "no inversion times"),
    Case("tis_duplicated", "--tis with one TI twice", tis_duplicated, "duplicate"),
    Case("tis_count_differs", "--tis with 6 values for 7 images", tis_count_differs_from_images, "6 inversion times"),
    Case("tis_not_numbers", "--tis with a letter", tis_not_numbers, "must be numbers"),
    Case("tis_negative", "--tis with a negative TI", tis_negative, "must be finite and > 0"),
    Case("ti_longer_than_tr", "TI of 2.5 s with TR 1 s", ti_longer_than_tr, "TR"),
    Case("fse_echo_train_longer_than_tr", "FSE sidecar (dcm2niix): EchoTrainLength 64, effective EchoTime 0.1 s, "
         "TR 4 s, no echo spacing", fse_echo_train_longer_than_tr, "impossible timing"),
    Case("mismatched_image_shapes", "BIDS IRT1 collection with one image of another matrix", mismatched_image_shapes,
         "shape"),
    Case("nan_in_image", "a NaN voxel", nan_in_image, "NaN/Inf"),
    Case("inf_in_image", "an Inf voxel", inf_in_image, "NaN/Inf"),
    Case("negative_magnitude", "a negative value in magnitude images", negative_magnitude, "negative value"),
    Case("all_zero_images", "every image all zero", all_zero_images, "all zero"),
    Case("constant_image", "one image constant", constant_image, "is constant"),
    Case("three_d_instead_of_four_d", "a 3D image where a 4D series is expected", three_d_instead_of_four_d,
         "expected 4D"),
    Case("dicom_mixing_protocols", "a DICOM folder holding two series of the same TIs (TR 1 s and 3 s)",
         dicom_mixing_protocols, "put each series in its own folder"),
    Case("dicom_mixing_echo_times", "a DICOM folder of one series per TI whose echo time changes (10 and 80 ms)",
         dicom_mixing_echo_times, "EchoTime"),
    Case("dicom_ir_series_and_localizer", "a DICOM folder holding an IR series (#5, 5 TIs) and a localizer (#1, 3 "
         "images without TI)", dicom_ir_series_and_localizer, "series found: #1 'localizer' (3 images, no InversionTime)"),
    Case("dicom_enhanced_frame_without_ti", "an Enhanced MR multi-frame file whose frame 3 of 4 has no inversion time "
         "(MRModifierSequence InversionTimes)", dicom_enhanced_frame_without_ti, "frame 3 of 4 has no inversion time"),
    Case("truncated_nifti", "a NIfTI cut in half", truncated_nifti, "cannot read NIfTI"),
    Case("not_an_image", "a text file named scan.nii.gz", not_an_image, "cannot read NIfTI"),
    Case("sidecar_not_json", "a sidecar that is not valid JSON", sidecar_not_json, "invalid JSON"),
    Case("huge_input", "a header declaring 20000 x 20000 x 100 x 7 voxels", huge_input, "QMRI_MAX_INPUT_GB"),
    Case("output_folder_not_empty", "the output folder holds earlier results (no --overwrite)",
         output_folder_not_empty, "pass --overwrite"),
    Case("output_would_overwrite_the_input", "input named T1map.nii.gz, --out its own folder, with --overwrite",
         output_would_overwrite_the_input, "overwrite an input file"),
    Case("mask_shape_differs", "a mask of another matrix", mask_shape_differs, "mask"),
    Case("weights_with_hidden_code", "weights: a pickle whose unpickling would create a file",
         weights_with_hidden_code, "refused: the file holds Python objects"),
    Case("weights_in_a_torch_zip_with_hidden_code", "weights: torch.save of an object that runs code when loaded",
         weights_in_a_torch_zip_with_hidden_code, "refused: the file holds Python objects"),
    Case("weights_of_another_network", "weights whose tensors belong to another network", weights_of_another_network,
         "weights"),
    Case("weights_file_missing", "--weights pointing nowhere", weights_file_missing, "nowhere.pt"),
    Case("weights_card_with_code", "weights card whose network_preset is a MONAI \"$\" expression that would "
         "create a file", weights_card_with_code, "is an expression or reference, not a plain value"),
    Case("device_with_code", "--device holding Python code (it was pasted into a config expression)",
         device_with_code, "--device must be cpu, mps, cuda or cuda:N"),
    Case("diffusor_symmetry_unknown", "--symmetry rotations (the Diffusor knows none, flips, dihedral)",
         diffusor_symmetry_unknown, "--symmetry must be one of"),
    Case("diffusor_sampler_unknown", "--sampler euler (the Diffusor knows dpm++2m, ddim, ddpm)", diffusor_sampler_unknown,
         "--sampler must be one of"),
    Case("diffusor_no_samples", "--samples 0 (an ensemble needs at least one member)", diffusor_no_samples,
         "--samples must be at least 1"),
    Case("diffusor_dc_crlb_negative", "--dc_crlb -1 (the CRLB bound is a factor >= 0)", diffusor_dc_crlb_negative,
         "--dc_crlb must be a number >= 0"),
    Case("fit_with_dc_crlb", "--dc_crlb with --method mle (it bounds the Diffusor's data-consistency prior)",
         fit_with_dc_crlb, "--dc_crlb applies to --method diffusor only"),
]


@contextlib.contextmanager
def _fit_with_a_bug():
    """Plants a bug in the code: the classical fit fails with numpy's broadcasting ValueError, as a
    shape slip inside it would (the command line before issue 19 printed it as bad input, exit 2)."""
    from custom_components.methods import fitting

    def broken(self, *args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (7,64) (6,64)")

    original = fitting.InversionRecoveryModel.fit
    fitting.InversionRecoveryModel.fit = broken
    try:
        yield
    finally:
        fitting.InversionRecoveryModel.fit = original


#: Errors of the code itself, which `qmri` must NOT report as bad input: it shows their traceback
#: and exits with status 1 (what Python gives an uncaught exception).
INTERNAL_CASES = [
    Case("internal_error", "a valid series, with a bug planted in the code (the fit raises numpy's broadcasting "
         "ValueError)", lambda d: _map(_nifti(d)), "ValueError: operands could not be broadcast", _fit_with_a_bug),
]


def _tree_digest(folder: Path, skip: str) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.relative_to(folder).parts[0] == skip}


@dataclass
class Outcome:
    code: int
    stderr: str
    new_files: list[str]
    inputs_unchanged: bool
    code_ran: bool


def run_case(case: Case, folder: Path) -> Outcome:
    """Build the case in ``folder`` (empty), run ``qmri`` in-process and report what happened."""
    from custom_components.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    argv = case.build(folder)
    before = _tree_digest(folder, OUT)
    existed = (folder / OUT).exists() and set(p.name for p in (folder / OUT).iterdir())
    err = _io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()), \
            (case.patch() if case.patch is not None else contextlib.nullcontext()):
        try:
            code = main(argv)
        except Exception:  # noqa: BLE001 - as the interpreter would: the traceback on stderr, status 1
            traceback.print_exc()
            code = 1
    after = _tree_digest(folder, OUT)
    out_now = set(p.name for p in (folder / OUT).iterdir()) if (folder / OUT).exists() else set()
    new = sorted(set(after) - set(before)) + sorted(out_now - (existed or set()))
    new = [n for n in new if n != "PWNED"]
    changed = any(after.get(k) != v for k, v in before.items())
    return Outcome(code, err.getvalue().strip(), new, not changed, (folder / "PWNED").exists())


__all__ = ["CASES", "INTERNAL_CASES", "Case", "Outcome", "run_case", "OUT"]
