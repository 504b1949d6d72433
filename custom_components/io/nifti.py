"""Reading NIfTI inputs: a 4D NIfTI with its BIDS sidecar or given TIs, and BIDS IRT1 file collections."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from ..physics.protocol import Protocol, ProtocolError, from_bids_sidecars


from .series import IRSeries, InputError, _finish


_NIFTI_SUFFIXES = (".nii.gz", ".nii")




def nifti_spatial_codes(img) -> tuple[int, int]:
    """(sform_code, qform_code) of a NIfTI image: where its affine points (1 scanner, 2 aligned, 3 Talairach,
    4 MNI, 5 template); maps written from it keep them (:func:`custom_components.io.writing.save_maps`)."""
    hdr = getattr(img, "header", None)
    try:
        return int(hdr["sform_code"]), int(hdr["qform_code"])
    except (KeyError, TypeError, ValueError):
        return 1, 1


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



def _load_nifti_4d(p: Path, tis, tr, signed: bool, echo_spacing=None, etl=None) -> IRSeries:
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
    given = {}
    if tis is not None:
        given["inversion_times_s"] = "tis argument (qmri map --tis)"
    if tr is not None:
        given["repetition_time_s"] = "tr argument (qmri map --tr)"
    elif sidecar.get("RepetitionTimeExcitation") is not None:
        given["repetition_time_s"] = "sidecar RepetitionTimeExcitation"
    protocol = _bids_protocol(per_image, sidecar, str(sc_path if sidecar else p), notes,
                              echo_spacing=echo_spacing, etl=etl, sources=given)
    flagged = signed or _sidecar_marks_real(sidecar)
    return _finish(data, np.asarray(img.affine, float), protocol, str(p), notes, files,
                   negatives="magnitude" if flagged else "error", spatial_codes=nifti_spatial_codes(img))



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



def _bids_protocol(per_image: list[dict], sidecar: Mapping, where: str, notes: list[str], *,
                   echo_spacing=None, etl=None, sources=None) -> Protocol:
    """Protocol from per-image BIDS sidecars (sorted by TI), plus this package's own protocol keys
    (``qMRIProtocol``: echo spacing, ordering, name) and the caller's echo spacing / train length;
    each timing's source is recorded (:attr:`Protocol.timing_sources`)."""
    try:
        q = sidecar.get("qMRIProtocol")
        per_image = [dict(d, qMRIProtocol=q) if isinstance(q, dict) else d for d in per_image]
        protocol = from_bids_sidecars(per_image, echo_spacing_s=echo_spacing, echo_train_length=etl, sources=sources)
    except ProtocolError as e:
        raise InputError(f"{where}: {e}") from e
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: invalid protocol value in sidecar ({e})") from e
    if all(d.get("MagneticFieldStrength") is None for d in per_image):
        notes.append(f"no MagneticFieldStrength given: {protocol.field_strength_t:g} T assumed")
    return protocol



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



def _load_bids_irt1(paths: list[Path], source: Path, tis, tr, signed: bool, echo_spacing=None, etl=None) -> IRSeries:
    notes: list[str] = [f"BIDS IRT1 collection of {len(paths)} files"]
    files: list[str] = []
    images, affines, sidecars, inv_index, codes = [], [], [], [], []
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
        codes.append(nifti_spatial_codes(img))
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
    given_tr, tr_key = False, "RepetitionTime"
    for sc in sorted_sc:  # one TR per image
        t = sc.pop("RepetitionTimeExcitation", None)
        if t is not None:
            sc["RepetitionTime"] = t
            tr_key = "RepetitionTimeExcitation"
    if tr is not None:
        tr_list = _per_image_tr(tr, n, str(source), "repetition time") or []
        file_tr = [sc.get("RepetitionTime") for sc in sorted_sc]
        if None in file_tr:  # the sidecars do not say: the given TR is used
            for sc, t in zip(sorted_sc, tr_list):
                sc["RepetitionTime"] = t
            given_tr = True
        elif not _same_floats(_floats(file_tr, "RepetitionTime", str(source)), tr_list):
            raise InputError(f"{source}: given repetition time {tr} s disagrees with the sidecars' {file_tr} s")
    if [inv_index[i] for i in order] != sorted(inv_index):
        notes.append("inv-<n> indices are not in TI order; images ordered by InversionTime")
    data = np.stack([images[i] for i in order], axis=-1)
    protocol = _bids_protocol(sorted_sc, sorted_sc[0], str(source), notes, echo_spacing=echo_spacing, etl=etl,
                              sources={"repetition_time_s": "tr argument (qmri map --tr)" if given_tr
                                       else f"sidecar {tr_key}"})
    flagged = signed or any(_sidecar_marks_real(sc) for sc in sidecars)
    return _finish(data, affines[0], protocol, str(source), notes, files,
                   negatives="magnitude" if flagged else "error", spatial_codes=codes[0])
