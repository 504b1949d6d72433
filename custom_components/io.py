"""Reading inversion-recovery series (NIfTI, BIDS IRT1, DICOM) and writing maps.

Everything a user points the toolkit at goes through :func:`load_series`, which returns an
:class:`IRSeries`: magnitude images as float64 of shape (X, Y, Z, N) with the inversions on the last
axis sorted by increasing inversion time, a 4x4 NIfTI (RAS+, mm) affine and a
:class:`~custom_components.protocol.Protocol` (times in s). Accepted inputs:

a) a 4D NIfTI file (``.nii``/``.nii.gz``), inversions on the last axis (a 2D series is
   (X, Y, 1, N)). Inversion times in s come from ``tis=`` or from the BIDS sidecar beside it
   (same name, ``.json``; ``"InversionTime"``: list in s, ``"RepetitionTime"``: scalar or list in s).
b) a folder holding the DICOM files of one IR series (one file per TI and slice, any file names).
   Pixel values are rescaled (RescaleSlope/RescaleIntercept, and Philips' private MR Scale Slope,
   see :func:`dicom_pixel_values`), signed real images are turned into magnitude, images are grouped
   by slice position and sorted by InversionTime (0018,0082, ms in DICOM, s here) and the affine is
   built from the DICOM geometry, so maps written later sit in scanner space.
c) a BIDS IRT1 collection: a folder with ``sub-<label>[_<entity>-<x>]_inv-<n>_IRT1.nii[.gz]``
   files and their sidecars (``"InversionTime"`` in s each), one of those files, or the common name
   prefix (e.g. ``/data/sub-01``). Images are stacked in order of increasing InversionTime.

Voxel axes of DICOM input: ``data[i, j, k, n]`` is the pixel in DICOM row ``i``, column ``j`` (the
image as the scanner displays it, as in nibabel's DICOM reader), slice ``k`` (slices sorted along
the slice normal), inversion ``n``.

Every problem with the input raises :class:`InputError` with a one-line message that names the
file and what is wrong. Writers (:func:`save_maps`, :func:`save_series`, :func:`save_bids_irt1`)
write to temporary names first and rename into place, so a failure never leaves half-written output.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
import pydicom
from pydicom.multival import MultiValue

from .protocol import Protocol, ProtocolError, from_bids_sidecars, from_dicom_headers


class InputError(ValueError):
    """A problem with the user's input (files, folders, arguments); the message is a single line."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


# ====================================================================================== data class
@dataclass
class IRSeries:
    """An inversion-recovery series ready for fitting.

    Attributes:
        data: magnitude images, float64, shape (X, Y, Z, N); the last axis is the inversion, in the
            order of ``protocol.inversion_times_s`` (increasing TI). Rescaled to the scanner's
            floating-point values (arbitrary units).
        affine: 4x4 voxel-to-world matrix, NIfTI convention (RAS+, mm).
        protocol: the acquisition (inversion times and TR in s).
        source: the path the series was read from.
        notes: what the reader did that a user should know (e.g. "signed real data: magnitude taken").
        files: every file that was read (pass them as ``protect`` to :func:`save_maps`).
    """

    data: np.ndarray
    affine: np.ndarray
    protocol: Protocol
    source: str
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=np.float64)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.data.ndim != 4 or self.data.shape[-1] != self.protocol.n_images:
            raise InputError(f"{self.source}: series data must be (X, Y, Z, {self.protocol.n_images}), "
                             f"got shape {self.data.shape}")
        if self.affine.shape != (4, 4):
            raise InputError(f"{self.source}: affine must be 4x4, got shape {self.affine.shape}")

    @property
    def tis_s(self) -> np.ndarray:
        """Inversion times in s, shape (N,), increasing."""
        return self.protocol.tis

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) of the image grid."""
        x, y, z = (int(s) for s in self.data.shape[:3])
        return x, y, z

    @property
    def voxel_size_mm(self) -> np.ndarray:
        """Voxel edge lengths in mm, shape (3,), from the affine."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


# ====================================================================================== entry point
def load_series(path: str | os.PathLike, tis: Sequence[float] | None = None,
                tr: float | Sequence[float] | None = None, *, signed: bool = False) -> IRSeries:
    """Read an inversion-recovery series from a 4D NIfTI, a DICOM folder or a BIDS IRT1 collection.

    Args:
        path: a ``.nii``/``.nii.gz`` file, a folder (DICOM files or BIDS IRT1 files), one file of a
            BIDS IRT1 collection or the collection's common name prefix.
        tis: inversion times in s. For a NIfTI file: one per image in the file's order (they
            replace the sidecar's). For DICOM and BIDS collections the files say the TIs; given
            values must then agree with them (a cross-check).
        tr: repetition time in s, one value or one per image (same rules as ``tis``).
        signed: the NIfTI/BIDS images are signed real data (negative values allowed: their
            magnitude is taken). DICOM images say this themselves (ImageType, negative values).

    Returns:
        An :class:`IRSeries` with images sorted by increasing TI.

    Raises:
        InputError: unreadable or inconsistent input (message names the file and the problem).
    """
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            group = _irt1_group_in_folder(p)
            if group is not None:
                return _load_bids_irt1(group, p, tis, tr, signed)
            return _load_dicom_folder(p, tis, tr)
        if p.is_file():
            if _IRT1_RE.match(p.name):
                return _load_bids_irt1(_irt1_group_of_file(p), p, tis, tr, signed)
            if _is_nifti_name(p.name):
                return _load_nifti_4d(p, tis, tr, signed)
            if p.suffix.lower() == ".json":
                raise InputError(f"{p}: is a JSON sidecar; give the NIfTI file it describes")
            if _dicom_kind(p) == "dicom":
                raise InputError(f"{p}: is a single DICOM file; give the folder that holds the whole "
                                 "series (one file per inversion time)")
            raise InputError(f"{p}: unsupported input: expected a .nii/.nii.gz file, a DICOM folder "
                             "or a BIDS IRT1 collection")
        if p.exists():
            raise InputError(f"{p}: is neither a file nor a folder")
        group = _irt1_group_by_prefix(p)
        if group is not None:
            return _load_bids_irt1(group, p, tis, tr, signed)
        raise InputError(f"{p}: no such file or folder (nor BIDS IRT1 files starting with {p.name!r})")
    except PermissionError as e:
        raise InputError(f"{p}: permission denied ({e.filename or p})") from e
    except (OSError, MemoryError) as e:
        raise InputError(f"{p}: cannot read ({type(e).__name__}: {e})") from e


