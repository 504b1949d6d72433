"""Sharing bundles: complete metadata, versions that move with content, pack -> monai.bundle download ->
monai.bundle.load -> same maps, and unpacking that cannot write outside its target."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.cli import main
from custom_components.bundle.packaging import (HASH_KEY, BundleError, content_sha256, metadata_problems, pack_bundle,
                                         read_metadata, release, release_problems, unpack_bundle)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("diffusor", "resnet", "rim")


@pytest.mark.parametrize("name", BUNDLES)
def test_shipped_bundles_have_complete_metadata_and_current_versions(name):
    meta = read_metadata(REPO / "bundles" / name)
    assert metadata_problems(meta) == []
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] >= 1
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    # configs or weights changed without `qmri release`: this fails and says which command to run
    assert release_problems(REPO / "bundles" / name) == []


def test_metadata_problems_name_what_is_missing():
    meta = read_metadata(REPO / "bundles" / "resnet")
    assert metadata_problems(meta) == []
    bad = json.loads(json.dumps(meta))
    del bad["copyright"], bad["network_data_format"]["outputs"]["pred"]["dtype"]
    bad["version"] = "1.0"
    bad["network_data_format"]["inputs"]["image"]["channel_def"].pop("0")
    probs = "\n".join(metadata_problems(bad))
    for text in ("missing key 'copyright'", "pred has no 'dtype'", "'1.0' is not MAJOR.MINOR.PATCH",
                 "changelog has no entry for version '1.0'", "channel_def has"):
        assert text in probs, probs


def _copy_bundle(name, dst):
    root = dst / name
    for part in ("configs", "models", "docs"):
        shutil.copytree(REPO / "bundles" / name / part, root / part,
                        ignore=shutil.ignore_patterns("checkpoint_last*", "__pycache__"))
    shutil.copy(REPO / "bundles" / name / "LICENSE", root / "LICENSE")
    return root


def test_release_moves_the_version_with_the_content(tmp_path):
    root = _copy_bundle("resnet", tmp_path)
    old = read_metadata(root)["version"]
    (root / "configs" / "inference.json").write_text((root / "configs" / "inference.json").read_text() + "\n")
    assert any("changed since version" in p for p in release_problems(root))
    with pytest.raises(BundleError, match="not above"):
        release(root, old, "same version")
    with pytest.raises(BundleError, match="needs a changelog note"):
        release(root, "9.0.0", " ")
    meta = release(root, "9.0.0", "inference config touched")
    assert meta["version"] == "9.0.0" and list(meta["changelog"])[0] == "9.0.0" and old in meta["changelog"]
    assert meta[HASH_KEY] == content_sha256(root) and release_problems(root) == []
    torch.save({"w": torch.zeros(1)}, root / "models" / "extra.pt")  # new weights: stale again
    assert release_problems(root)
    with pytest.raises(BundleError, match="changed since version 9.0.0"):
        pack_bundle(root, tmp_path / "dist")
    assert not (tmp_path / "dist" / "resnet.zip").exists()


def _twin(path):
    from custom_components.io import save_series
    from custom_components.physics.protocol import get_protocol
    from custom_components.data.synthesis import Effects, nist_twin

    tw = nist_twin("paper", snr=50, effects=Effects(echo_train=False), matrix=(32, 32))
    save_series(path, tw["image"].transpose(1, 2, 0)[:, :, None, :], np.eye(4), get_protocol("paper"))
    return path


def test_pack_download_load_and_map_round_trip(tmp_path):
    """The shipped ResNet bundle: `qmri pack` -> `python -m monai.bundle download --url file://...` ->
    `monai.bundle.load` gives the same weights, and `qmri map --bundle` gives the same maps."""
    assert main(["pack", str(REPO / "bundles" / "resnet"), "--out", str(tmp_path / "dist")]) == 0
    z = tmp_path / "dist" / "resnet.zip"
    names = zipfile.ZipFile(z).namelist()
    assert all(n.startswith("resnet/") for n in names) and "resnet/configs/metadata.json" in names
    assert "resnet/models/model.pt" in names and not any("checkpoint_last" in n or "/eval/" in n for n in names)
    assert main(["pack", str(REPO / "bundles" / "resnet"), "--out", str(tmp_path / "dist")]) == 2  # no clobbering

    dl = tmp_path / "downloaded"
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "download", "--name", "resnet", "--url", z.resolve().as_uri(),
                        "--bundle_dir", str(dl)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (dl / "resnet" / "configs" / "inference.json").is_file()
    assert read_metadata(dl / "resnet")["version"] == read_metadata(REPO / "bundles" / "resnet")["version"]

    import monai.bundle

    net = monai.bundle.load(name="resnet", bundle_dir=str(dl), workflow_type="inference", device="cpu")
    shipped = torch.load(REPO / "bundles" / "resnet" / "models" / "model.pt", weights_only=True)
    assert isinstance(net, torch.nn.Module)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, shipped[k])

    twin = _twin(tmp_path / "twin.nii.gz")
    for bundle, out in ((REPO / "bundles" / "resnet", "a"), (dl / "resnet", "b")):
        assert main(["map", str(twin), "--out", str(tmp_path / out), "--method", "resnet", "--bundle", str(bundle),
                     "--quiet"]) == 0
    for stem in ("T1map", "PDmap", "InvEffmap"):
        np.testing.assert_array_equal(nib.load(tmp_path / "a" / f"{stem}.nii.gz").get_fdata(),
                                      nib.load(tmp_path / "b" / f"{stem}.nii.gz").get_fdata())


def _zip(path, entries):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("evil", ["../evil.txt", "b/../../evil.txt", "/tmp/evil_abs.txt", "other/evil.txt"])
def test_unpack_refuses_entries_outside_the_bundle_and_writes_nothing(tmp_path, evil, capsys):
    z = _zip(tmp_path / "b.zip", [("b/configs/metadata.json", "{}"), ("b/models/model.pt", b"x"), (evil, "pwned")])
    target = tmp_path / "deep" / "bundles"
    with pytest.raises(BundleError, match="unsafe path"):
        unpack_bundle(z, target)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert not Path("/tmp/evil_abs.txt").exists()
    assert not target.exists() or list(target.iterdir()) == []  # all or nothing: not even the good entries
    assert main(["unpack", str(z), "--bundle_dir", str(target)]) == 2
    assert "unsafe path" in capsys.readouterr().err


def test_unpack_refuses_symlinks_and_non_zips(tmp_path):
    z = tmp_path / "l.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("b/configs/metadata.json", "{}")
        info = zipfile.ZipInfo("b/models/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(BundleError, match="symbolic link"):
        unpack_bundle(z, tmp_path / "out")
    (tmp_path / "n.zip").write_bytes(b"not a zip at all")
    with pytest.raises(BundleError, match="not a zip"):
        unpack_bundle(tmp_path / "n.zip", tmp_path / "out")


def test_unpack_round_trip_and_no_clobbering(tmp_path):
    z = pack_bundle(REPO / "bundles" / "rim", tmp_path / "dist")
    root = unpack_bundle(z, tmp_path / "b")
    assert root == tmp_path / "b" / "rim"
    assert content_sha256(root) == content_sha256(REPO / "bundles" / "rim")
    with pytest.raises(BundleError, match="pass --overwrite"):
        unpack_bundle(z, tmp_path / "b")
    assert unpack_bundle(z, tmp_path / "b", overwrite=True) == root


def test_monai_download_refuses_a_path_traversal_entry(tmp_path):
    """`monai.bundle download` itself (MONAI's extractall) refuses a traversal entry."""
    z = _zip(tmp_path / "evil.zip", [("evil/configs/metadata.json", "{}"), ("evil/../../escaped.txt", "pwned")])
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "download", "--name", "evil", "--url", z.as_uri(),
                        "--bundle_dir", str(tmp_path / "dl" / "x")], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300, env={**os.environ})
    assert r.returncode != 0 and "Unsafe path" in r.stderr
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "dl" / "escaped.txt").exists()


