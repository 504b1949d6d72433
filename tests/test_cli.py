"""The `qmri` command line: the output contract, one-line errors, no partial output."""

import json
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from custom_components.cli import main
from custom_components.io import save_series
from custom_components.physics.protocol import paper_protocol
from custom_components.physics.signal_model import signal, signed_signal



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
    ("bad fit device", lambda t: ["map", str(_series(t)), "--out", str(t / "o"), "--device", "gpu0"], "cpu, cuda or cuda:N"),
    pytest.param("fit on a missing GPU", lambda t: ["map", str(_series(t)), "--out", str(t / "o"), "--device", "cuda"],
                 "no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_bad_input_one_line_error_and_no_output(tmp_path, capsys, case, args, message):
    rc = main(args(tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("qmri: error:") and "\n" not in err and message.lower() in err.lower()
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]  # no temporary folder left


def test_a_volume_is_mapped_whole_with_its_affine(tmp_path):
    """A multi-slice series (24 x 24 x 5, an oblique affine) is mapped in one call: every slice gets the
    maps of its own T1 (a different T1 per slice, known answer within 1 %), and the maps keep the
    input's affine and its sform / qform codes."""
    p = paper_protocol()
    t1 = np.array([0.3, 0.6, 0.9, 1.2, 1.5])
    maps = torch.zeros(3, 24, 24, 5, dtype=torch.float64)
    maps[0] = torch.tensor(t1)
    maps[2] = 1.95
    maps[1, 4:-4, 4:-4] = 1.0  # an object in a signal-free background (the noise level comes from there)
    img = signal(maps, p, dim=0).numpy() + 0.002 * np.random.default_rng(1).rayleigh(size=(7, 24, 24, 5))
    affine = np.array([[0.9, 0.1, 0, -100], [-0.1, 0.9, 0, -120], [0, 0, 3.0, 20], [0, 0, 0, 1]])
    save_series(tmp_path / "vol.nii.gz", img.transpose(1, 2, 3, 0), affine, p)
    src = nib.load(tmp_path / "vol.nii.gz")  # registered to an anatomical image: sform code 2 (aligned)
    src.set_sform(affine, code=2)
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), affine, src.header), tmp_path / "vol.nii.gz")
    out = tmp_path / "maps"
    assert main(["map", str(tmp_path / "vol.nii.gz"), "--out", str(out), "--quiet"]) == 0
    nii = nib.load(out / "T1map.nii.gz")
    assert nii.shape == (24, 24, 5)
    np.testing.assert_allclose(nii.affine, affine, atol=1e-5)
    assert (int(nii.header["sform_code"]), int(nii.header["qform_code"])) == (2, 1)  # the input's header codes
    np.testing.assert_allclose(np.median(nii.get_fdata()[4:-4, 4:-4], axis=(0, 1)), t1, rtol=0.01)


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


def test_crlb_command_prints_the_bound_of_a_finite_difference_fisher_matrix(capsys):
    """Each cell of `qmri crlb` is sqrt((J^T J / sigma^2)^-1)_T1 with J by central differences of the
    signal (paper protocol, TR 10 s, PD 1, B 1.9), in ms and in % of T1, to the printed rounding."""
    t1s, snrs, b = (0.3, 1.0, 2.5), (20, 100), 1.9
    assert main(["crlb", "--protocol", "paper", "--t1", "0.3,1,2.5", "--snr", "20,100", "--b", str(b)]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if re.match(r"\| \d", r)]
    assert len(rows) == len(t1s)
    prot = paper_protocol()
    for t1, row in zip(t1s, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[0]) == pytest.approx(t1 * 1000)
        theta = np.array([t1, 1.0, b])
        jac = np.empty((prot.n_images, 3))
        for i in range(3):
            h = np.zeros(3)
            h[i] = 1e-6 * theta[i]
            jac[:, i] = (signed_signal(theta + h, prot, dim=0).numpy() - signed_signal(theta - h, prot, dim=0).numpy()) / (2 * h[i])
        for snr, cell in zip(snrs, cells[1:]):
            ms, pct = map(float, re.fullmatch(r"([\d.]+) \(([\d.]+)%\)", cell).groups())
            bound_ms = 1000 * np.sqrt(np.linalg.inv(jac.T @ jac * snr**2)[0, 0])
            assert ms == pytest.approx(bound_ms, abs=0.051)
            assert pct == pytest.approx(bound_ms / (10 * t1), abs=0.051)


# NIST/ISMRM system phantom, T1 plate, version 2, 3 T (shared/reference/facts.md), ms
NIST_T1_V2_3T_MS = [1883.97, 1330.16, 987.27, 690.08, 484.97, 341.58, 240.86, 174.95, 121.08, 85.75, 60.21, 42.89,
                    30.40, 21.44]


def _report_means(path):
    """Sphere number -> measured mean T1 (ms) from a `qmri report` table."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            out[int(cells[0])] = float(cells[2].split("±")[0])
    return out


def test_phantom_series_map_and_report_give_the_known_sphere_values(tmp_path, capsys):
    """Noiseless twin at full recovery (no echo-train blur): the series is the signal model of the
    true maps inside every sphere; `qmri report` of the true T1 map gives the published NIST values;
    `qmri map` of the series and then `qmri report` give them too (the fit is exact without noise)."""
    prot = paper_protocol().with_(repetition_time_s=None, name="full_recovery")
    (tmp_path / "p.json").write_text(json.dumps(prot.to_dict()))
    ph = tmp_path / "ph"
    assert main(["phantom", "--out", str(ph), "--protocol", str(tmp_path / "p.json"), "--snr", "none",
                 "--matrix", "160", "--fov_mm", "180", "--echo_train", "False"]) == 0
    series = nib.load(ph / "series.nii.gz").get_fdata()[:, :, 0]  # (x, y, TI)
    truth = np.stack([nib.load(ph / f"truth_{m}.nii.gz").get_fdata()[:, :, 0] for m in ("T1map", "PDmap", "InvEffmap")], -1)
    spheres = nib.load(ph / "spheres.nii.gz").get_fdata()[:, :, 0].astype(int)
    for k in range(1, 15):
        inner = ndimage.binary_erosion(spheres == k, iterations=2)  # away from partial-volume edges
        assert inner.sum() >= 10
        assert np.median(truth[inner, 0]) * 1000 == pytest.approx(NIST_T1_V2_3T_MS[k - 1], rel=1e-3)
        expected = signal(torch.tensor(truth[inner]), prot, dim=-1).numpy()
        np.testing.assert_allclose(series[inner], expected, rtol=1e-4, atol=1e-5)
    assert main(["report", str(ph / "truth_T1map.nii.gz"), "--field", "3", "--out", str(tmp_path / "truth.md")]) == 0
    got = _report_means(tmp_path / "truth.md")
    assert sorted(got) == list(range(1, 15))
    np.testing.assert_allclose([got[k] for k in range(1, 15)], NIST_T1_V2_3T_MS, rtol=1e-3, atol=0.06)
    out = tmp_path / "maps"
    assert main(["map", str(ph / "series.nii.gz"), "--out", str(out), "--quiet"]) == 0
    assert main(["report", str(out / "T1map.nii.gz"), "--field", "3", "--out", str(tmp_path / "fit.md")]) == 0
    got = _report_means(tmp_path / "fit.md")
    np.testing.assert_allclose([got[k] for k in range(1, 15)], NIST_T1_V2_3T_MS, rtol=5e-3)
    capsys.readouterr()