def load_nifti_map(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI map or mask: (float64 array as stored, with the header scaling applied; 4x4 affine).

    The caller checks that the shape matches the series it is used with.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    if not _is_nifti_name(p.name):
        raise InputError(f"{p}: expected a .nii or .nii.gz file")
    img = _nib_load(p)
    return _nib_data(img, p), np.asarray(img.affine, dtype=np.float64)


# ====================================================================================== NIfTI (a)
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _is_nifti_name(name: str) -> bool:
    return name.lower().endswith(_NIFTI_SUFFIXES)


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suf in _NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def sidecar_path(nifti_path: str | os.PathLike) -> Path:
    """The BIDS sidecar of a NIfTI file: same folder and name, ``.json`` instead of ``.nii[.gz]``."""
    p = Path(nifti_path)
    return p.with_name(_nifti_stem(p) + ".json")


def _nib_load(p: Path):
    try:
        return nib.load(str(p))
    except Exception as e:  # nibabel raises ImageFileError, ValueError, EOFError, zlib errors...
        raise InputError(f"{p}: cannot read NIfTI ({type(e).__name__}: {e})") from e


def max_input_bytes() -> int:
    """Memory an input image may take once read (float64): ``QMRI_MAX_INPUT_GB`` (default 8 GB)."""
    try:
        gb = float(os.environ.get("QMRI_MAX_INPUT_GB", "8"))
    except ValueError:
        gb = float("nan")
    if not (np.isfinite(gb) and gb > 0):
        raise InputError(f"QMRI_MAX_INPUT_GB must be a positive number of GB, got {os.environ['QMRI_MAX_INPUT_GB']!r}")
    return int(gb * 1e9)


def _nib_data(img, p: Path) -> np.ndarray:
    need = 8 * int(np.prod(img.shape, dtype=np.int64))
    limit = max_input_bytes()
    if need > limit:  # checked from the header, before any voxel is read
        raise InputError(f"{p}: image of shape {tuple(img.shape)} needs {need / 1e9:.1f} GB in memory, above the "
                         f"limit of {limit / 1e9:.1f} GB (map it in parts, or raise QMRI_MAX_INPUT_GB)")
    try:
        return np.asarray(img.get_fdata(dtype=np.float64))
    except Exception as e:  # truncated or corrupt image data
        raise InputError(f"{p}: cannot read NIfTI image data ({type(e).__name__}: {e})") from e


def _read_json(p: Path) -> dict:
    try:
        with open(p) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: invalid JSON ({e})") from e
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from e
    if not isinstance(d, dict):
        raise InputError(f"{p}: a sidecar must hold a JSON object, got {type(d).__name__}")
    return d


def _floats(values: Any, what: str, where: str) -> list[float]:
    """A list of floats from a scalar or a sequence, or InputError."""
    try:
        arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: {what} must be numbers in s, got {values!r}") from e
    if arr.ndim != 1:
        raise InputError(f"{where}: {what} must be a flat list of numbers in s, got {values!r}")
    return [float(v) for v in arr]


def _per_image_tr(tr: Any, n: int, where: str, what: str) -> list[float] | None:
    """TR in s for each of n images from a scalar, a list of n values or None."""
    if tr is None:
        return None
    vals = _floats(tr, what, where)
    if len(vals) == 1:
        return vals * n
    if len(vals) != n:
        raise InputError(f"{where}: {what} has {len(vals)} values for {n} images")
    return vals


def _sidecar_marks_real(sidecar: Mapping) -> bool:
    """Whether a (dcm2niix-style) sidecar says the images are signed real data."""
    it = sidecar.get("ImageType")
    if isinstance(it, str):
        it = it.replace("\\", " ").split()
    return isinstance(it, (list, tuple)) and any(str(v).upper() in ("R", "REAL") for v in it)


def _load_nifti_4d(p: Path, tis, tr, signed: bool) -> IRSeries:
    img = _nib_load(p)
    if len(img.shape) != 4:
        raise InputError(f"{p}: image is {len(img.shape)}D with shape {tuple(img.shape)}; expected 4D "
                         "(X, Y, Z, N) with the inversions on the last axis (a 2D series is (X, Y, 1, N))")
    n = int(img.shape[3])
    notes: list[str] = []
    files = [str(p)]
    sc_path = sidecar_path(p)
    sidecar: dict = {}
    if sc_path.is_file():
        sidecar = _read_json(sc_path)
        files.append(str(sc_path))
    sc_tis = sidecar.get("InversionTime")

    if tis is not None:
        ti_list = _floats(tis, "inversion times", str(p))
        if sc_tis is not None and not _same_floats(_floats(sc_tis, "InversionTime", str(sc_path)), ti_list):
            notes.append(f"inversion times {ti_list} s given explicitly replace the sidecar's {sc_tis}")
    elif sc_tis is not None:
        ti_list = _floats(sc_tis, "InversionTime", str(sc_path))
    else:
        raise InputError(f"{p}: no inversion times: give them in s (--tis) or write a sidecar "
                         f"{sc_path.name} with \"InversionTime\": [...] in s")
    if len(ti_list) != n:
        raise InputError(f"{p}: {len(ti_list)} inversion times for {n} images on the last axis")

    if tr is not None:
        tr_list = _per_image_tr(tr, n, str(p), "repetition time")
    else:
        sc_tr = sidecar.get("RepetitionTimeExcitation", sidecar.get("RepetitionTime"))
        tr_list = _per_image_tr(sc_tr, n, str(sc_path), "RepetitionTime")

    order = _sorting_order(ti_list, str(p))
    data = _nib_data(img, p)
    if not np.array_equal(order, np.arange(n)):
        data = data[..., order]
        notes.append(f"images reordered by increasing inversion time (file order: {ti_list} s)")
    base = {k: v for k, v in sidecar.items()
            if k not in ("InversionTime", "RepetitionTime", "RepetitionTimeExcitation")}
    per_image = []
    for i in order:
        d = dict(base, InversionTime=ti_list[i])
        if tr_list is not None:
            d["RepetitionTime"] = tr_list[i]
        per_image.append(d)
    protocol = _bids_protocol(per_image, sidecar, str(sc_path if sidecar else p), notes)
    flagged = signed or _sidecar_marks_real(sidecar)
    return _finish(data, np.asarray(img.affine, float), protocol, str(p), notes, files,
                   negatives="magnitude" if flagged else "error")


def _sorting_order(tis: Sequence[float], where: str) -> np.ndarray:
    """Stable argsort of TIs; duplicated TIs are an InputError."""
    arr = np.asarray(tis, dtype=float)
    order = np.argsort(arr, kind="stable")
    s = arr[order]
    dup = np.nonzero(np.isclose(np.diff(s), 0.0, atol=1e-9))[0]
    if dup.size:
        raise InputError(f"{where}: duplicated inversion time(s) {sorted({float(s[i]) for i in dup})} s; "
                         "each image needs its own TI")
    return order


def _same_floats(a: Sequence[float], b: Sequence[float], atol: float = 1e-6) -> bool:
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=0, atol=atol))


