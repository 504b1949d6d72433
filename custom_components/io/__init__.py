"""Reading inversion-recovery series (NIfTI, BIDS IRT1, DICOM) and writing maps.

Everything a user points the toolkit at goes through :func:`load_series`, which returns an
:class:`IRSeries`: magnitude images as float64 of shape (X, Y, Z, N) with the inversions on the last
axis sorted by increasing inversion time, a 4x4 NIfTI (RAS+, mm) affine and a
:class:`~custom_components.physics.protocol.Protocol` (times in s). Accepted inputs:

a) a 4D NIfTI file (``.nii``/``.nii.gz``), inversions on the last axis (a 2D series is
   (X, Y, 1, N)). Inversion times in s come from ``tis=`` or from the BIDS sidecar beside it
   (same name, ``.json``; ``"InversionTime"``: list in s, ``"RepetitionTime"``: scalar or list in s).
b) a folder holding the DICOM files of one IR series (one file per TI and slice, any file names, or
   Enhanced MR multi-frame files; one series, or one series per TI; other mixes of series are refused).
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

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .series import IRSeries, InputError, nonnegative_number  # noqa: F401
from .nifti import _IRT1_RE, _irt1_group_by_prefix, _irt1_group_in_folder, _irt1_group_of_file, _is_nifti_name, _load_bids_irt1, _load_nifti_4d, _nib_data, _nib_load, max_input_bytes, sidecar_path  # noqa: F401
from .dicom import _dicom_kind, _load_dicom_folder, dicom_pixel_values, philips_scale_slope  # noqa: F401
from .writing import _write_files_atomically, protocol_sidecar, save_bids_irt1, save_maps, save_series  # noqa: F401
from .derivatives import BIDS_IGNORE_PATTERNS, BIDS_MAP_NAMES, BIDS_VERSION, bids_entities, bids_prefix, check_bids_target, save_bids_derivatives, write_bids_description  # noqa: F401


def load_series(path: str | os.PathLike, tis: Sequence[float] | None = None,
                tr: float | Sequence[float] | None = None, *, signed: bool = False,
                echo_spacing: float | None = None, etl: int | None = None) -> IRSeries:
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
        echo_spacing: echo spacing of the echo train in s; replaces what the headers imply (their
            echo time, an upper bound for a fast spin echo; see custom_components.physics.protocol).
        etl: echo train length; replaces the headers' EchoTrainLength.

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
                return _load_bids_irt1(group, p, tis, tr, signed, echo_spacing, etl)
            return _load_dicom_folder(p, tis, tr, echo_spacing, etl)
        if p.is_file():
            if _IRT1_RE.match(p.name):
                return _load_bids_irt1(_irt1_group_of_file(p), p, tis, tr, signed, echo_spacing, etl)
            if _is_nifti_name(p.name):
                return _load_nifti_4d(p, tis, tr, signed, echo_spacing, etl)
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
            return _load_bids_irt1(group, p, tis, tr, signed, echo_spacing, etl)
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


__all__ = ["InputError", "IRSeries", "load_series", "load_nifti_map", "save_maps", "save_series",
           "save_bids_irt1", "save_bids_derivatives", "bids_entities", "BIDS_MAP_NAMES", "sidecar_path", "protocol_sidecar", "dicom_pixel_values", "philips_scale_slope"]
