"""Reading DICOM folders: sorting by inversion time, rescaling (Philips scale slopes), signed data, geometry.

A folder holds one inversion-recovery series as scanners write it:

- classic single-frame MR images (one file per TI and slice; any file names and InstanceNumbers:
  images are grouped by slice position and sorted by InversionTime (0018,0082)), or Enhanced MR
  multi-frame files (SOP class 1.2.840.10008.5.1.4.1.1.4.1), whose frames are split into single
  images that take the same path: TI from each frame's MRModifierSequence InversionTimes (0018,9079),
  position, orientation, pixel spacing, MR timing (TR, echo train), effective echo time and
  rescaling from the per-frame or shared functional groups;
- one DICOM series, or one series per TI (the Siemens NIST scans) whose images share geometry and
  protocol. Any other mix of series (an IR series and a localizer, two IR series) is refused with a
  list of the series found;
- a TR per image (Siemens grows TR with TI): the protocol gets one TR per TI, after sorting; a TR that
  differs between slices of one TI is refused.
"""

from __future__ import annotations

import copy
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import DSfloat

from ..physics.protocol import Protocol, ProtocolError, from_dicom_headers


from .series import IRSeries, InputError, _finish
from .nifti import _floats, _is_nifti_name, _per_image_tr, _same_floats


_DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}



_NON_DICOM_SUFFIXES = {".json", ".txt", ".md", ".rst", ".csv", ".tsv", ".nii", ".gz", ".png", ".jpg",
                       ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".pdf", ".xml", ".html", ".htm", ".log",
                       ".yaml", ".yml", ".ini", ".cfg", ".toml", ".zip", ".tar", ".py", ".sh", ".mat",
                       ".npy", ".npz", ".bval", ".bvec", ".bak", ".db"}



_NON_DICOM_NAMES = {"readme", "license", "licence", "notes", "changelog", "thumbs.db"}



_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"



_PHILIPS_CREATOR = "Philips MR Imaging DD 001"



_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage



#: where the protocol's timings come from in an Enhanced MR file (provenance for the sidecars)
_ENHANCED_FIELDS = {"TI": "DICOM MRModifierSequence InversionTimes (0018,9079)",
                    "TR": "DICOM MRTimingAndRelatedParametersSequence RepetitionTime (0018,0080)",
                    "TE": "DICOM MREchoSequence EffectiveEchoTime (0018,9082)",
                    "ETL": "DICOM MRTimingAndRelatedParametersSequence EchoTrainLength (0018,0091)"}



_MAX_SERIES_LISTED = 8



_COMPONENTS = {"M": "magnitude", "MAGNITUDE": "magnitude", "R": "real", "REAL": "real",
               "P": "phase", "PHASE": "phase", "I": "imaginary", "IMAGINARY": "imaginary"}



def _dicom_kind(p: Path) -> str:
    """'dicom' (read it; unreadable is an error) or 'skip' (clearly not DICOM)."""
    if p.name.startswith("."):
        return "skip"
    with open(p, "rb") as f:
        head = f.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    suffix = p.suffix.lower()
    if suffix in _DICOM_SUFFIXES:
        return "dicom"
    if suffix in _NON_DICOM_SUFFIXES or p.stem.lower() in _NON_DICOM_NAMES or p.name.upper() == "DICOMDIR":
        return "skip"
    if not head.strip(b"\x00"):
        return "dicom"  # empty, or a 128-byte preamble cut short: a damaged DICOM file
    if len(head) >= 8:
        group, element = struct.unpack("<HH", head[:4])
        if group in (0x0002, 0x0008) and element <= 0x00FF:
            return "dicom"  # DICOM without preamble (bare data set)
    return "skip"



@dataclass
class _DicomImage:
    path: Path
    ds: Any  # pydicom Dataset, headers only (a frame of a multi-frame file: see _enhanced_frames)
    values: np.ndarray  # rescaled pixel values, float64, (Rows, Columns)
    ti_ms: float | None  # None: no InversionTime (refused once the folder's series are known)
    position_mm: float | None  # slice position along the slice normal
    ipp: np.ndarray | None
    philips: bool
    component: str | None = None  # 'magnitude', 'real', 'phase', 'imaginary' or None (unknown)
    label: str = ""  # for messages: the file name, and "frame k" (1-based) for a multi-frame file
    enhanced: bool = False  # a frame of an Enhanced MR multi-frame file

    def __post_init__(self) -> None:
        self.label = self.label or self.path.name