def _bids_protocol(per_image: list[dict], sidecar: Mapping, where: str, notes: list[str]) -> Protocol:
    """Protocol from per-image BIDS sidecars (sorted by TI), plus this package's own protocol keys."""
    try:
        protocol = from_bids_sidecars(per_image)
        q = sidecar.get("qMRIProtocol")
        if isinstance(q, dict):
            extra = {k: q[k] for k in ("echo_spacing_s", "ordering", "name") if k in q}
            if extra:
                protocol = protocol.with_(**extra)
    except ProtocolError as e:
        raise InputError(f"{where}: {e}") from e
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: invalid protocol value in sidecar ({e})") from e
    if all(d.get("MagneticFieldStrength") is None for d in per_image):
        notes.append(f"no MagneticFieldStrength given: {protocol.field_strength_t:g} T assumed")
    return protocol


# ====================================================================================== BIDS IRT1 (c)
_IRT1_RE = re.compile(r"^(?P<prefix>.+?)_inv-(?P<inv>[0-9]+)(?P<rest>(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)"
                      r"_IRT1\.(?P<ext>nii\.gz|nii|json)$")


def _irt1_groups(folder: Path, name_prefix: str = "") -> dict[tuple[str, str], list[Path]]:
    """IRT1 NIfTI files of a folder grouped by (prefix before ``_inv-``, entities after it).

    ``name_prefix`` keeps only names that start with it at an entity boundary ("sub-01" keeps
    "sub-01_inv-1_IRT1.nii.gz", not "sub-010_inv-1_IRT1.nii.gz").
    """
    groups: dict[tuple[str, str], list[Path]] = {}
    for f in sorted(folder.iterdir()):
        m = _IRT1_RE.match(f.name)
        boundary = (not name_prefix or name_prefix.endswith("_")
                    or f.name[len(name_prefix):len(name_prefix) + 1] == "_")
        if m and m["ext"] != "json" and f.name.startswith(name_prefix) and boundary and f.is_file():
            groups.setdefault((m["prefix"], m["rest"]), []).append(f)
    return groups


def _pick_group(groups: dict[tuple[str, str], list[Path]], where: Path) -> list[Path] | None:
    if not groups:
        return None
    if len(groups) > 1:
        names = ", ".join(f"{p}_inv-*{r}_IRT1" for p, r in groups)
        raise InputError(f"{where}: several BIDS IRT1 collections ({names}); give the name prefix of one")
    return next(iter(groups.values()))


