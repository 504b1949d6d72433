"""Writing BIDS derivatives (quantitative maps with sidecars, dataset_description, .bidsignore)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping




from .series import InputError
from .writing import _json_text, _write_files_atomically, save_maps
from .nifti import _read_json


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
                          overwrite: bool = False, protect: Iterable[str | os.PathLike] = (),
                          entities: Mapping[str, str] | None = None,
                          spatial_codes: tuple[int, int] = (1, 1)) -> dict[str, Path]:
    """Write maps as a BIDS derivatives dataset rooted at ``root``.

    Files: ``root/dataset_description.json`` (DatasetType "derivative", GeneratedBy qmri-diffusor with
    ``version`` and the method) and ``root/sub-<subject>[/ses-<session>]/anat/
    sub-<subject>[_ses-<session>][_<key>-<value>...]_desc-<method>[Std]_<suffix>.nii.gz`` with JSON
    sidecars (units, method, software version, protocol, ``Sources``), suffixes from
    :data:`BIDS_MAP_NAMES`; ``entities`` are the source's other entities (acq, run, ...: key -> label, in
    BIDS order). Several methods and subjects share one dataset; files that already exist need
    ``overwrite``. Written atomically."""
    out = Path(root).expanduser()
    check_bids_target(out, subject, session, method)
    unknown = sorted(set(maps) - set(BIDS_MAP_NAMES))
    if unknown:
        raise InputError(f"{out}: no BIDS name for maps {unknown}")
    prefix = bids_prefix(subject, session, entities, where=str(out))
    folder = out / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    folder = Path(os.path.normpath(folder))
    desc, ignored, provenance = _description(out, method, version, sources)
    names = {stem: f"{prefix}_desc-{method}{BIDS_MAP_NAMES[stem][1]}_{BIDS_MAP_NAMES[stem][0]}" for stem in maps}
    bmaps = {names[k]: v for k, v in maps.items()}
    bside = {names[k]: {**dict(v), **provenance} for k, v in (sidecars or {}).items()}
    existing = [folder / f"{n}{ext}" for n in bmaps for ext in (".nii.gz", ".json") if (folder / f"{n}{ext}").exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]}: exists; pass --overwrite")
    # the description first: maps are never left in a folder that does not say what made them
    _write_description(out, desc, ignored)
    written = save_maps(folder, bmaps, affine, bside, overwrite=True, protect=protect, spatial_codes=spatial_codes)
    return {stem: written[names[stem]] for stem in maps}


def bids_prefix(subject: str, session: str | None = None, entities: Mapping[str, str] | None = None,
                where: str = "BIDS") -> str:
    """``sub-<subject>[_ses-<session>][_<key>-<value>...]``: the name prefix of a derivative file."""
    parts = [f"sub-{subject}"] + ([f"ses-{session}"] if session else [])
    for key, label in (entities or {}).items():
        if not re.fullmatch(r"[a-z]+", str(key)) or key in ("sub", "ses", "desc", "inv"):
            raise InputError(f"{where}: not a BIDS entity for a derivative's name: {key!r}")
        if not _BIDS_LABEL_RE.match(str(label)):
            raise InputError(f"{where}: BIDS {key} label must be letters and digits, got {label!r}")
        parts.append(f"{key}-{label}")
    return "_".join(parts)


def write_bids_description(root: str | os.PathLike, method: str, version: str,
                           sources: Iterable[str | os.PathLike] = (), ignore: Iterable[str] = ()) -> None:
    """Create or update ``root/dataset_description.json`` (GeneratedBy this version and method, DatasetLinks
    to the datasets of ``sources``) and ``root/.bidsignore`` (:data:`BIDS_IGNORE_PATTERNS` and ``ignore``)
    as :func:`save_bids_derivatives` does, without writing maps (atomically; nothing else changes)."""
    out = Path(root).expanduser()
    check_bids_target(out, None, None, method)
    desc, ignored, _ = _description(out, method, version, sources)
    ignored += [pat for pat in ignore if pat not in ignored]
    _write_description(out, desc, ignored)


def _description(out: Path, method: str, version: str, sources: Iterable[str | os.PathLike]) -> tuple[dict, list, dict]:
    """The updated dataset description and .bidsignore lines of the derivatives dataset ``out``, and the
    provenance keys of a sidecar of ``sources`` (BIDS URIs through its DatasetLinks)."""
    desc_path = out / "dataset_description.json"
    desc = _read_json(desc_path) if desc_path.exists() else {}
    links = dict(desc.get("DatasetLinks", {}))
    uris, others = _bids_source_uris(sources, links)
    provenance = ({"Sources": uris} if uris else {}) | ({"qMRISourceFiles": others} if others else {})
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
    return desc, ignored, provenance


def _write_description(out: Path, desc: dict, ignored: list) -> None:
    """Write the description and .bidsignore where their content changes (atomically; unchanged files are
    left as they are)."""
    desc_path, ignore_path = out / "dataset_description.json", out / ".bidsignore"
    texts = {desc_path: _json_text(desc, str(desc_path)), ignore_path: "\n".join(ignored) + "\n"}
    try:
        out.mkdir(parents=True, exist_ok=True)
        changed = [(p, t) for p, t in texts.items() if not p.is_file() or p.read_text() != t]
    except OSError as e:
        raise InputError(f"{out}: cannot create folder ({type(e).__name__}: {e})") from e
    _write_files_atomically([(p, lambda f, t=t: f.write_text(t)) for p, t in changed], str(desc_path))



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
