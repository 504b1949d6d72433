"""The `qmri` command line: the output contract, one-line errors, no partial output."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.cli import main
from custom_components.io import save_series
from custom_components.physics.protocol import paper_protocol
from custom_components.physics.signal_model import signal



def _series(tmp_path, t1=0.8, shape=(24, 24), sidecar=True, nan=False, zero_image=None):
    p = paper_protocol()
    maps = torch.zeros(3, *shape, dtype=torch.float64)
    maps[0], maps[1], maps[2] = t1, 0.0, 1.95
    maps[1, 4:-4, 4:-4] = 1.0
    img = signal(maps, p, dim=0).numpy()
    img = img + 0.01 * np.random.default_rng(0).rayleigh(size=img.shape)
    if nan:
        img[0, 0, 0] = np.nan
    if zero_image is not None:
        img[zero_image] = 0
    data = img.transpose(1, 2, 0)[:, :, None, :]
    path = tmp_path / "ir.nii.gz"
    if sidecar and not nan:
        save_series(path, data, np.eye(4), p)
    else:
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
    return path


def test_map_writes_the_contract(tmp_path, capsys):
    src = _series(tmp_path)
    out = tmp_path / "maps"
    assert main(["map", str(src), "--out", str(out), "--quiet"]) == 0
    for stem, unit in (("T1map", "s"), ("PDmap", None), ("InvEffmap", "1")):
        img = nib.load(out / f"{stem}.nii.gz")
        assert img.shape == (24, 24, 1)
        np.testing.assert_allclose(img.affine, np.eye(4))
        side = json.loads((out / f"{stem}.json").read_text())
        assert side["Method"] == "mle" and side["Protocol"]["InversionTime"][0] == pytest.approx(0.05)
        if unit:
            assert side["Units"] == unit
    t1 = nib.load(out / "T1map.nii.gz").get_fdata()[8:16, 8:16]
    assert np.median(t1) == pytest.approx(0.8, rel=0.02)
    b = nib.load(out / "InvEffmap.nii.gz").get_fdata()[8:16, 8:16]
    assert np.median(b) == pytest.approx(1.95, rel=0.02)


def test_map_with_tis_and_mask(tmp_path):
    src = _series(tmp_path, sidecar=False)
    mask = np.zeros((24, 24, 1), np.uint8)
    mask[10:14, 10:14] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii.gz")
    out = tmp_path / "m"
    tis = ",".join(str(t) for t in paper_protocol().inversion_times_s)
    assert main(["map", str(src), "--out", str(out), "--tis", tis, "--tr", "10", "--mask", str(tmp_path / "mask.nii.gz"), "--quiet"]) == 0
    t1 = nib.load(out / "T1map.nii.gz").get_fdata()
    assert np.all(t1[mask == 0] == 0) and np.all(t1[mask > 0] > 0)


@pytest.mark.parametrize("case,args,message", [
    ("missing", lambda t: ["map", str(t / "nope.nii.gz"), "--out", str(t / "o")], "no such"),
    ("no TIs", lambda t: ["map", str(_series(t, sidecar=False)), "--out", str(t / "o")], "InversionTime"),
    ("wrong TI count", lambda t: ["map", str(_series(t, sidecar=False)), "--out", str(t / "o"), "--tis", "0.1,0.2,0.3"], "7"),
    ("NaN", lambda t: ["map", str(_series(t, nan=True)), "--out", str(t / "o"), "--tis", ",".join(map(str, paper_protocol().inversion_times_s))], "NaN"),
    ("all-zero image", lambda t: ["map", str(_series(t, zero_image=3)), "--out", str(t / "o")], "zero"),
    ("unknown method", lambda t: ["map", str(_series(t)), "--out", str(t / "o"), "--method", "magic"], "unknown method"),
    ("bad mask shape", lambda t: (nib.save(nib.Nifti1Image(np.ones((5, 5, 1), np.uint8), np.eye(4)), t / "mk.nii.gz"),
                                  ["map", str(_series(t)), "--out", str(t / "o"), "--mask", str(t / "mk.nii.gz")])[1], "mask"),
])
def test_bad_input_one_line_error_and_no_output(tmp_path, capsys, case, args, message):
    rc = main(args(tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("qmri: error:") and "\n" not in err and message.lower() in err.lower()
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]  # no temporary folder left


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src = _series(tmp_path)
    out = tmp_path / "maps"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["map", str(src), "--out", str(out), "--quiet"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["map", str(src), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "keep.txt").exists() and (out / "T1map.nii.gz").exists()


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "custom_components.cli", "map", str(tmp_path / "x.nii"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "qmri: error" in r.stderr


def test_crlb_command(capsys):
    assert main(["crlb", "--protocol", "paper", "--t1", "1.0", "--snr", "50"]) == 0
    assert "| 1000 |" in capsys.readouterr().out


def test_phantom_then_map_then_report(tmp_path, capsys):
    """The twin written like scanner input round-trips through `qmri map` and the sphere report."""
    ph = tmp_path / "ph"
    assert main(["phantom", "--out", str(ph), "--snr", "100", "--matrix", "160", "--fov_mm", "180", "--echo_train", "False"]) == 0
    assert (ph / "series.nii.gz").exists() and (ph / "spheres.nii.gz").exists()
    out = tmp_path / "maps"
    assert main(["map", str(ph / "series.nii.gz"), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(out / "T1map.nii.gz"), "--field", "3", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert text.count("\n|") >= 14


@pytest.mark.parametrize("command", ["map", "phantom", "synthesize", "report", "compare", "crlb", "release", "pack",
                                     "unpack"])
def test_every_command_says_what_it_does(command, capfd):
    from custom_components.cli import QMRI, main

    assert main([command, "--help"]) == 0
    cap = capfd.readouterr()
    out = cap.out + cap.err  # python-fire writes help to stderr
    first = getattr(QMRI, command).__doc__.strip().splitlines()[0]
    assert first.split(":")[0][:40] in " ".join(out.split()) and ("FLAGS" in out or "POSITIONAL" in out)


def test_top_level_help_lists_the_commands(capfd):
    from custom_components.cli import main

    assert main(["--help"]) == 0
    cap = capfd.readouterr()
    out = cap.out + cap.err
    for command in ("map", "compare", "pack", "release", "unpack"):
        assert f"\n     {command}\n" in out