def _irt1_group_in_folder(folder: Path) -> list[Path] | None:
    return _pick_group(_irt1_groups(folder), folder)


def _irt1_group_of_file(p: Path) -> list[Path]:
    m = _IRT1_RE.match(p.name)
    assert m is not None
    groups = _irt1_groups(p.parent)
    return groups.get((m["prefix"], m["rest"])) or [p]


def _irt1_group_by_prefix(p: Path) -> list[Path] | None:
    if not p.parent.is_dir() or not p.name:
        return None
    return _pick_group(_irt1_groups(p.parent, p.name), p)


def _load_bids_irt1(paths: list[Path], source: Path, tis, tr, signed: bool) -> IRSeries:
    notes: list[str] = [f"BIDS IRT1 collection of {len(paths)} files"]
    files: list[str] = []
    images, affines, sidecars, inv_index = [], [], [], []
    for f in paths:
        match = _IRT1_RE.match(f.name)
        assert match is not None  # paths come from _irt1_groups
        inv = int(match["inv"])
        if inv in inv_index:
            raise InputError(f"{f}: inversion index inv-{inv} appears twice in the collection")
        sc_path = sidecar_path(f)
        if not sc_path.is_file():
            raise InputError(f"{f}: missing sidecar {sc_path.name} (it must give \"InversionTime\" in s)")
        sc = _read_json(sc_path)
        ti = sc.get("InversionTime")
        if ti is None:
            raise InputError(f"{sc_path}: no \"InversionTime\" (s)")
        ti_vals = _floats(ti, "InversionTime", str(sc_path))
        if len(ti_vals) != 1:
            raise InputError(f"{sc_path}: \"InversionTime\" must be one number (s) for an IRT1 file, got {ti!r}")
        img = _nib_load(f)
        data = _nib_data(img, f)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim == 2:
            data = data[:, :, None]
        if data.ndim != 3:
            raise InputError(f"{f}: an IRT1 file must hold one 3D image, got shape {data.shape}")
        if images and data.shape != images[0].shape:
            raise InputError(f"{f}: image shape {data.shape} differs from {paths[0].name}'s {images[0].shape}")
        if affines and not np.allclose(img.affine, affines[0], atol=1e-4):
            raise InputError(f"{f}: affine differs from {paths[0].name}'s (images are not on one grid)")
        images.append(data)
        affines.append(np.asarray(img.affine, float))
        sidecars.append(dict(sc, InversionTime=ti_vals[0]))
        inv_index.append(inv)
        files += [str(f), str(sc_path)]
    n = len(images)
    file_tis = [sc["InversionTime"] for sc in sidecars]
    order = _sorting_order(file_tis, str(source))
    sorted_sc = [sidecars[i] for i in order]
    if tis is not None and not _same_floats(sorted(_floats(tis, "inversion times", str(source))),
                                            [sc["InversionTime"] for sc in sorted_sc]):
        raise InputError(f"{source}: given inversion times {list(tis)} s disagree with the sidecars' "
                         f"{[sc['InversionTime'] for sc in sorted_sc]} s")
    for sc in sorted_sc:  # one TR per image
        t = sc.pop("RepetitionTimeExcitation", None)
        if t is not None:
            sc["RepetitionTime"] = t
    if tr is not None:
        tr_list = _per_image_tr(tr, n, str(source), "repetition time") or []
        file_tr = [sc.get("RepetitionTime") for sc in sorted_sc]
        if None in file_tr:  # the sidecars do not say: the given TR is used
            for sc, t in zip(sorted_sc, tr_list):
                sc["RepetitionTime"] = t
        elif not _same_floats(_floats(file_tr, "RepetitionTime", str(source)), tr_list):
            raise InputError(f"{source}: given repetition time {tr} s disagrees with the sidecars' {file_tr} s")
    if [inv_index[i] for i in order] != sorted(inv_index):
        notes.append("inv-<n> indices are not in TI order; images ordered by InversionTime")
    data = np.stack([images[i] for i in order], axis=-1)
    protocol = _bids_protocol(sorted_sc, sorted_sc[0], str(source), notes)
    flagged = signed or any(_sidecar_marks_real(sc) for sc in sidecars)
    return _finish(data, affines[0], protocol, str(source), notes, files,
                   negatives="magnitude" if flagged else "error")


# ====================================================================================== DICOM (b)
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


def _load_dicom_folder(folder: Path, tis, tr) -> IRSeries:
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
        protocols = [from_dicom_headers([im.ds for im in s]) for s in slices]
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