def _float_tag(ds, keyword: str, default: float | None = None) -> float | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        return default



def _float_list(ds, keyword: str, n: int) -> np.ndarray | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        arr = np.asarray([float(x) for x in v], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n else None



def philips_scale_slope(ds) -> float | None:
    """Philips' private MR Scale Slope SS, tag (2005,100E) of block "Philips MR Imaging DD 001", or None."""
    try:
        el = ds.private_block(0x2005, _PHILIPS_CREATOR)[0x0E]
    except (KeyError, ValueError):
        return None
    v = el.value
    if isinstance(v, (bytes, bytearray)):  # VR UN (implicit VR without the private dictionary)
        if len(v) != 4:
            return None
        v = struct.unpack("<f", bytes(v))[0]
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None



def dicom_pixel_values(ds, pixels: np.ndarray, where: str = "") -> tuple[np.ndarray, bool]:
    """Rescaled float64 pixel values of one DICOM image, and whether the Philips convention was used.

    Standard DICOM: ``PV * RescaleSlope + RescaleIntercept``. Philips images that carry the private
    MR Scale Slope SS (2005,100E) get the floating-point value Philips recommends for quantitative
    comparison between images, ``FP = (PV * RS + RI) / (RS * SS)``: the Philips scanner scales each
    image for display separately (RescaleSlope differs per image: 1.00 to 1.85 on the real site4
    scans), and only FP puts all images on one scale. On the site4 NIST phantom scans, FP follows
    |A (1 - B exp(-TI/T1))| to 0.1 % (median relative RMS residual over the 14 plate-5 spheres),
    while the display values PV*RS+RI leave 16 % and the raw PV 8 %.
    """
    rs = _float_tag(ds, "RescaleSlope", 1.0)
    ri = _float_tag(ds, "RescaleIntercept", 0.0)
    if rs == 0:
        raise InputError(f"{where}: RescaleSlope is 0")
    values = pixels.astype(np.float64) * rs + ri
    ss = philips_scale_slope(ds)
    if ss is None:
        return values, False
    if not math.isfinite(ss) or ss <= 0:
        raise InputError(f"{where}: Philips MR Scale Slope (2005,100E) is {ss}; cannot compute floating-point values")
    return values / (rs * ss), True



def _image_component(ds, keyword: str = "ImageType") -> str | None:
    """'magnitude', 'real', 'phase', 'imaginary' from ImageType (or an enhanced frame's FrameType;
    value 3 on), or None."""
    it = ds.get(keyword)
    if it is None:
        return None
    vals = [str(v).upper() for v in (it if isinstance(it, (list, tuple, MultiValue)) else [it])]
    for v in vals[2:]:
        if v in _COMPONENTS:
            return _COMPONENTS[v]
    return None



def _signature(im: _DicomImage) -> dict[str, Any]:
    """Header values that must be the same for every image of one series."""
    ds = im.ds
    return {
        "matrix (Rows, Columns)": (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)),
        "PixelSpacing": _float_list(ds, "PixelSpacing", 2),
        "ImageOrientationPatient": _float_list(ds, "ImageOrientationPatient", 6),
        "SliceThickness": _float_tag(ds, "SliceThickness"),
        "EchoTime": _float_tag(ds, "EchoTime"),
        "EchoTrainLength": _float_tag(ds, "EchoTrainLength"),
        "MagneticFieldStrength": _float_tag(ds, "MagneticFieldStrength"),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "")),
        "FrameOfReferenceUID": str(ds.get("FrameOfReferenceUID", "")),
        "Modality": str(ds.get("Modality", "")),
        "image type (magnitude/real)": im.component,
        "Philips MR Scale Slope present": im.philips,
    }



def _same_value(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, np.ndarray) or isinstance(a, float):
        return bool(np.allclose(a, b, rtol=1e-4, atol=1e-4))
    return a == b