@pytest.mark.parametrize("entries, message", [
    ([("b/models", "a file"), ("b/models/model.pt", "x")], "lies under a file"),
    ([("b/models/model.pt", "x"), ("b/models/model.pt", "y")], "repeated entry"),
    ([("b", "a file as the base folder")], "a file as the base folder"),
])
def test_unpack_refuses_conflicting_entries_with_one_line(tmp_path, entries, message, capsys):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        z = _zip(tmp_path / "b.zip", [("b/configs/metadata.json", "{}"), *entries])
    assert main(["unpack", str(z), "--bundle_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unpack_refuses_a_zip_bomb_before_writing(tmp_path, monkeypatch):
    import custom_components.bundle.packaging as packaging

    z = _zip(tmp_path / "b.zip", [("b/configs/metadata.json", "{}"), ("b/models/model.pt", b"\0" * 4096)])
    monkeypatch.setattr(packaging, "MAX_UNPACKED_BYTES", 1024)
    with pytest.raises(BundleError, match="would unpack to"):
        unpack_bundle(z, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_checkpoints_are_neither_hashed_nor_packed_and_outputs_are_readable(tmp_path):
    """A local training leaves checkpoint_last*.pt (and interrupted writes leave .tmp files) beside the
    weights: the release stays current and the zip does not carry them. What release/pack/unpack write
    has the mode of an ordinary file (tempfile alone would leave 0600 / 0700)."""
    import stat

    root = _copy_bundle("rim", tmp_path)
    before = content_sha256(root)
    (root / "models" / "checkpoint_last.pt").write_bytes(b"optimizer state")
    (root / "models" / "checkpoint_last_model_nist15.pt").write_bytes(b"optimizer state")
    (root / "models" / ".model.pt.abc.tmp").write_bytes(b"half written")
    assert content_sha256(root) == before and release_problems(root) == []
    z = pack_bundle(root, tmp_path / "dist")
    assert not any("checkpoint" in n or n.endswith(".tmp") for n in zipfile.ZipFile(z).namelist())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(z.stat().st_mode) == 0o666 & ~umask
    out = unpack_bundle(z, tmp_path / "shared")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    release(root, "9.0.0", "a test release", None)
    assert stat.S_IMODE((root / "configs" / "metadata.json").stat().st_mode) == 0o666 & ~umask


def test_unpack_refuses_weights_altered_after_release(tmp_path, capsys):
    """A zip whose weights no longer hash to the content hash its release recorded is not unpacked."""
    z = pack_bundle(REPO / "bundles" / "rim", tmp_path / "dist")
    altered = tmp_path / "altered.zip"
    with zipfile.ZipFile(z) as src, zipfile.ZipFile(altered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "rim/models/model.pt":
                data = data[:-1] + bytes([data[-1] ^ 1])  # one flipped bit
            dst.writestr(info, data)
    assert main(["unpack", str(altered), "--bundle_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "differ from those its version" in err and err.count("\n") == 1
    assert list((tmp_path / "b").iterdir()) == []
    assert unpack_bundle(z, tmp_path / "b") == tmp_path / "b" / "rim"  # the released zip itself unpacks
