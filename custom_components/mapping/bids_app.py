"""``qmri bids``: the toolkit as a BIDS App (https://bids-apps.neuroimaging.io): ``BIDS_DIR OUTPUT_DIR
participant|group``.

Participant level: every BIDS IRT1 collection (``sub-<label>[/ses-<label>]/anat/*_inv-<n>_IRT1.nii[.gz]``
with their sidecars, grouped by the entities other than ``inv``) of the chosen participants is read with
:func:`custom_components.io.load_series`, mapped with :func:`custom_components.mapping.map_series` and
written with :func:`custom_components.io.save_bids_derivatives`: the same functions, files and sidecars as
``qmri map --bids``. Each collection's output ends with a completion record written last,
``<prefix>_desc-<method>_qmriRun.json`` (:data:`RUN_SUFFIX`), which lists the files written and their sizes:
an output with a valid record is complete and is skipped on the next run; anything else (files without
a record, from a run that was killed) is mapped again. Participants run in parallel processes with
``n_jobs`` > 1, each process with ``cpu_count // n_jobs`` torch threads; the maps do not depend on it.

Group level: one table ``OUTPUT_DIR/group_desc-<method>_T1.tsv`` (+ ``.json`` describing its columns) with
a row per complete collection: the median T1 (ms) over the mapped voxels and in three T1 classes of the
map itself (:func:`t1_classes`), and the run's metadata (method, version, inversion times, date, source).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .. import __version__
from ..io import (
    InputError,
    load_nifti_map,
    load_series,
    save_bids_derivatives,
    write_bids_description,
)
from ..io.derivatives import bids_prefix, check_bids_target
from ..io.nifti import _irt1_groups
from ..io.writing import _json_text, _write_files_atomically
from ..physics.protocol import ProtocolError
from .mapper import METHODS, map_series
from .results import output_arrays, sidecars_for

#: Suffix of the completion record of one collection's output (written last; listed in .bidsignore).
RUN_SUFFIX = "qmriRun"
#: Patterns this app adds to the derivatives' .bidsignore (its own files, which BIDS does not define).
BIDS_APP_IGNORE = (f"*_{RUN_SUFFIX}.json", "group_*")
#: Map options that change the maps: a complete output made with other values is not silently kept.
RESULT_OPTIONS = ("noise", "n_coils", "sigma")
#: The classes of :func:`t1_classes`, from short to long T1.
CLASS_NAMES = ("short", "mid", "long")
CLASS_DEFINITION = (
    "Voxels: those the fit mapped (T1map > 0: the signal mask of the participant level, by default the "
    "voxels whose signal exceeds the noise) and, where the output has a ResidualFlag map, whose images the "
    "maps explain (flag 0). Classes: a 3-class k-means (Lloyd's algorithm, started at the 1/6, 1/2 and 5/6 "
    "quantiles) on log T1 of these voxels, per row, named by increasing T1: short, mid, long; voxels are "
    "assigned to the nearest class centre in log T1, so the boundaries (reported per row) are the geometric "
    "means of adjacent centres. In a brain the three classes are white matter, grey matter and CSF "
    "(partial-volume voxels go to the nearest class); it is a classification of the T1 values, not an "
    "anatomical segmentation.")


@dataclass(frozen=True)
class Collection:
    """One BIDS IRT1 collection: ``name`` is its derivatives' name prefix (sub, ses and the entities before
    ``inv`` but ``desc``), ``files`` its NIfTI files."""

    subject: str
    session: str | None
    entities: tuple[tuple[str, str], ...]
    files: tuple[str, ...]

    @property
    def name(self) -> str:
        return bids_prefix(self.subject, self.session, dict(self.entities))

    def folder(self, root: Path) -> Path:
        return root / f"sub-{self.subject}" / (f"ses-{self.session}" if self.session else "") / "anat"


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "mapped", "skipped" or "failed"
    detail: str

    def line(self) -> str:
        if self.status == "failed":
            return f"{self.name}: failed: {self.detail}"
        return f"{self.name}: {self.status} {self.detail}"


# ----------------------------------------------------------------------------------------------- discovery

def _label(x) -> str:
    s = str(x).strip()
    s = s.removeprefix("sub-")
    if not re.fullmatch(r"[A-Za-z0-9]+", s):
        raise InputError(f"--participant_label: a BIDS label is letters and digits (with or without sub-), got {x!r}")
    return s


def participant_labels(labels) -> list[str] | None:
    """``--participant_label`` values (a list, or one string of labels separated by commas or spaces),
    without their ``sub-``; None for all participants."""
    if labels is None:
        return None
    if isinstance(labels, bool):  # a bare --participant_label
        raise InputError("--participant_label needs at least one label")
    if isinstance(labels, (list, tuple)):
        items = [str(x) for x in labels]
    else:
        items = str(labels).replace(",", " ").split()
    if not items:
        raise InputError("--participant_label needs at least one label")
    return list(dict.fromkeys(_label(x) for x in items))


def _check_bids_dir(bids_dir: str | os.PathLike) -> Path:
    root = Path(bids_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: no such BIDS dataset folder")
    if not (root / "dataset_description.json").is_file():
        raise InputError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    return root


def _entities(text: str, where: Path) -> list[tuple[str, str]]:
    out = []
    for part in [p for p in text.split("_") if p]:
        key, sep, value = part.partition("-")
        if not sep or not re.fullmatch(r"[a-z]+", key) or not re.fullmatch(r"[A-Za-z0-9]+", value):
            raise InputError(f"{where}: not a BIDS name ({part!r} is not an entity <key>-<label>)")
        out.append((key, value))
    return out


def find_collections(bids_dir: str | os.PathLike, labels: Sequence[str] | None = None) -> list[Collection]:
    """The IRT1 collections of the participants ``labels`` (all: None) of a BIDS dataset, sorted by name.

    A collection is the ``*_inv-<n>_IRT1.nii[.gz]`` files of one ``anat`` folder (``sub-<label>/anat`` or
    ``sub-<label>/ses-<label>/anat``) that share every entity but ``inv``; phase and imaginary parts
    (``part-phase``, ``part-imag``) are not magnitude images and are left out. An unknown label is an
    InputError naming the participants that have IRT1 data."""
    root = _check_bids_dir(bids_dir)
    found: dict[str, list[Collection]] = {}
    for sub_dir in sorted(root.glob("sub-*")):
        if not sub_dir.is_dir() or not re.fullmatch(r"sub-[A-Za-z0-9]+", sub_dir.name):
            continue
        subject = sub_dir.name[4:]
        anats = [sub_dir / "anat"] + [d / "anat" for d in sorted(sub_dir.glob("ses-*")) if d.is_dir()]
        for anat in anats:
            if not anat.is_dir():
                continue
            for (prefix, rest), files in _irt1_groups(anat).items():
                ents = _entities(prefix, files[0])
                after = dict(_entities(rest, files[0]))
                if after.get("part") in ("phase", "imag"):
                    continue
                if not ents or ents[0] != ("sub", subject):
                    raise InputError(f"{files[0]}: its sub- entity does not match its folder {sub_dir.name}")
                session = None
                if len(ents) > 1 and ents[1][0] == "ses":
                    session = ents[1][1]
                    ents = ents[1:]
                folder_ses = anat.parent.name[4:] if anat.parent != sub_dir else None
                if session != folder_ses:
                    raise InputError(f"{files[0]}: its ses- entity does not match its folder")
                others = tuple((k, v) for k, v in ents[1:] if k not in ("desc",))
                found.setdefault(subject, []).append(
                    Collection(subject, session, others, tuple(str(f) for f in files)))
    available = sorted(found)
    if labels is not None:
        unknown = [x for x in labels if x not in found]
        if unknown:
            raise InputError(f"{root}: no IRT1 data for participant(s) {', '.join(unknown)}; available: "
                             f"{', '.join(available) or 'none'}")
        chosen = [c for x in labels for c in found[x]]
    else:
        chosen = [c for x in available for c in found[x]]
    if not chosen:
        raise InputError(f"{root}: no BIDS IRT1 collections (sub-*/[ses-*/]anat/*_inv-<n>_IRT1.nii[.gz])")
    names = [c.name for c in chosen]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"{root}: several IRT1 collections would be written as {twice[0]} (parts of one "
                         "acquisition?); keep one")
    return sorted(chosen, key=lambda c: c.name)


# ------------------------------------------------------------------------------------------- participant

def run_record(marker: Path) -> dict | None:
    """The completion record ``marker`` if it says complete and every file it lists exists with its
    size; else None (no output, or one that a killed run left unfinished)."""
    try:
        rec = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    files = rec.get("Files") if isinstance(rec, dict) else None
    if not isinstance(files, dict) or not files or rec.get("Complete") is not True:
        return None
    for name, size in files.items():
        f = marker.parent / name
        try:
            if f.stat().st_size != size:
                return None
        except OSError:
            return None
    return rec


def _marker(col: Collection, out: Path, method: str) -> Path:
    return col.folder(out) / f"{col.name}_desc-{method}_{RUN_SUFFIX}.json"


def _relative(path: str | Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _source_pattern(col: Collection, root: Path) -> str:
    return re.sub(r"_inv-[0-9]+_", "_inv-*_", _relative(col.files[0], root))


def _remove_leftovers(folder: Path, col: Collection, method: str, keep: Iterable[str]) -> None:
    """This collection's files of ``method`` that the new output does not hold (a killed run's, or one made
    with other options), and the temporary files of a killed write."""
    keep = set(keep)
    stems = (f"{col.name}_desc-{method}_", f"{col.name}_desc-{method}Std_")
    for f in folder.iterdir() if folder.is_dir() else ():
        name = f.name
        tmp = re.match(r"^\.tmp-[0-9a-f]+-(.*)$", name)
        own = (tmp.group(1) if tmp else name).startswith(stems)
        if own and name not in keep and f.is_file():
            f.unlink(missing_ok=True)


def map_collection(col: Collection, bids_dir: Path, out: Path, method: str, options: dict) -> Outcome:
    """Map one collection into the derivatives ``out``, unless its output is complete; see the module."""
    marker = _marker(col, out, method)
    wanted = {k: options.get(k) for k in RESULT_OPTIONS}
    rec = run_record(marker)
    if rec is not None:
        if rec.get("Options") != wanted:
            return Outcome(col.name, "failed", f"its complete output {_relative(marker, out)} was made with "
                           f"{rec.get('Options')}, not {wanted}; delete that file to map it again")
        return Outcome(col.name, "skipped", f"(complete: {_relative(marker, out)})")
    try:
        return _map(col, bids_dir, out, method, options, marker, wanted)
    except (InputError, ProtocolError) as e:
        return Outcome(col.name, "failed", " ".join(str(e).split()) or type(e).__name__)
    except OSError as e:  # removing a killed run's files, or reading back what was written
        return Outcome(col.name, "failed", f"{e.filename or out}: cannot write ({type(e).__name__}: {e.strerror or e})")


def _map(col: Collection, bids_dir: Path, out: Path, method: str, options: dict, marker: Path, wanted: dict) -> Outcome:
    marker.unlink(missing_ok=True)  # a record whose files are gone or changed: mapped again
    parent = col.folder(out).parent
    for tmp in parent.glob(".anat.tmp-*") if parent.is_dir() else ():  # a new anat folder a kill left unrenamed
        shutil.rmtree(tmp, ignore_errors=True)
    series = load_series(col.files[0])
    res = map_series(series, method=method, progress=False, **options)
    written = save_bids_derivatives(out, output_arrays(res), series.affine, sidecars_for(res, series, method),
                                    subject=col.subject, session=col.session, entities=dict(col.entities),
                                    method=method, version=__version__, sources=series.files, overwrite=True,
                                    protect=series.files, spatial_codes=series.spatial_codes)
    folder = col.folder(out)
    files = [p for nii in written.values() for p in (nii, nii.with_name(nii.name[:-len(".nii.gz")] + ".json"))]
    _remove_leftovers(folder, col, method, [p.name for p in files] + [marker.name])
    t1 = np.asarray(res.maps["T1"])[res.mask]
    record = {"Complete": True, "Name": col.name, "Subject": col.subject, "Session": col.session,
              "Entities": dict(col.entities), "Method": method, "Options": wanted,
              "Software": {"Name": "qmri-diffusor", "Version": __version__},
              "Date": datetime.now(UTC).isoformat(timespec="seconds"),
              "InversionTime": list(series.protocol.inversion_times_s),
              "MagneticFieldStrength": float(series.protocol.field_strength_t),
              "Sources": [_relative(f, bids_dir) for f in (series.files or col.files)],
              "Source": _source_pattern(col, bids_dir), "MappedVoxels": int(res.mask.sum()),
              "Files": {p.name: p.stat().st_size for p in files}}
    text = _json_text(record, str(marker))
    _write_files_atomically([(marker, lambda t: t.write_text(text))], str(marker))  # last: the output is complete
    med = f", median T1 {np.median(t1) * 1000:.0f} ms" if t1.size else ""
    return Outcome(col.name, "mapped", f"({method}, {t1.size} voxels{med}) -> {_relative(written['T1map'], out)}")


def _run_participant(cols: list[Collection], bids_dir: Path, out: Path, method: str, options: dict) -> list[Outcome]:
    return [map_collection(c, bids_dir, out, method, options) for c in cols]


def _limit_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_participant_level(bids_dir: str | os.PathLike, output_dir: str | os.PathLike, labels: Sequence[str] | None = None,
                          method: str = "mle", options: dict | None = None, n_jobs: int = 1,
                          log: Callable[[str], None] = print) -> list[Outcome]:
    """Map every IRT1 collection of the participants ``labels`` (all: None) into the BIDS derivatives dataset
    ``output_dir``, ``n_jobs`` participants at a time; ``log`` gets one line per collection (mapped, skipped,
    failed) and a summary. Raises InputError after the run if any collection failed."""
    options = dict(options or {})
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    root = _check_bids_dir(bids_dir)
    out = Path(output_dir).expanduser()
    cols = find_collections(root, labels)
    check_bids_target(out, None, None, method)  # before anything is written: not into a raw dataset
    inside = out.resolve().relative_to(root.resolve()).parts if out.resolve().is_relative_to(root.resolve()) else None
    if inside is not None and (not inside or inside[0].startswith("sub-")):
        raise InputError(f"{out}: is the BIDS dataset or one of its participant folders; choose e.g. "
                         f"{root / 'derivatives' / 'qmri'}")
    # the description once, before the workers: they then only read it (the same DatasetLinks for all)
    write_bids_description(out, method, __version__, sources=[f for c in cols for f in c.files],
                           ignore=BIDS_APP_IGNORE)
    jobs: dict[str, list[Collection]] = {}
    for c in cols:
        jobs.setdefault(c.subject, []).append(c)
    outcomes: list[Outcome] = []

    def report(done: list[Outcome]) -> None:
        for o in done:
            log(o.line())
        outcomes.extend(done)

    workers = min(int(n_jobs), len(jobs))
    if workers <= 1:
        for group in jobs.values():
            report(_run_participant(group, root, out, method, options))
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # not fork: torch's thread pools do not survive a fork
        threads = max(1, _cpus() // workers)
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_limit_threads, initargs=(threads,))
        try:
            futures = [ex.submit(_run_participant, group, root, out, method, options) for group in jobs.values()]
            for f in as_completed(futures):
                report(f.result())
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        ex.shutdown(wait=True)
    n = {s: sum(o.status == s for o in outcomes) for s in ("mapped", "skipped", "failed")}
    log(f"participant level: {n['mapped']} mapped, {n['skipped']} skipped (complete), {n['failed']} failed -> {out}")
    if n["failed"]:
        failed = [o.name for o in outcomes if o.status == "failed"]
        raise InputError(f"{n['failed']} of {len(outcomes)} collections failed: {', '.join(sorted(failed))}")
    return outcomes


# ------------------------------------------------------------------------------------------------ group

def t1_classes(t1_ms: np.ndarray, k: int = 3, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Classes of T1 values (ms): a k-means on log T1 (:data:`CLASS_DEFINITION`). Returns the label of each
    value (0 = shortest T1) and the k-1 class boundaries (ms); labels are -1 with fewer than k values."""
    x = np.log(np.asarray(t1_ms, dtype=np.float64))
    if x.size < k:
        return np.full(x.shape, -1), np.full(k - 1, np.nan)
    centres = np.quantile(x, (np.arange(k) + 0.5) / k)
    labels = np.zeros(x.shape, dtype=int)
    for _ in range(iterations):
        labels = np.argmin(np.abs(x[:, None] - centres[None, :]), axis=1)
        new = np.array([x[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres, rtol=0, atol=1e-12):
            break
        centres = new
    centres = np.sort(centres)
    labels = np.argmin(np.abs(x[:, None] - centres[None, :]), axis=1)
    return labels, np.exp((centres[1:] + centres[:-1]) / 2)


#: Columns of the group table: name -> (description, units or None).
GROUP_COLUMNS = {
    "participant_id": ("participant label, sub-<label>", None),
    "session_id": ("session label, ses-<label> (n/a: none)", None),
    "name": ("the derivatives' name prefix (participant, session and the source's other entities)", None),
    "method": ("mapping method (qmri bids --method; the maps' desc- label)", None),
    "software_version": ("qmri-diffusor version that made the maps", None),
    "options": ("map options that change the maps (noise model, coils, sigma; sigma n/a: from the background)", None),
    "date": ("when the maps were completed (UTC, ISO 8601)", None),
    "inversion_times_ms": ("the protocol's inversion times, comma separated", "ms"),
    "field_strength_T": ("magnetic field strength", "T"),
    "source": ("the IRT1 collection in the BIDS dataset (inv-* stands for its images)", None),
    "n_voxels": ("voxels in the statistics: mapped (T1map > 0) and not flagged by ResidualFlag", None),
    "n_flagged": ("mapped voxels left out because ResidualFlag is 1 (the maps do not explain the images)", None),
    "T1_median_ms": ("median T1 over the n_voxels voxels", "ms"),
    **{f"T1_{c}_median_ms": (f"median T1 in the '{c}' T1 class (qMRITissueClasses)", "ms") for c in CLASS_NAMES},
    **{f"n_{c}": (f"voxels in the '{c}' T1 class", None) for c in CLASS_NAMES},
    "boundary_short_mid_ms": ("T1 between the short and mid classes (geometric mean of their centres)", "ms"),
    "boundary_mid_long_ms": ("T1 between the mid and long classes (geometric mean of their centres)", "ms"),
}


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v).replace("\t", " ").replace("\n", " ")


def group_row(marker: Path, rec: dict) -> dict:
    """One row of the group table from a complete output (its completion record ``rec``)."""
    folder = marker.parent
    stem = marker.name[:-len(f"_{RUN_SUFFIX}.json")]
    t1, _ = load_nifti_map(folder / f"{stem}_T1map.nii.gz")
    keep = np.isfinite(t1) & (t1 > 0)
    n_flagged = 0
    flag_name = f"{stem}_ResidualFlag.nii.gz"
    if flag_name in rec["Files"]:
        flag, _ = load_nifti_map(folder / flag_name)
        n_flagged = int((keep & (flag > 0)).sum())
        keep &= ~(flag > 0)
    t1_ms = t1[keep] * 1000.0
    labels, bounds = t1_classes(t1_ms)
    opts = rec.get("Options", {})
    row = {"participant_id": f"sub-{rec['Subject']}",
           "session_id": f"ses-{rec['Session']}" if rec.get("Session") else None,
           "name": rec["Name"], "method": rec["Method"], "software_version": rec["Software"]["Version"],
           "options": " ".join(f"{k}={'n/a' if v is None else v}" for k, v in opts.items()),
           "date": rec["Date"], "inversion_times_ms": ",".join(f"{t * 1000:g}" for t in rec["InversionTime"]),
           "field_strength_T": f"{rec['MagneticFieldStrength']:g}", "source": rec["Source"],
           "n_voxels": int(t1_ms.size), "n_flagged": n_flagged,
           "T1_median_ms": float(np.median(t1_ms)) if t1_ms.size else None}
    for j, c in enumerate(CLASS_NAMES):
        sel = t1_ms[labels == j]
        row[f"T1_{c}_median_ms"] = float(np.median(sel)) if sel.size else None
    for j, c in enumerate(CLASS_NAMES):
        row[f"n_{c}"] = int((labels == j).sum())
    row["boundary_short_mid_ms"], row["boundary_mid_long_ms"] = (float(b) for b in bounds)
    return row


def run_group_level(bids_dir: str | os.PathLike, output_dir: str | os.PathLike, labels: Sequence[str] | None = None,
                    method: str = "mle", log: Callable[[str], None] = print) -> Path:
    """Tabulate the complete participant-level outputs of ``method`` in ``output_dir`` (of the participants
    ``labels``, all: None) into ``output_dir/group_desc-<method>_T1.tsv`` and its JSON sidecar; collections of
    the dataset without a complete output get a line each and no row."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    root = _check_bids_dir(bids_dir)
    expected = find_collections(root, labels)  # unknown labels: the same one-line error as the participant level
    out = Path(output_dir).expanduser()
    if not (out / "dataset_description.json").is_file():
        raise InputError(f"{out}: no derivatives (no dataset_description.json); run the participant level first")
    check_bids_target(out, None, None, method)
    chosen = set(labels) if labels is not None else None
    markers = sorted(list(out.glob(f"sub-*/anat/*_desc-{method}_{RUN_SUFFIX}.json"))
                     + list(out.glob(f"sub-*/ses-*/anat/*_desc-{method}_{RUN_SUFFIX}.json")))
    rows, names = [], set()
    for m in markers:
        rec = run_record(m)
        if rec is None or (chosen is not None and rec.get("Subject") not in chosen):
            continue
        rows.append(group_row(m, rec))
        names.add(rec["Name"])
    for c in expected:  # the dataset's collections without a row: say why
        if c.name not in names:
            why = ("incomplete output; run the participant level again"
                   if (c.folder(out) / f"{c.name}_desc-{method}_T1map.nii.gz").exists()
                   else f"not mapped with {method}; run the participant level")
            log(f"{c.name}: not in the table ({why})")
    if not rows:
        raise InputError(f"{out}: no complete {method} outputs; run the participant level first")
    rows.sort(key=lambda r: r["name"])
    path = out / f"group_desc-{method}_T1.tsv"
    side = path.with_suffix(".json")
    cols = list(GROUP_COLUMNS)
    text = "\t".join(cols) + "\n" + "".join("\t".join(_cell(r[c]) for c in cols) + "\n" for r in rows)
    meta = {c: ({"Description": d} | ({"Units": u} if u else {})) for c, (d, u) in GROUP_COLUMNS.items()}
    meta["qMRITissueClasses"] = CLASS_DEFINITION
    meta["GeneratedBy"] = {"Name": "qmri-diffusor", "Version": __version__, "Command": "qmri bids ... group"}
    meta_text = _json_text(meta, str(side))
    _write_files_atomically([(path, lambda t: t.write_text(text)), (side, lambda t: t.write_text(meta_text))], str(path))
    log(f"group level: {len(rows)} rows -> {path}")
    return path


__all__ = [
    "CLASS_DEFINITION",
    "RUN_SUFFIX",
    "Collection",
    "Outcome",
    "find_collections",
    "group_row",
    "map_collection",
    "participant_labels",
    "run_group_level",
    "run_participant_level",
    "run_record",
    "t1_classes",
]