def _fmt(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return "[" + ", ".join(f"{x:g}" for x in v) + "]"
    return repr(v)



def _pixels(f: Path, ds) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as e:  # truncated pixel data, missing decoder...
        raise InputError(f"{f}: cannot decode pixel data ({type(e).__name__}: {e})") from e



def _read_dicom_file(f: Path, has_preamble: bool) -> list[_DicomImage]:
    """The images of one DICOM file: one for a classic image, one per frame for an Enhanced MR file
    (see :func:`_enhanced_frames`), none for a DICOMDIR; InputError if unreadable, truncated or
    unsuitable. A classic image without InversionTime comes back with ``ti_ms`` None: it is refused
    in :func:`_check_one_series`, which can then say whether it belongs to another series (a localizer)."""
    if f.stat().st_size == 0:
        raise InputError(f"{f}: empty file (expected a DICOM image)")
    try:
        ds = pydicom.dcmread(str(f), force=not has_preamble)
    except Exception as e:  # pydicom raises InvalidDicomError, EOFError, struct/value errors...
        raise InputError(f"{f}: unreadable DICOM ({type(e).__name__}: {e})") from e
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    if sop == _MEDIA_STORAGE_DIRECTORY:
        return []
    if "PixelData" not in ds:
        raise InputError(f"{f}: DICOM file has no pixel data (truncated, or not an image)")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 and sop != _ENHANCED_MR:
        name = UID(sop).name if sop else "unknown"
        raise InputError(f"{f}: multi-frame (enhanced) DICOM of SOP class {sop or '(none)'} ({name}) is not supported; "
                         f"only Enhanced MR Image Storage ({_ENHANCED_MR}) is read: export classic single-frame "
                         "images (one file per image)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(f"{f}: colour DICOM image (SamplesPerPixel {ds.SamplesPerPixel}); expected MR greyscale")
    if sop == _ENHANCED_MR:
        return _enhanced_frames(f, ds, n_frames)
    ti = _float_tag(ds, "InversionTime")
    if ti is not None and (ti <= 0 or not math.isfinite(ti)):
        raise InputError(f"{f}: InversionTime (0018,0082) is {ti} ms; must be > 0")
    pixels = _pixels(f, ds)
    if pixels.ndim != 2:
        raise InputError(f"{f}: expected one 2D image, got pixel array of shape {pixels.shape}")
    values, philips = dicom_pixel_values(ds, pixels, str(f))
    del ds.PixelData  # keep only the headers in memory
    position, ipp = _position(ds)
    return [_DicomImage(f, ds, values, ti, position, ipp, philips, _image_component(ds))]



def _position(ds) -> tuple[float | None, np.ndarray | None]:
    """Slice position in mm along the slice normal (or SliceLocation), and ImagePositionPatient."""
    iop = _float_list(ds, "ImageOrientationPatient", 6)
    ipp = _float_list(ds, "ImagePositionPatient", 3)
    if iop is not None and ipp is not None:
        return float(ipp @ np.cross(iop[:3], iop[3:])), ipp
    return _float_tag(ds, "SliceLocation"), ipp



def _functional_item(frame, shared, sequence: str):
    """The first item of functional group ``sequence`` for one frame: per-frame, else shared, else None."""
    for group in (frame, shared):
        seq = None if group is None else group.get(sequence)
        if seq:
            return seq[0]
    return None



def _item_value(item, keyword: str):
    v = None if item is None else item.get(keyword)
    return None if v is None or v == "" else v



def _as_ds(v):
    """A header value for a DS attribute (numbers from FD fields formatted to DICOM's 16 characters;
    the float value itself is kept)."""
    if isinstance(v, (list, tuple, MultiValue)):
        return [_as_ds(x) for x in v]
    return DSfloat(v, auto_format=True) if isinstance(v, (int, float)) and not isinstance(v, DSfloat) else v



def _philips_scale_slope_nested(item) -> float | None:
    """Philips' MR Scale Slope in a functional group item or in one of its private (2005,xxxx)
    sequences (where Philips' enhanced files keep it, frame by frame), or None."""
    if item is None:
        return None
    ss = philips_scale_slope(item)
    if ss is not None:
        return ss
    for elem in item:
        if elem.tag.group == 0x2005 and elem.VR == "SQ":
            for sub in elem.value:
                ss = philips_scale_slope(sub)
                if ss is not None:
                    return ss
    return None



#: classic attribute <- (functional group sequence, attribute in its item) of an Enhanced MR frame
_FRAME_ATTRIBUTES = (
    ("ImagePositionPatient", "PlanePositionSequence", "ImagePositionPatient"),
    ("ImageOrientationPatient", "PlaneOrientationSequence", "ImageOrientationPatient"),
    ("PixelSpacing", "PixelMeasuresSequence", "PixelSpacing"),
    ("SliceThickness", "PixelMeasuresSequence", "SliceThickness"),
    ("SpacingBetweenSlices", "PixelMeasuresSequence", "SpacingBetweenSlices"),
    ("RepetitionTime", "MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    ("EchoTrainLength", "MRTimingAndRelatedParametersSequence", "EchoTrainLength"),
    ("EchoTime", "MREchoSequence", "EffectiveEchoTime"),
    ("RescaleSlope", "PixelValueTransformationSequence", "RescaleSlope"),
    ("RescaleIntercept", "PixelValueTransformationSequence", "RescaleIntercept"),
)



def _enhanced_frames(f: Path, ds, n_frames: int) -> list[_DicomImage]:
    """The frames of an Enhanced MR file as single images with classic headers.

    Each frame gets a pydicom Dataset with the file's top-level (non-sequence) attributes and, from its
    functional groups (per-frame before shared), InversionTime (the frame's MRModifierSequence
    InversionTimes (0018,9079), ms), ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
    SliceThickness, RepetitionTime and EchoTrainLength (MRTimingAndRelatedParametersSequence), EchoTime
    (MREchoSequence EffectiveEchoTime, ms), RescaleSlope and RescaleIntercept (PixelValueTransformation-
    Sequence) and Philips' MR Scale Slope where a frame carries it; the magnitude/real/phase component
    comes from ComplexImageComponent. The frames then take the classic images' path: grouping by
    slice, sorting by TI, protocol, affine. A frame without inversion time, or frames whose orientation,
    pixel spacing, slice thickness or presence of a position differ, are refused.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if not per_frame or len(per_frame) != n_frames:
        raise InputError(f"{f}: Enhanced MR DICOM with {n_frames} frame(s) but {len(per_frame or [])} "
                         "PerFrameFunctionalGroupsSequence item(s); damaged file?")
    tis: list[list[float]] = []
    for fg in per_frame:
        v = _item_value(_functional_item(fg, shared, "MRModifierSequence"), "InversionTimes")
        try:
            tis.append([] if v is None else [float(x) for x in (v if isinstance(v, (list, tuple, MultiValue)) else [v])])
        except (TypeError, ValueError):
            tis.append([])
    if not any(tis):
        raise InputError(f"{f}: multi-frame (enhanced) DICOM without per-frame inversion times (MRModifierSequence "
                         "InversionTimes (0018,9079)) is not supported; is this an inversion-recovery series?")
    first = next(k for k, v in enumerate(tis) if v)
    for k, vals in enumerate(tis):
        if not vals:
            raise InputError(f"{f}: frame {k + 1} of {n_frames} has no inversion time (MRModifierSequence InversionTimes "
                             f"(0018,9079)) but frame {first + 1} has {tis[first][0]:g} ms; every frame needs one")
        if not np.allclose(vals, vals[0]):
            raise InputError(f"{f}: frame {k + 1} has {len(vals)} InversionTimes (0018,9079) "
                             f"{[float(f'{t:g}') for t in vals]} ms; expected one inversion per frame")
        if not math.isfinite(vals[0]) or vals[0] <= 0:
            raise InputError(f"{f}: frame {k + 1}: InversionTimes (0018,9079) is {vals[0]:g} ms; must be > 0")
    pixels = _pixels(f, ds)
    if n_frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] != n_frames:
        raise InputError(f"{f}: expected {n_frames} 2D frames, got pixel array of shape {pixels.shape}")
    try:
        header = [elem for elem in ds if elem.VR != "SQ" and elem.tag != 0x7FE00010]  # all but sequences and pixels
    except Exception as e:  # a value pydicom cannot convert
        raise InputError(f"{f}: unreadable DICOM header ({type(e).__name__}: {e})") from e
    top_component = _item_value(ds, "ComplexImageComponent")
    images = []
    for k, fg in enumerate(per_frame):
        label = f"{f.name} frame {k + 1}"
        fds = pydicom.Dataset()
        for elem in header:
            fds.add(copy.copy(elem))  # a copy per frame: setting a value below must not change the others
        fds.InversionTime = _as_ds(tis[k][0])
        for keyword, sequence, attribute in _FRAME_ATTRIBUTES:
            v = _item_value(_functional_item(fg, shared, sequence), attribute)
            if v is not None:
                setattr(fds, keyword, v if keyword == "EchoTrainLength" else _as_ds(v))
        ss = _philips_scale_slope_nested(fg)
        ss = _philips_scale_slope_nested(shared) if ss is None else ss
        if ss is not None:  # the frame's own value, before one the file's top level may carry
            fds.private_block(0x2005, _PHILIPS_CREATOR, create=True).add_new(0x0E, "FL", ss)
        frame_type = _functional_item(fg, shared, "MRImageFrameTypeSequence")
        code = _item_value(frame_type, "ComplexImageComponent") or top_component
        component = _COMPONENTS.get(str(code).upper()) if code is not None else None
        if component is None:
            component = _image_component(frame_type, "FrameType") if frame_type is not None else None
            component = component or _image_component(ds)
        values, philips = dicom_pixel_values(fds, pixels[k], label)
        position, ipp = _position(fds)
        images.append(_DicomImage(f, fds, values, tis[k][0], position, ipp, philips, component, label, True))
    ref = images[0]
    for im in images[1:]:
        for key in ("ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
            a, b = ((_float_list(x.ds, key, 6 if key[0] == "I" else 2) if key != "SliceThickness"
                     else _float_tag(x.ds, key)) for x in (ref, im))
            if not _same_value(a, b):
                raise InputError(f"{f}: frames with inconsistent geometry: {key} is {_fmt(b)} in frame "
                                 f"{im.label.rsplit(' ', 1)[1]} but {_fmt(a)} in frame 1; cannot build one volume")
        if (im.ipp is None) != (ref.ipp is None):
            raise InputError(f"{f}: frames with inconsistent geometry: ImagePositionPatient (PlanePositionSequence) "
                             f"is {_fmt(im.ipp)} in frame {im.label.rsplit(' ', 1)[1]} but {_fmt(ref.ipp)} in frame 1")
    return images



def _series_key(im: _DicomImage) -> str:
    return str(im.ds.get("SeriesInstanceUID", "") or "")



def _series_name(images: list[_DicomImage]) -> str:
    """How a user recognises a series: "#5 'IR_SE'" (SeriesNumber, SeriesDescription), else a file."""
    ds = images[0].ds
    number = ds.get("SeriesNumber")
    desc = str(ds.get("SeriesDescription", "") or "").strip()
    name = f"#{number}" if number not in (None, "") else f"the series of {images[0].label}"
    return f"{name} {desc!r}" if desc else name



def _describe_series(images: list[_DicomImage]) -> str:
    """"#5 'IR_SE' (12 images, TI 50, 100, 200 ms)"."""
    tis = sorted({round(im.ti_ms, 3) for im in images if im.ti_ms is not None})
    missing = sum(im.ti_ms is None for im in images)
    ti = f"TI {', '.join(f'{t:g}' for t in tis)} ms" if tis else ""
    if missing:
        ti += (", " if ti else "") + (f"{missing} without InversionTime" if tis else "no InversionTime")
    n = len(images)
    return f"{_series_name(images)} ({n} image{'' if n == 1 else 's'}, {ti})"



def _series_listing(by_series: dict[str, list[_DicomImage]]) -> str:
    def order(images):
        try:
            return 0, float(images[0].ds.get("SeriesNumber")), images[0].label
        except (TypeError, ValueError):
            return 1, 0.0, images[0].label

    groups = sorted(by_series.values(), key=order)
    text = "; ".join(_describe_series(g) for g in groups[:_MAX_SERIES_LISTED])
    if len(groups) > _MAX_SERIES_LISTED:
        text += f"; ... and {len(groups) - _MAX_SERIES_LISTED} more"
    return text



def _check_one_series(images: list[_DicomImage], folder: Path) -> int:
    """Refuse a folder that mixes series; return the number of DICOM series (SeriesInstanceUIDs) read.

    Every image must share geometry and protocol (:func:`_signature`; TR may change with TI) and have
    an InversionTime. Several SeriesInstanceUIDs are read as one IR series only when it was split as
    one series per TI (the Siemens NIST scans): each holds a single TI and no slice has the same TI
    twice. Otherwise (an IR series and a localizer, two IR series...) the one-line error lists the
    series found: SeriesNumber, SeriesDescription, number of images, TIs.
    """
    by_series: dict[str, list[_DicomImage]] = {}
    for im in images:
        by_series.setdefault(_series_key(im), []).append(im)
    ref = images[0]
    ref_sig = _signature(ref)
    reason = None
    for im in images[1:]:
        sig = _signature(im)
        key = next((k for k, v in ref_sig.items() if not _same_value(v, sig[k])), None)
        if key is not None:
            other = " (different SeriesInstanceUID)" if _series_key(im) != _series_key(ref) else ""
            reason = f"{key} is {_fmt(sig[key])} in {im.label} but {_fmt(ref_sig[key])} in {ref.label}{other}"
            break
    missing = [im for im in images if im.ti_ms is None]
    if len(by_series) == 1:
        if reason is not None:
            raise InputError(f"{folder}: mixed series: {reason}; keep one IR series per folder")
        if missing:
            raise InputError(f"{missing[0].path}: no InversionTime (0018,0082); is this an inversion-recovery series?")
        return 1
    if reason is None and missing:
        reason = f"{missing[0].label} has no InversionTime (0018,0082): not an inversion-recovery image"
    if reason is None:
        for group in by_series.values():
            tis = {round(im.ti_ms, 3) for im in group}
            if len(tis) > 1:
                reason = (f"{_series_name(group)} holds {len(tis)} inversion times, so the series are not one IR "
                          "series split as one series per TI")
                break
    if reason is None:
        by_ti: dict[float, list[_DicomImage]] = {}
        for im in images:
            by_ti.setdefault(round(im.ti_ms, 3), []).append(im)
        for ti, group in sorted(by_ti.items()):
            if any(im.position_mm is None for im in group):
                pairs = list(zip(group, group[1:]))
            else:
                group = sorted(group, key=lambda im: im.position_mm)
                pairs = [(a, b) for a, b in zip(group, group[1:]) if abs(b.position_mm - a.position_mm) <= 1e-2]
            pair = next(((a, b) for a, b in pairs if _series_key(a) != _series_key(b)), None)
            if pair is not None:
                a, b = pair
                where = "" if a.position_mm is None else f" at slice position {a.position_mm:g} mm"
                reason = f"two images with TI {ti:g} ms{where} come from different series ({a.label}, {b.label})"
                break
    if reason is not None:
        raise InputError(f"{folder}: mixed series: {len(by_series)} DICOM series in one folder: {reason}; series "
                         f"found: {_series_listing(by_series)}; put each series in its own folder (one IR series, "
                         "or its series of one TI each, per folder)")
    return len(by_series)



def _check_tr(slices: list[list[_DicomImage]], folder: Path) -> None:
    """RepetitionTime (0018,0080) for every image or none, and one TR per TI (TR may change with TI,
    not between the slices of one TI)."""
    trs = [[_float_tag(im.ds, "RepetitionTime") for im in s] for s in slices]
    flat = [(im, t) for s, ts in zip(slices, trs) for im, t in zip(s, ts)]
    given = [im for im, t in flat if t is not None]
    lacking = [im for im, t in flat if t is None]
    if given and lacking:
        raise InputError(f"{folder}: RepetitionTime (0018,0080) is missing in {lacking[0].label} but given in "
                         f"{given[0].label}; every image needs its TR (the recovery between inversions)")
    if not given:
        return
    for n in range(len(slices[0])):
        ref = trs[0][n]
        for s, ts in zip(slices[1:], trs[1:]):
            if not math.isclose(ts[n], ref, rel_tol=1e-3, abs_tol=1e-3):
                raise InputError(f"{folder}: RepetitionTime differs between slices at TI {s[n].ti_ms:g} ms: {ref:g} ms "
                                 f"in {slices[0][n].label} (slice at {slices[0][n].position_mm:g} mm) but {ts[n]:g} ms in "
                                 f"{s[n].label} (slice at {s[n].position_mm:g} mm); one TR per inversion time is "
                                 "needed (mixed series?)")



def _load_dicom_folder(folder: Path, tis, tr, echo_spacing=None, etl=None) -> IRSeries:
    entries = sorted(folder.iterdir())
    images: list[_DicomImage] = []
    skipped: list[str] = []
    subfolders = [e.name for e in entries if e.is_dir()]
    for f in entries:
        if not f.is_file():
            continue
        kind = _dicom_kind(f)
        if kind == "skip":
            skipped.append(f.name)
            continue
        with open(f, "rb") as fh:
            fh.seek(128)
            has_preamble = fh.read(4) == b"DICM"
        read = _read_dicom_file(f, has_preamble)
        if not read:
            skipped.append(f.name)
        images.extend(read)
    if not images:
        hint = f" (subfolders: {', '.join(subfolders[:5])}; give the one holding the images)" if subfolders else ""
        nifti = [n for n in skipped if _is_nifti_name(n)]
        if nifti:
            hint += f" (NIfTI files found: {', '.join(nifti[:3])}; give the file itself)"
        raise InputError(f"{folder}: no DICOM images found{hint}")

    # ---- one series (or one series per TI): the same geometry and protocol everywhere
    ref = images[0]
    n_series = _check_one_series(images, folder)
    component = ref.component
    if component in ("phase", "imaginary"):
        raise InputError(f"{folder}: ImageType says {component} images; T1 mapping needs magnitude or real images")

    # ---- slices: group by position along the slice normal, then sort each by TI
    slices = _group_slices(images, folder)
    ti_lists = [[im.ti_ms for im in s] for s in slices]
    for s, tl in zip(slices[1:], ti_lists[1:]):
        if not _same_floats(tl, ti_lists[0], atol=1e-3):
            raise InputError(f"{folder}: slice at {s[0].position_mm:g} mm has TIs {tl} ms but slice at "
                             f"{slices[0][0].position_mm:g} mm has {ti_lists[0]} ms")
    _check_tr(slices, folder)
    try:
        protocols = [from_dicom_headers([im.ds for im in s], echo_spacing_s=echo_spacing, echo_train_length=etl,
                                        header_fields=_ENHANCED_FIELDS if all(im.enhanced for im in s) else None)
                     for s in slices]
    except ProtocolError as e:
        raise InputError(f"{folder}: {e}") from e
    protocol = protocols[0]
    for s, pr in zip(slices[1:], protocols[1:]):
        if pr != protocol:
            raise InputError(f"{folder}: slice at {s[0].position_mm:g} mm has a different protocol "
                             f"({pr.to_dict()}) from the first slice ({protocol.to_dict()})")
    _cross_check(protocol, tis, tr, folder)

    n_slices, n_ti = len(slices), len(slices[0])
    data = np.empty(ref.values.shape + (n_slices, n_ti), dtype=np.float64)
    for k, s in enumerate(slices):
        for n, im in enumerate(s):
            data[:, :, k, n] = im.values
    notes = [f"DICOM: {len(images)} images ({ref.ds.get('Manufacturer', 'unknown manufacturer')}), "
             f"{n_slices} slice(s) x {n_ti} inversion times"]
    enhanced = [im for im in images if im.enhanced]
    if enhanced:
        notes.append(f"enhanced multi-frame DICOM: {len(enhanced)} frames of {len({im.path for im in enhanced})} "
                     "file(s) read as single images (TI from each frame's MRModifierSequence InversionTimes "
                     "(0018,9079); geometry, timing and rescaling from the functional groups)")
    if n_series > 1:
        notes.append(f"images come from {n_series} DICOM series (one per TI); "
                     "checked that they share geometry and protocol")
    if skipped:
        notes.append(f"skipped {len(skipped)} non-DICOM or directory file(s): {', '.join(skipped[:5])}"
                     + (" ..." if len(skipped) > 5 else ""))
    if ref.philips:
        notes.append("Philips: floating-point values FP = (PV*RS + RI)/(RS*SS) with the private MR Scale "
                     "Slope SS (2005,100E), so that images with different RescaleSlope share one scale")
    negatives = "magnitude"
    if data.min() < 0:
        lo, hi = float(data.min()), float(data.max())
        if component == "magnitude":
            raise InputError(f"{folder}: ImageType says magnitude but rescaled values go down to {lo:g} "
                             f"(RescaleIntercept {ref.ds.get('RescaleIntercept', 0)}); inconsistent DICOM")
        if component == "real":
            notes.append(f"signed real data (ImageType R; values {lo:g} to {hi:g}): magnitude taken")
        else:
            notes.append(f"negative values after rescaling ({lo:g} to {hi:g}) although ImageType "
                         f"{list(ref.ds.get('ImageType', []))} does not say real: treated as signed "
                         "real data, magnitude taken")
        negatives = "magnitude_quiet"
    affine = _dicom_affine(slices, folder, notes)
    files = list(dict.fromkeys(str(im.path) for s in slices for im in s))  # a multi-frame file once
    return _finish(data, affine, protocol, str(folder), notes, files, negatives=negatives)



def _group_slices(images: list[_DicomImage], folder: Path) -> list[list[_DicomImage]]:
    """Images grouped by slice position (increasing along the normal), each group sorted by TI."""
    positions = [im.position_mm for im in images]
    if any(p is None for p in positions):
        groups = [list(images)]
    else:
        order = np.argsort(np.asarray(positions, dtype=float), kind="stable")
        groups = []
        start = None
        for i in order:
            pos = float(positions[i])  # type: ignore[arg-type]
            if start is None or abs(pos - start) > 1e-2:  # a new slice (positions in mm)
                groups.append([])
                start = pos
            groups[-1].append(images[i])
    for g in groups:
        g.sort(key=lambda im: im.ti_ms)
        for a, b in zip(g, g[1:]):
            if abs(a.ti_ms - b.ti_ms) < 1e-3:
                where = "" if a.position_mm is None else f" at slice position {a.position_mm:g} mm"
                raise InputError(f"{folder}: two images with TI {a.ti_ms:g} ms{where} ({a.label}, "
                                 f"{b.label}); mixed or repeated series?")
        if g[0].ipp is not None:
            for im in g[1:]:
                if im.ipp is None or not np.allclose(im.ipp, g[0].ipp, atol=1e-2):
                    raise InputError(f"{folder}: ImagePositionPatient of {im.label} {_fmt(im.ipp)} differs from "
                                     f"{g[0].label}'s {_fmt(g[0].ipp)} within one slice; mixed series?")
    return groups



def _dicom_affine(slices: list[list[_DicomImage]], folder: Path, notes: list[str]) -> np.ndarray:
    """NIfTI (RAS+) affine of data[row, column, slice] from the DICOM (LPS+) geometry.

    Voxel (i, j, k) sits at LPS position IPP_0 + i * dr * c + j * dc * r + k * s, with r, c the
    row and column direction cosines of ImageOrientationPatient, (dr, dc) = PixelSpacing (between
    rows, between columns), s the slice step; RAS = diag(-1, -1, 1) LPS.
    """
    ds = slices[0][0].ds
    iop = _float_list(ds, "ImageOrientationPatient", 6)
    spacing = _float_list(ds, "PixelSpacing", 2)
    thickness = _float_tag(ds, "SliceThickness") or _float_tag(ds, "SpacingBetweenSlices") or 1.0
    if iop is None or spacing is None or any(s[0].ipp is None for s in slices):
        sp = spacing if spacing is not None else np.ones(2)
        notes.append("no DICOM geometry (ImageOrientationPatient/ImagePositionPatient/PixelSpacing): "
                     "the affine only scales by the voxel size")
        return np.diag([sp[0], sp[1], thickness, 1.0])
    ipps = np.stack([s[0].ipp for s in slices])  # (slices, 3), LPS mm, sorted along the normal
    row_dir, col_dir = iop[:3], iop[3:]
    if len(slices) > 1:
        step = (ipps[-1] - ipps[0]) / (len(slices) - 1)
        expected = ipps[0] + np.arange(len(slices))[:, None] * step
        tol_mm = 1e-2 + 1e-2 * float(np.linalg.norm(step))
        off = np.nonzero(~np.all(np.isclose(ipps, expected, rtol=0, atol=tol_mm), axis=1))[0]
        if off.size:
            raise InputError(f"{folder}: slices are not evenly spaced (slice {off[0]} at {_fmt(ipps[off[0]])} mm); "
                             "cannot build one affine")
    else:
        step = np.cross(row_dir, col_dir) * thickness
    lps = np.eye(4)
    lps[:3, 0] = col_dir * spacing[0]
    lps[:3, 1] = row_dir * spacing[1]
    lps[:3, 2] = step
    lps[:3, 3] = ipps[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps



def _cross_check(protocol: Protocol, tis, tr, where: Path) -> None:
    """Explicit TIs/TR given for a self-describing input must agree with what the files say."""
    if tis is not None:
        given = sorted(_floats(tis, "inversion times", str(where)))
        if not _same_floats(given, list(protocol.inversion_times_s)):
            raise InputError(f"{where}: given inversion times {given} s disagree with the files' "
                             f"{list(protocol.inversion_times_s)} s")
    if tr is not None:
        given_tr = _per_image_tr(tr, protocol.n_images, str(where), "repetition time") or []
        file_tr = protocol.repetition_time_s
        per_image = [] if file_tr is None else list(np.broadcast_to(np.asarray(file_tr, float), (protocol.n_images,)))
        if not per_image or not _same_floats(given_tr, per_image):
            raise InputError(f"{where}: given repetition time {tr} s disagrees with the files' {file_tr} s")