# ====================================================================================== checks
def _finish(data: np.ndarray, affine: np.ndarray, protocol: Protocol, source: str, notes: list[str],
            files: list[str], negatives: str) -> IRSeries:
    """Value checks common to all readers, then the IRSeries.

    negatives: "error" (magnitude data must not be negative), "magnitude" (signed data: take |x| and
    note it), "magnitude_quiet" (take |x|, the reader already noted why).
    """
    tis = protocol.tis
    if data.shape[-1] != len(tis):
        raise InputError(f"{source}: {data.shape[-1]} images for {len(tis)} inversion times")
    if min(data.shape) == 0:
        raise InputError(f"{source}: empty image (shape {data.shape})")
    finite = np.isfinite(data)
    if not finite.all():
        bad = [f"{t:g}" for t, ok in zip(tis, finite.reshape(-1, len(tis)).all(axis=0)) if not ok]
        raise InputError(f"{source}: {int((~finite).sum())} NaN/Inf value(s) in the image(s) at TI = "
                         f"{', '.join(bad)} s")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{source}: the affine is not a valid voxel-to-world matrix")
    if data.min() < 0:
        if negatives == "error":
            raise InputError(f"{source}: {int((data < 0).sum())} negative value(s) (min {data.min():g}) in "
                             "magnitude images; if they are signed real images pass signed=True or mark "
                             "the sidecar \"ImageType\" as real (\"R\")")
        if negatives == "magnitude":
            notes.append(f"signed real data (values {data.min():g} to {data.max():g}): magnitude taken")
        data = np.abs(data)
    for n, t in enumerate(tis):
        img = data[..., n]
        lo, hi = float(img.min()), float(img.max())
        if lo == hi:
            what = "all zero" if hi == 0 else f"constant ({hi:g})"
            raise InputError(f"{source}: the image at TI = {t:g} s is {what}")
    return IRSeries(data=data, affine=affine, protocol=protocol, source=source, notes=notes, files=files)


# ====================================================================================== writing
def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, tuples to lists, non-finite floats to None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


