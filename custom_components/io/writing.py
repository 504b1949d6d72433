"""Writing maps and series atomically: NIfTI + JSON sidecars, written to a temporary name and renamed into place."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from ..physics.protocol import Protocol


from .series import InputError
from .nifti import _irt1_groups, _is_nifti_name, sidecar_path


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



def _nifti_image(data: np.ndarray, affine: np.ndarray, spatial_codes: tuple[int, int] = (1, 1)):
    """Float32 NIfTI-1 image with sform and qform set to the affine, units mm and s. ``spatial_codes``: the
    input's (sform_code, qform_code); a 0 (unset) takes the other one's, both 0 give 1 (scanner)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    sform, qform = (int(c) if 0 <= int(c) <= 5 else 0 for c in spatial_codes)
    sform = sform or qform or 1
    img.set_sform(affine, code=sform)
    img.set_qform(affine, code=qform or sform)
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
              protect: Iterable[str | os.PathLike] = (), spatial_codes: tuple[int, int] = (1, 1)) -> dict[str, Path]:
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
        spatial_codes: the NIfTI (sform_code, qform_code) of the input (``IRSeries.spatial_codes``).

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
            img = _nifti_image(arr, aff, spatial_codes)
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



_PROTOCOL_KEYS = ("InversionTime", "RepetitionTime", "EchoTime", "EchoTrainLength",
                  "MagneticFieldStrength", "qMRIProtocol", "qMRITimingSources")



def protocol_sidecar(protocol: Protocol) -> dict:
    """BIDS-style sidecar keys of a protocol (times in s), plus ``qMRIProtocol`` (the full protocol).

    ``InversionTime`` is the list of TIs; ``RepetitionTime`` a scalar or one value per image (absent
    for full recovery); ``qMRIProtocol`` keeps what BIDS has no key for (echo spacing, ordering);
    ``qMRITimingSources`` says where each timing the signal model uses came from (a header field, an
    argument/flag or a default: :attr:`Protocol.timing_provenance`).
    """
    d: dict[str, Any] = {"InversionTime": list(protocol.inversion_times_s)}
    if protocol.repetition_time_s is not None:
        tr = protocol.repetition_time_s
        d["RepetitionTime"] = list(tr) if isinstance(tr, tuple) else float(tr)
    d["EchoTime"] = float(protocol.echo_time_s)
    d["EchoTrainLength"] = int(protocol.echo_train_length)
    d["MagneticFieldStrength"] = float(protocol.field_strength_t)
    d["qMRIProtocol"] = protocol.to_dict()
    d["qMRITimingSources"] = protocol.timing_provenance
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
