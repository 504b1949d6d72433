"""Sharing bundles: metadata checks, releases, packing into a zip that ``monai.bundle download`` accepts,
and safe unpacking.

A bundle is shared as ``<name>.zip`` holding one base folder ``<name>/`` with ``configs/``, ``models/``,
``docs/`` and ``LICENSE``: ``python -m monai.bundle download --name <name> --url file:///.../<name>.zip
--bundle_dir DIR`` extracts it to ``DIR/<name>`` and ``monai.bundle.load(name=<name>, bundle_dir=DIR)``
builds the network and loads ``models/model.pt`` with ``weights_only=True``, offline.

Versions move with content: :func:`content_sha256` hashes the configs (all but metadata.json) and
everything under ``models/`` (weights and their cards); :func:`release` bumps ``version``, adds the
changelog entry and records the hash as ``qmri_content_sha256``. :func:`release_problems` (and the test
suite) reports a bundle whose configs or weights changed since its last release, so the version cannot
silently stay behind. :func:`pack_bundle` refuses such a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from ..io import InputError

# The MONAI bundle specification (https://monai.readthedocs.io/en/stable/mb_specification.html):
# metadata.json keys it requires, and those it describes as optional that this project always fills.
REQUIRED_METADATA = ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                     "required_packages_version", "task", "description", "authors", "copyright",
                     "network_data_format")
DESCRIPTIVE_METADATA = ("schema", "name", "data_source", "data_type", "image_classes", "label_classes",
                        "pred_classes", "eval_metrics", "intended_use", "references", "supported_apps")
TENSOR_FORMAT_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range",
                      "is_patch_data", "channel_def")
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
LOOSE_VERSION_RE = re.compile(r"^\d+(\.\d+)*([a-z0-9.+-]*)$")
HASH_KEY = "qmri_content_sha256"
PACKED_TOP = ("configs", "models", "docs", "LICENSE")
EXCLUDED_NAMES = ("__pycache__", ".DS_Store")
MAX_UNPACKED_BYTES = 2 * 1024 ** 3  # a shared bundle's files, uncompressed (the compact bundles: a few MB)


def _excluded(rel: Path | PurePosixPath) -> bool:
    """Files that are never part of a bundle's content: caches, training checkpoints (optimizer state,
    written beside the weights by a local training), temporary files of interrupted writes."""
    name = rel.name
    return (any(part in EXCLUDED_NAMES for part in rel.parts) or name.startswith("checkpoint_last")
            or name.endswith(".tmp") or name.startswith("."))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by tempfile (mode 0600, folders 0700) the mode an ordinary write would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


class BundleError(InputError):
    """A bundle that cannot be released, packed or unpacked as asked (one line, for the CLI)."""


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def metadata_problems(meta: Mapping[str, Any]) -> list[str]:
    """Every way ``meta`` (a parsed metadata.json) falls short of the MONAI bundle specification, as
    short sentences; empty when it is complete. Checked offline (the schema URL is not fetched)."""
    problems = [f"missing key {k!r}" for k in REQUIRED_METADATA + DESCRIPTIVE_METADATA if k not in meta]
    version = meta.get("version")
    if version is not None and not (isinstance(version, str) and VERSION_RE.match(version)):
        problems.append(f"version {version!r} is not MAJOR.MINOR.PATCH")
    changelog = meta.get("changelog")
    if changelog is not None:
        if not isinstance(changelog, Mapping) or not changelog:
            problems.append("changelog must be a non-empty object {version: text}")
        elif version not in changelog:
            problems.append(f"changelog has no entry for version {version!r}")
        elif not all(isinstance(k, str) and VERSION_RE.match(k) and isinstance(v, str) and v.strip()
                     for k, v in changelog.items()):
            problems.append("changelog keys must be versions and values non-empty texts")
    for key in ("monai_version", "pytorch_version", "numpy_version"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, str) and LOOSE_VERSION_RE.match(v)):
            problems.append(f"{key} {v!r} is not a version")
    req = meta.get("required_packages_version")
    if req is not None and not (isinstance(req, Mapping) and all(isinstance(v, str) for v in req.values())):
        problems.append("required_packages_version must map package names to version strings")
    for key in ("task", "description", "authors", "copyright", "intended_use", "data_source"):
        if key in meta and not (isinstance(meta[key], str) and meta[key].strip()):
            problems.append(f"{key} must be a non-empty text")
    if "references" in meta and not (isinstance(meta["references"], list) and meta["references"]):
        problems.append("references must be a non-empty list")
    ndf = meta.get("network_data_format")
    if ndf is not None:
        for section, name in (("inputs", "image"), ("outputs", "pred")):
            tensor = ndf.get(section, {}).get(name) if isinstance(ndf, Mapping) else None
            if not isinstance(tensor, Mapping):
                problems.append(f"network_data_format.{section}.{name} is missing")
                continue
            for k in TENSOR_FORMAT_KEYS:
                if k not in tensor:
                    problems.append(f"network_data_format.{section}.{name} has no {k!r}")
            n = tensor.get("num_channels")
            cdef = tensor.get("channel_def")
            if isinstance(n, int) and isinstance(cdef, Mapping) and len(cdef) != n:
                problems.append(f"network_data_format.{section}.{name}: channel_def has {len(cdef)} entries "
                                f"for {n} channels")
            vr = tensor.get("value_range")
            if vr is not None and not (isinstance(vr, list) and len(vr) == 2 and vr[0] < vr[1]):
                problems.append(f"network_data_format.{section}.{name}: value_range must be [low, high]")
    return problems


def read_metadata(bundle_dir: str | os.PathLike) -> dict:
    path = Path(bundle_dir) / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: not a bundle (no configs/metadata.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable metadata ({e})") from None


def _content_files(bundle_dir: Path) -> list[Path]:
    files = [p for p in sorted((bundle_dir / "configs").glob("*")) if p.is_file() and p.name != "metadata.json"]
    if (bundle_dir / "models").is_dir():
        files += [p for p in sorted((bundle_dir / "models").rglob("*")) if p.is_file()
                  and not _excluded(p.relative_to(bundle_dir))]
    return files


def content_sha256(bundle_dir: str | os.PathLike) -> str:
    """SHA-256 over the relative paths and bytes of the configs (metadata.json excluded) and of every
    file under models/: what a version number stands for."""
    root = Path(bundle_dir)
    h = hashlib.sha256()
    for p in _content_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def release_problems(bundle_dir: str | os.PathLike) -> list[str]:
    """Metadata problems plus a stale release: configs or weights changed after the last release."""
    root = Path(bundle_dir)
    meta = read_metadata(root)
    problems = metadata_problems(meta)
    recorded = meta.get(HASH_KEY)
    if recorded is None:
        problems.append(f"no {HASH_KEY}: make a release with `qmri release {root} --version X.Y.Z --note ...`")
    elif recorded != content_sha256(root):
        problems.append(f"configs or weights changed since version {meta.get('version')}: bump it with "
                        f"`qmri release {root} --version X.Y.Z --note \"what changed\"`")
    return problems


def _write_json_atomic(path: Path, data: Mapping) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=4, ensure_ascii=False)
            f.write("\n")
        _public(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def release(bundle_dir: str | os.PathLike, version: str, note: str, versions: Mapping[str, str] | None = None) -> dict:
    """Record a new version: ``version`` must be above the current one; ``note`` goes first in the
    changelog; the content hash and (optionally) the monai/torch/numpy versions are updated.
    Returns the new metadata. Refuses (BundleError) before writing anything if the result would not
    pass :func:`metadata_problems`."""
    root = Path(bundle_dir)
    meta = read_metadata(root)
    if not (isinstance(version, str) and VERSION_RE.match(version)):
        raise BundleError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    old = meta.get("version", "0.0.0")
    if VERSION_RE.match(str(old)) and _version_tuple(version) <= _version_tuple(old):
        raise BundleError(f"version {version} is not above the current {old}")
    if not (isinstance(note, str) and note.strip()):
        raise BundleError("a release needs a changelog note (--note)")
    meta["version"] = version
    meta["changelog"] = {version: note.strip(), **{k: v for k, v in meta.get("changelog", {}).items() if k != version}}
    meta.update(dict(versions or {}))
    meta[HASH_KEY] = content_sha256(root)
    problems = metadata_problems(meta)
    if problems:
        raise BundleError(f"{root}: metadata would be incomplete: {'; '.join(problems)}")
    _write_json_atomic(root / "configs" / "metadata.json", meta)
    return meta


def installed_versions() -> dict[str, str]:
    """monai/torch/numpy versions of this environment, as metadata.json records them."""
    import monai
    import numpy
    import torch

    return {"monai_version": monai.__version__.split("+")[0], "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__}


def _packed_files(root: Path) -> list[Path]:
    files = []
    for top in PACKED_TOP:
        p = root / top
        if p.is_symlink():
            raise BundleError(f"{p}: symbolic links are not packed")
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            for q in sorted(p.rglob("*")):
                if _excluded(q.relative_to(root)):
                    continue
                if q.is_symlink():
                    raise BundleError(f"{q}: symbolic links are not packed")
                if q.is_file():
                    files.append(q)
    return files


def pack_bundle(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None,
                overwrite: bool = False) -> Path:
    """Write ``out_dir/<name>.zip`` (name: the bundle folder's name) with the base folder ``<name>/``.

    Only configs/, models/, docs/ and LICENSE travel (no eval outputs, caches or checkpoints). The
    bundle must pass :func:`release_problems`. The zip is written under a temporary name and renamed."""
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    name = name or root.name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise BundleError(f"bundle name {name!r}: letters, digits and _.- only")
    problems = release_problems(root)
    if problems:
        raise BundleError(f"{root}: not packed: {'; '.join(problems)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.zip"
    if target.exists() and not overwrite:
        raise BundleError(f"{target}: exists; pass --overwrite")
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".zip.tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for p in _packed_files(root):
                z.write(p, f"{name}/{p.relative_to(root).as_posix()}")
        _public(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _safe_member(info: zipfile.ZipInfo, base: str) -> PurePosixPath:
    """The member's path inside the base folder, or BundleError for anything that could land outside."""
    raw = info.filename
    if "\\" in raw or raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise BundleError(f"unsafe path in bundle zip: {raw!r}")
    path = PurePosixPath(raw)
    if ".." in path.parts or not path.parts or path.parts[0] != base:
        raise BundleError(f"unsafe path in bundle zip: {raw!r} (every entry must lie inside {base}/)")
    mode = (info.external_attr >> 16) & 0o170000
    if mode == 0o120000:
        raise BundleError(f"symbolic link in bundle zip: {raw!r}")
    return path


def unpack_bundle(zip_path: str | os.PathLike, bundle_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Extract a bundle zip into ``bundle_dir/<name>`` all or nothing: every entry is checked first
    (no absolute paths, no ``..``, no links, all inside the one base folder), then the files are
    written into a temporary folder that is renamed into place, but only if its configs and weights
    still hash to the ``qmri_content_sha256`` its release recorded (an integrity check against damage or
    edits after release, not a signature). Returns the bundle folder."""
    zp = Path(zip_path)
    try:
        z = zipfile.ZipFile(zp)
    except FileNotFoundError:
        raise BundleError(f"{zp}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"{zp}: not a zip file ({e})") from None
    with z:
        infos = z.infolist()
        if not infos:
            raise BundleError(f"{zp}: empty zip")
        base = PurePosixPath(infos[0].filename).parts[0] if PurePosixPath(infos[0].filename).parts else ""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", base) or base in (".", ".."):
            raise BundleError(f"{zp}: unsafe path in bundle zip: {infos[0].filename!r}")
        members = [(info, _safe_member(info, base)) for info in infos]
        if not any(p.parts[1:] == ("configs", "metadata.json") for _, p in members):
            raise BundleError(f"{zp}: not a bundle zip (no {base}/configs/metadata.json)")
        files = {p.parts[1:] for info, p in members if not info.is_dir() and len(p.parts) > 1}
        seen = set()
        for info, p in members:
            rel = p.parts[1:]
            if not info.is_dir() and (not rel or rel in seen):
                raise BundleError(f"{zp}: {'repeated' if rel else 'a file as the base folder'} entry in bundle zip: "
                                  f"{info.filename!r}")
            seen.add(rel)
            if any(rel[:k] in files for k in range(1, len(rel))):
                raise BundleError(f"{zp}: bundle zip entry {info.filename!r} lies under a file of the same zip")
        total = sum(info.file_size for info in infos)
        if total > MAX_UNPACKED_BYTES:
            raise BundleError(f"{zp}: bundle zip would unpack to {total / 1024 ** 3:.1f} GB, above the limit of "
                              f"{MAX_UNPACKED_BYTES / 1024 ** 3:.0f} GB")
        dest_root = Path(bundle_dir)
        dest_root.mkdir(parents=True, exist_ok=True)
        final = dest_root / base
        if final.exists() and any(final.iterdir()) and not overwrite:
            raise BundleError(f"{final}: exists and is not empty; pass --overwrite")
        tmp = Path(tempfile.mkdtemp(dir=dest_root, prefix=f".{base}."))
        try:
            for info, p in members:
                target = tmp.joinpath(*p.parts[1:])
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            recorded = read_metadata(tmp).get(HASH_KEY)
            if recorded is not None and recorded != content_sha256(tmp):
                raise BundleError(f"{zp}: configs or weights differ from those its version "
                                  f"{read_metadata(tmp).get('version')} was released with (damaged or altered); "
                                  "not unpacked")
            _public(tmp, directory=True)
            backup = None
            if final.exists():  # moved aside, not deleted, until the new bundle is in place
                backup = Path(tempfile.mkdtemp(dir=dest_root, prefix=f".{base}.old.")) / base
                os.replace(final, backup)
            try:
                os.replace(tmp, final)
            except BaseException:
                if backup is not None:
                    os.replace(backup, final)
                raise
            if backup is not None:
                shutil.rmtree(backup.parent, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


__all__ = ["BundleError", "REQUIRED_METADATA", "DESCRIPTIVE_METADATA", "HASH_KEY", "metadata_problems",
           "read_metadata", "content_sha256", "release_problems", "release", "installed_versions",
           "pack_bundle", "unpack_bundle"]