def _json_text(d: Mapping, what: str) -> str:
    try:
        return json.dumps(_jsonable(d), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: sidecar is not JSON-serialisable ({e})") from e


def _nifti_image(data: np.ndarray, affine: np.ndarray):
    """Float32 NIfTI-1 image with sform and qform set to the (scanner) affine, units mm and s."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _check_affine(affine: Any, what: str) -> np.ndarray:
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: affine is not numeric ({e})") from e
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(f"{what}: affine must be a finite 4x4 matrix, got shape {a.shape}")
    return a


def _tmp_name(final: Path) -> Path:
    """A hidden temporary name beside ``final`` that keeps its extension (nibabel picks gzip by it)."""
    return final.with_name(f".tmp-{secrets.token_hex(6)}-{final.name}")


def _remove(paths: Iterable[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _write_files_atomically(writers: Sequence[tuple[Path, Callable[[Path], None]]], what: str) -> None:
    """Write each file to a temporary name beside it, then ``os.replace`` all into place.

    If any writer fails, every temporary file is removed and no final file is touched. Each final
    file is replaced atomically.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for final, write in writers:
            tmp = _tmp_name(final)
            temps.append((tmp, final))
            write(tmp)
        for tmp, final in temps:
            os.replace(tmp, final)
    except OSError as e:
        _remove(t for t, _ in temps)
        raise InputError(f"{what}: cannot write ({type(e).__name__}: {e})") from e
    except BaseException:
        _remove(t for t, _ in temps)
        raise


def _protected(protect: Iterable[str | os.PathLike]) -> set[str]:
    return {os.path.realpath(os.fspath(p)) for p in protect}


_MAP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def save_maps(out_dir: str | os.PathLike, maps: Mapping[str, Any], affine: Any,
              sidecars: Mapping[str, Mapping] | None = None, overwrite: bool = False,
              protect: Iterable[str | os.PathLike] = ()) -> dict[str, Path]:
    """Write maps as ``out_dir/{name}.nii.gz`` (float32) with ``out_dir/{name}.json`` sidecars.

    A new (or empty) ``out_dir`` is written complete into a hidden temporary folder beside it (same
    parent) and renamed into place: a failure leaves neither ``out_dir`` nor the temporary folder.
    An existing non-empty ``out_dir`` needs ``overwrite=True``; then only the files being written
    are replaced, each atomically, after all of them were written under temporary names.

    Args:
        out_dir: output folder (created with its parents).
        maps: name -> array (e.g. "T1" in s, "PD", "B"); all share the spatial grid of ``affine``.
            Names are file stems: letters, digits and ``_.+-``.
        affine: 4x4 NIfTI voxel-to-world matrix (RAS+, mm), usually ``IRSeries.affine``.
        sidecars: name -> JSON-serialisable dict written as the map's sidecar (units, method...).
        overwrite: allow writing into an existing non-empty folder (replacing same-named files).
        protect: paths that must never be written (the input files, e.g. ``IRSeries.files``); an
            output file or ``out_dir`` equal to one of them raises InputError.

    Returns:
        name -> path of the written NIfTI file.
    """
    out = Path(out_dir).expanduser()
    sidecars = dict(sidecars or {})
    if not maps:
        raise InputError(f"{out}: no maps to write")
    unknown = sorted(set(sidecars) - set(maps))
    if unknown:
        raise InputError(f"{out}: sidecars given for maps that are not written: {unknown}")
    aff = _check_affine(affine, str(out))

    arrays: dict[str, np.ndarray] = {}
    texts: dict[str, str] = {}
    for name, value in maps.items():
        if not isinstance(name, str) or not _MAP_NAME_RE.match(name) or _is_nifti_name(name) or name.endswith(".json"):
            raise InputError(f"{out}: invalid map name {name!r}; use letters, digits and _.+- (no extension)")
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InputError(f"{out}: map {name!r} cannot be converted to float32 ({e})") from e
        if arr.ndim < 2:
            raise InputError(f"{out}: map {name!r} has shape {arr.shape}; expected an image (2D to 4D+)")
        first = next(iter(arrays.values()), None)
        if first is not None and arr.shape[:3] != first.shape[:3]:
            raise InputError(f"{out}: map {name!r} has shape {arr.shape}, other maps {first.shape}; "
                             "all maps share one grid")
        arrays[name] = arr
        texts[name] = _json_text(sidecars.get(name, {}), f"{out}/{name}.json")

    protected = _protected(protect)
    if os.path.realpath(out) in protected:
        raise InputError(f"{out}: output folder is an input path; choose another output folder")
    finals = {name: (out / f"{name}.nii.gz", out / f"{name}.json") for name in arrays}
    for name, paths in finals.items():
        for p in paths:
            if os.path.realpath(p) in protected:
                raise InputError(f"{p}: output would overwrite an input file; choose another output folder")

    def writers(folder: Path) -> list[tuple[Path, Callable[[Path], None]]]:
        out_list: list[tuple[Path, Callable[[Path], None]]] = []
        for name, arr in arrays.items():
            img = _nifti_image(arr, aff)
            out_list.append((folder / f"{name}.nii.gz", lambda p, img=img: nib.save(img, str(p))))
            out_list.append((folder / f"{name}.json", lambda p, t=texts[name]: p.write_text(t)))
        return out_list

    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise InputError(f"{out}: output folder exists and is not empty; pass --overwrite")
            _write_files_atomically(writers(out), str(out))
            return {name: paths[0] for name, paths in finals.items()}

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
        tmp_dir.mkdir()  # honours the umask, unlike tempfile.mkdtemp
    except OSError as e:
        raise InputError(f"{out}: cannot create output folder ({type(e).__name__}: {e})") from e
    try:
        for final, write in writers(tmp_dir):
            write(final)
        os.replace(tmp_dir, out)  # onto a missing or empty folder
    except OSError as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise InputError(f"{out}: cannot write ({type(e).__name__}: {e})") from e
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return {name: paths[0] for name, paths in finals.items()}


# BIDS derivatives (qMRI maps): map file stem -> (BIDS suffix, desc suffix appended to the method label).
# T1map and PDmap are BIDS quantitative-map suffixes (T1map in s); the others are this tool's own.
BIDS_MAP_NAMES = {"T1map": ("T1map", ""), "PDmap": ("PDmap", ""), "InvEffmap": ("InvEffmap", ""),
                  "Residualmap": ("Residualmap", ""), "ResidualFlag": ("ResidualFlag", ""),
                  "T1map_std": ("T1map", "Std"), "PDmap_std": ("PDmap", "Std"), "InvEffmap_std": ("InvEffmap", "Std")}
BIDS_VERSION = "1.10.0"
#: Suffixes BIDS does not define (inversion efficiency, fit residual, consistency flag), listed in the
#: derivatives dataset's ``.bidsignore`` so that the BIDS validator passes over them.
BIDS_IGNORE_PATTERNS = ("*_InvEffmap.*", "*_Residualmap.*", "*_ResidualFlag.*")
_BIDS_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


def bids_entities(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``sub`` and ``ses`` labels found in the names of BIDS input files (empty when there are none)."""
    found: dict[str, str] = {}
    for p in paths:
        for key in ("sub", "ses"):
            m = re.search(rf"(?:^|_){key}-([A-Za-z0-9]+)(?=_|$)", Path(p).name.split(".")[0])
            if m:
                found.setdefault(key, m.group(1))
    return found


def save_bids_derivatives(root: str | os.PathLike, maps: Mapping[str, Any], affine: Any,
                          sidecars: Mapping[str, Mapping] | None, *, subject: str, method: str, version: str,
                          session: str | None = None, sources: Iterable[str | os.PathLike] = (),
                          overwrite: bool = False, protect: Iterable[str | os.PathLike] = ()) -> dict[str, Path]:
    """Write maps as a BIDS derivatives dataset rooted at ``root``.

    Files: ``root/dataset_description.json`` (DatasetType "derivative", GeneratedBy qmri-diffusor with
    ``version`` and the method) and ``root/sub-<subject>[/ses-<session>]/anat/
    sub-<subject>[_ses-<session>]_desc-<method>[Std]_<suffix>.nii.gz`` with JSON sidecars (units, method,
    software version, protocol, ``Sources``), suffixes from :data:`BIDS_MAP_NAMES`. Several methods and
    subjects share one dataset; files that already exist need ``overwrite``. Written atomically."""
    out = Path(root).expanduser()
    check_bids_target(out, subject, session, method)
    unknown = sorted(set(maps) - set(BIDS_MAP_NAMES))
    if unknown:
        raise InputError(f"{out}: no BIDS name for maps {unknown}")
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    folder = out / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    folder = Path(os.path.normpath(folder))
    desc_path = out / "dataset_description.json"
    desc = _read_json(desc_path) if desc_path.exists() else {}
    links = dict(desc.get("DatasetLinks", {}))
    uris, others = _bids_source_uris(sources, links)
    provenance = ({"Sources": uris} if uris else {}) | ({"qMRISourceFiles": others} if others else {})
    names = {stem: f"{prefix}_desc-{method}{BIDS_MAP_NAMES[stem][1]}_{BIDS_MAP_NAMES[stem][0]}" for stem in maps}
    bmaps = {names[k]: v for k, v in maps.items()}
    bside = {names[k]: {**dict(v), **provenance} for k, v in (sidecars or {}).items()}
    existing = [folder / f"{n}{ext}" for n in bmaps for ext in (".nii.gz", ".json") if (folder / f"{n}{ext}").exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]}: exists; pass --overwrite")

    generated = {"Name": "qmri-diffusor", "Version": version,
                 "Description": f"T1, PD and inversion-efficiency maps from inversion-recovery images ({method})"}
    if desc:
        gen = list(desc.get("GeneratedBy", []))
        if not any(isinstance(g, dict) and all(g.get(k) == generated[k] for k in ("Name", "Version", "Description"))
                   for g in gen):
            desc["GeneratedBy"] = gen + [generated]
    else:
        desc = {"Name": "qMRI Diffusor maps", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
                "GeneratedBy": [generated]}
    if links:
        desc["DatasetLinks"] = links
    ignore_path = out / ".bidsignore"
    ignored = ignore_path.read_text().splitlines() if ignore_path.exists() else []
    ignored += [pat for pat in BIDS_IGNORE_PATTERNS if pat not in ignored]
    # the description first: maps are never left in a folder that does not say what made them
    out.mkdir(parents=True, exist_ok=True)
    _write_files_atomically([(desc_path, lambda t: t.write_text(_json_text(desc, str(desc_path)))),
                             (ignore_path, lambda t: t.write_text("\n".join(ignored) + "\n"))], str(desc_path))
    written = save_maps(folder, bmaps, affine, bside, overwrite=True, protect=protect)
    return {stem: written[names[stem]] for stem in maps}


def _bids_source_uris(sources: Iterable[str | os.PathLike], links: dict) -> tuple[list[str], list[str]]:
    """BIDS URIs (``bids:<dataset>:<path>``) of the inputs that lie in a BIDS dataset (a folder above
    them holds dataset_description.json), adding that dataset to ``links`` (DatasetLinks: name -> file
    URI; ``raw``, ``raw2``, ...); the other inputs come back as plain paths (``qMRISourceFiles``)."""
    uris, others = [], []
    for src in sources:
        path = Path(src).expanduser().resolve()
        root = next((d for d in path.parents if (d / "dataset_description.json").is_file()), None)
        if root is None:
            others.append(str(src))
            continue
        uri = root.as_uri()
        name = next((k for k, v in links.items() if v == uri), None)
        if name is None:
            name = next(n for n in ("raw", *(f"raw{i}" for i in range(2, 10 ** 6))) if n not in links)
            links[name] = uri
        uris.append(f"bids:{name}:{path.relative_to(root).as_posix()}")
    return uris, others


def check_bids_target(root: str | os.PathLike, subject: str | None, session: str | None, method: str) -> None:
    """Refuse (InputError) BIDS labels that are not letters and digits, and an output folder whose
    dataset_description.json is not a derivatives dataset: checked before any mapping (``qmri map
    --bids``) as well as when writing."""
    out = Path(root).expanduser()
    for what, label in (("subject", subject), ("session", session)):
        if label is not None and not _BIDS_LABEL_RE.match(str(label)):
            raise InputError(f"{out}: BIDS {what} label must be letters and digits, got {label!r}")
    if not _BIDS_LABEL_RE.match(method):
        raise InputError(f"{out}: BIDS desc label must be letters and digits, got {method!r}")
    desc_path = out / "dataset_description.json"
    if desc_path.exists():
        desc = _read_json(desc_path)
        if desc.get("DatasetType") != "derivative":
            raise InputError(f"{desc_path}: not a BIDS derivatives dataset (DatasetType is "
                             f"{desc.get('DatasetType')!r}); choose an empty folder or a derivatives dataset")


_PROTOCOL_KEYS = ("InversionTime", "RepetitionTime", "EchoTime", "EchoTrainLength",
                  "MagneticFieldStrength", "qMRIProtocol")


def protocol_sidecar(protocol: Protocol) -> dict:
    """BIDS-style sidecar keys of a protocol (times in s), plus ``qMRIProtocol`` (the full protocol).

    ``InversionTime`` is the list of TIs; ``RepetitionTime`` a scalar or one value per image (absent
    for full recovery); ``qMRIProtocol`` keeps what BIDS has no key for (echo spacing, ordering).
    """
    d: dict[str, Any] = {"InversionTime": list(protocol.inversion_times_s)}
    if protocol.repetition_time_s is not None:
        tr = protocol.repetition_time_s
        d["RepetitionTime"] = list(tr) if isinstance(tr, tuple) else float(tr)
    d["EchoTime"] = float(protocol.echo_time_s)
    d["EchoTrainLength"] = int(protocol.echo_train_length)
    d["MagneticFieldStrength"] = float(protocol.field_strength_t)
    d["qMRIProtocol"] = protocol.to_dict()
    return d


def _merge_extra(base: dict, extra: Mapping | None, what: str) -> dict:
    if not extra:
        return base
    clash = sorted(set(extra) & set(_PROTOCOL_KEYS))
    if clash:
        raise InputError(f"{what}: extra sidecar keys {clash} would contradict the protocol; set them in the protocol")
    return {**base, **extra}


def _check_series_data(data: Any, protocol: Protocol, what: str) -> np.ndarray:
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: data cannot be converted to float32 ({e})") from e
    if arr.ndim != 4 or arr.shape[-1] != protocol.n_images:
        raise InputError(f"{what}: data must have shape (X, Y, Z, {protocol.n_images}) for "
                         f"{protocol.n_images} inversion times, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{what}: data contain NaN/Inf")
    return arr


def save_series(path: str | os.PathLike, data: Any, affine: Any, protocol: Protocol,
                extra_sidecar: Mapping | None = None, *, overwrite: bool = True) -> Path:
    """Write a 4D IR series as NIfTI (float32, inversions on the last axis) plus its BIDS-like sidecar.

    The sidecar (same name, ``.json``) holds :func:`protocol_sidecar` (InversionTime list in s,
    RepetitionTime, EchoTime, EchoTrainLength, MagneticFieldStrength, qMRIProtocol) and the
    ``extra_sidecar`` keys. Both files are written under temporary names and renamed into place.
    :func:`load_series` reads the result back (same data to float32 precision, same protocol).

    Args:
        path: ``.nii`` or ``.nii.gz`` file to write (parents are created).
        data: images, shape (X, Y, Z, N), N = protocol.n_images, in the protocol's TI order.
        affine: 4x4 NIfTI voxel-to-world matrix (RAS+, mm).
        protocol: the acquisition (times in s).
        extra_sidecar: more sidecar keys (must not redefine the protocol keys).
        overwrite: replace existing files (default); False raises InputError if either exists.
    """
    p = Path(path).expanduser()
    if not _is_nifti_name(p.name):
        raise InputError(f"{p}: series file name must end in .nii or .nii.gz")
    arr = _check_series_data(data, protocol, str(p))
    aff = _check_affine(affine, str(p))
    sc = sidecar_path(p)
    text = _json_text(_merge_extra(protocol_sidecar(protocol), extra_sidecar, str(p)), str(sc))
    if not overwrite:
        for f in (p, sc):
            if f.exists():
                raise InputError(f"{f}: exists; pass --overwrite")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{p.parent}: cannot create folder ({type(e).__name__}: {e})") from e
    img = _nifti_image(arr, aff)
    _write_files_atomically([(p, lambda t: nib.save(img, str(t))), (sc, lambda t: t.write_text(text))], str(p))
    return p


def save_bids_irt1(folder: str | os.PathLike, subject: str, data: Any, affine: Any, protocol: Protocol,
                   extra_sidecar: Mapping | None = None, *, overwrite: bool = True) -> list[Path]:
    """Write a BIDS IRT1 collection: ``sub-<subject>_inv-<n>_IRT1.nii.gz`` (3D, float32) + sidecars.

    Image n (1-based, in order of increasing TI) gets a sidecar with its own ``InversionTime`` and
    ``RepetitionTime`` (s), the protocol's EchoTime, EchoTrainLength, MagneticFieldStrength and
    qMRIProtocol, and ``extra_sidecar``. All files are written under temporary names first.

    Args:
        folder: output folder (created with its parents).
        subject: BIDS subject label (letters and digits; a leading ``sub-`` is accepted).
        data: images, shape (X, Y, Z, N) in the protocol's TI order.
        affine: 4x4 NIfTI voxel-to-world matrix (RAS+, mm).
        protocol: the acquisition (times in s).
        overwrite: replace an existing collection of the same N images (default). Other
            ``sub-<subject>_inv-*_IRT1`` files in the folder always raise InputError (they would
            mix into the collection).

    Returns:
        The written NIfTI paths, in TI order.
    """
    out = Path(folder).expanduser()
    label = subject[4:] if subject.startswith("sub-") else subject
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise InputError(f"{out}: BIDS subject label must be letters and digits, got {subject!r}")
    arr = _check_series_data(data, protocol, str(out))
    aff = _check_affine(affine, str(out))
    n = protocol.n_images
    finals = [out / f"sub-{label}_inv-{i + 1}_IRT1.nii.gz" for i in range(n)]
    if out.is_dir():
        existing = _irt1_groups(out).get((f"sub-{label}", ""), [])
        stray = sorted(str(f.name) for f in existing if f not in finals)
        if stray:
            raise InputError(f"{out}: holds other IRT1 files of sub-{label} ({', '.join(stray[:3])}) that would "
                             "mix into the collection; remove them or use another folder")
        if not overwrite and any(f.exists() or sidecar_path(f).exists() for f in finals):
            raise InputError(f"{out}: IRT1 files of sub-{label} exist; pass --overwrite")
    elif out.exists():
        raise InputError(f"{out}: exists and is not a folder")
    base = protocol_sidecar(protocol)
    trs = protocol.repetition_time_s
    writers: list[tuple[Path, Callable[[Path], None]]] = []
    for i, f in enumerate(finals):
        sc = dict(base, InversionTime=protocol.inversion_times_s[i])
        if isinstance(trs, tuple):
            sc["RepetitionTime"] = trs[i]
        text = _json_text(_merge_extra(sc, extra_sidecar, str(f)), str(sidecar_path(f)))
        img = _nifti_image(arr[..., i], aff)
        writers.append((f, lambda t, img=img: nib.save(img, str(t))))
        writers.append((sidecar_path(f), lambda t, text=text: t.write_text(text)))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create folder ({type(e).__name__}: {e})") from e
    _write_files_atomically(writers, str(out))
    return finals


__all__ = ["InputError", "IRSeries", "load_series", "load_nifti_map", "save_maps", "save_series",
           "save_bids_irt1", "save_bids_derivatives", "bids_entities", "BIDS_MAP_NAMES", "sidecar_path", "protocol_sidecar", "dicom_pixel_values", "philips_scale_slope"]
