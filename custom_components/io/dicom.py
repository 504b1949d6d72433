"""Reading DICOM folders: sorting by inversion time, rescaling (Philips scale slopes), signed data, geometry."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue

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
    ds: Any  # pydicom Dataset (headers only are used after reading)
    values: np.ndarray  # rescaled pixel values, float64, (Rows, Columns)
    ti_ms: float
    position_mm: float | None  # slice position along the slice normal
    ipp: np.ndarray | None
    philips: bool



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



def _image_component(ds) -> str | None:
    """'magnitude', 'real', 'phase', 'imaginary' from ImageType (value 3 on), or None."""
    it = ds.get("ImageType")
    if it is None:
        return None
    vals = [str(v).upper() for v in (it if isinstance(it, (list, tuple, MultiValue)) else [it])]
    for v in vals[2:]:
        if v in _COMPONENTS:
            return _COMPONENTS[v]
    return None



def _signature(ds, philips: bool) -> dict[str, Any]:
    """Header values that must be the same for every image of one series."""
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
        "image type (magnitude/real)": _image_component(ds),
        "Philips MR Scale Slope present": philips,
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



def _read_dicom_image(f: Path, has_preamble: bool) -> _DicomImage | None:
    """One DICOM image (None for a DICOMDIR), or InputError if unreadable, truncated or unsuitable."""
    if f.stat().st_size == 0:
        raise InputError(f"{f}: empty file (expected a DICOM image)")
    try:
        ds = pydicom.dcmread(str(f), force=not has_preamble)
    except Exception as e:  # pydicom raises InvalidDicomError, EOFError, struct/value errors...
        raise InputError(f"{f}: unreadable DICOM ({type(e).__name__}: {e})") from e
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    if sop == _MEDIA_STORAGE_DIRECTORY:
        return None
    if "PixelData" not in ds:
        raise InputError(f"{f}: DICOM file has no pixel data (truncated, or not an image)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(f"{f}: multi-frame (enhanced) DICOM is not supported; export classic "
                         "single-frame images (one file per image)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(f"{f}: colour DICOM image (SamplesPerPixel {ds.SamplesPerPixel}); expected MR greyscale")
    ti = _float_tag(ds, "InversionTime")
    if ti is None:
        raise InputError(f"{f}: no InversionTime (0018,0082); is this an inversion-recovery series?")
    if ti <= 0 or not math.isfinite(ti):
        raise InputError(f"{f}: InversionTime (0018,0082) is {ti} ms; must be > 0")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # truncated pixel data, missing decoder...
        raise InputError(f"{f}: cannot decode pixel data ({type(e).__name__}: {e})") from e
    if pixels.ndim != 2:
        raise InputError(f"{f}: expected one 2D image, got pixel array of shape {pixels.shape}")
    values, philips = dicom_pixel_values(ds, pixels, str(f))
    del ds.PixelData  # keep only the headers in memory
    iop = _float_list(ds, "ImageOrientationPatient", 6)
    ipp = _float_list(ds, "ImagePositionPatient", 3)
    if iop is not None and ipp is not None:
        position = float(ipp @ np.cross(iop[:3], iop[3:]))
    else:
        position = _float_tag(ds, "SliceLocation")
    return _DicomImage(f, ds, values, ti, position, ipp, philips)



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
        img = _read_dicom_image(f, has_preamble)
        if img is None:
            skipped.append(f.name)
        else:
            images.append(img)
    if not images:
        hint = f" (subfolders: {', '.join(subfolders[:5])}; give the one holding the images)" if subfolders else ""
        nifti = [n for n in skipped if _is_nifti_name(n)]
        if nifti:
            hint += f" (NIfTI files found: {', '.join(nifti[:3])}; give the file itself)"
        raise InputError(f"{folder}: no DICOM images found{hint}")

    # ---- one series: the same geometry and protocol everywhere
    ref = images[0]
    ref_sig = _signature(ref.ds, ref.philips)
    series_uids = {str(im.ds.get("SeriesInstanceUID", "")) for im in images}
    for im in images[1:]:
        sig = _signature(im.ds, im.philips)
        for key, val in ref_sig.items():
            if not _same_value(val, sig[key]):
                extra = " (different SeriesInstanceUID)" if im.ds.get("SeriesInstanceUID") != ref.ds.get(
                    "SeriesInstanceUID") else ""
                raise InputError(f"{folder}: mixed series: {key} is {_fmt(sig[key])} in {im.path.name} but "
                                 f"{_fmt(val)} in {ref.path.name}{extra}; keep one IR series per folder")
    component = ref_sig["image type (magnitude/real)"]
    if component in ("phase", "imaginary"):
        raise InputError(f"{folder}: ImageType says {component} images; T1 mapping needs magnitude or real images")

    # ---- slices: group by position along the slice normal, then sort each by TI
    slices = _group_slices(images, folder)
    ti_lists = [[im.ti_ms for im in s] for s in slices]
    for s, tl in zip(slices[1:], ti_lists[1:]):
        if not _same_floats(tl, ti_lists[0], atol=1e-3):
            raise InputError(f"{folder}: slice at {s[0].position_mm:g} mm has TIs {tl} ms but slice at "
                             f"{slices[0][0].position_mm:g} mm has {ti_lists[0]} ms")
    try:
        protocols = [from_dicom_headers([im.ds for im in s], echo_spacing_s=echo_spacing, echo_train_length=etl)
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
    if len(series_uids) > 1:
        notes.append(f"images come from {len(series_uids)} DICOM series (e.g. one per TI); "
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
    files = [str(im.path) for s in slices for im in s]
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
                raise InputError(f"{folder}: two images with TI {a.ti_ms:g} ms{where} ({a.path.name}, "
                                 f"{b.path.name}); mixed or repeated series?")
        if g[0].ipp is not None:
            for im in g[1:]:
                if im.ipp is None or not np.allclose(im.ipp, g[0].ipp, atol=1e-2):
                    raise InputError(f"{folder}: ImagePositionPatient of {im.path.name} {_fmt(im.ipp)} differs from "
                                     f"{g[0].path.name}'s {_fmt(g[0].ipp)} within one slice; mixed series?")
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
