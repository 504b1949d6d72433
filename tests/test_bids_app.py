"""``qmri bids``: the BIDS App (participant and group levels, resuming, parallel participants)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_components.cli import _quote_labels, main
from custom_components.io import save_bids_irt1
from custom_components.mapping.bids_app import t1_classes
from custom_components.physics.protocol import paper_protocol
from custom_components.physics.signal_model import signal

ROOT = Path(__file__).resolve().parents[1]
# (participant, session) -> T1 (s) of the three regions: WM-, GM- and CSF-like at 3 T
TRUTH = {("01", None): (0.80, 1.30, 4.0), ("02", None): (0.85, 1.40, 3.6),
         ("03", "a"): (0.75, 1.25, 4.2), ("03", "b"): (0.90, 1.50, 3.8)}
REGIONS = (np.s_[2:14, 2:6], np.s_[2:14, 6:10], np.s_[2:14, 10:14])  # 48 voxels each; a signal-free border


def _images(t1s, seed):
    """16x16x1 IR images (paper protocol, B 1.95, PD 100, Rician noise of sigma 0.5: SNR 200)."""
    t1, pd = np.ones((16, 16)), np.zeros((16, 16))
    for region, value in zip(REGIONS, t1s):
        t1[region], pd[region] = value, 100.0
    img = signal(torch.tensor(np.stack([t1, pd, np.full((16, 16), 1.95)])), paper_protocol(), dim=0).numpy()
    rng = np.random.default_rng(seed)
    img = np.abs(img + 0.5 * rng.standard_normal(img.shape) + 0.5j * rng.standard_normal(img.shape))
    return img.transpose(1, 2, 0)[:, :, None, :]


def _dataset(root):
    """A raw BIDS dataset: sub-01 and sub-02 without sessions, sub-03 with sessions a and b."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    for i, ((sub, ses), t1s) in enumerate(TRUTH.items()):
        anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
        save_bids_irt1(anat, sub, _images(t1s, i), np.eye(4), paper_protocol())
        if ses:  # save_bids_irt1 names sub-<label>_inv-<n>_IRT1 only: add the session entity
            for f in anat.iterdir():
                f.rename(anat / f.name.replace(f"sub-{sub}_", f"sub-{sub}_ses-{ses}_"))
    return root


def _anat(out, sub, ses):
    return out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"


def _name(sub, ses):
    return f"sub-{sub}" + (f"_ses-{ses}" if ses else "")


def _t1(out, sub, ses):
    return nib.load(_anat(out, sub, ses) / f"{_name(sub, ses)}_desc-mle_T1map.nii.gz").get_fdata()[:, :, 0]


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_participant_level_resumes_runs_in_parallel_and_the_group_table(tmp_path, capsys):
    raw = _dataset(tmp_path / "raw")
    out = raw / "derivatives" / "qmri"
    assert main(["bids", str(raw), str(out), "participant"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split(":")[0] for x in lines[:4]] == [_name(*k) for k in TRUTH]
    assert all(": mapped (mle, 144 voxels" in x for x in lines[:4]) and "4 mapped, 0 skipped" in lines[4]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "qmri-diffusor"
    assert desc["DatasetLinks"] == {"raw": raw.resolve().as_uri()}
    assert "*_qmriRun.json" in (out / ".bidsignore").read_text().split()
    for (sub, ses), t1s in TRUTH.items():  # the maps against the truth: SNR 200
        t1 = _t1(out, sub, ses)
        for region, value in zip(REGIONS, t1s):
            assert np.median(t1[region]) == pytest.approx(value, rel=0.02)
        np.testing.assert_allclose(t1[REGIONS[0]], t1s[0], rtol=0.05)
        np.testing.assert_allclose(t1[REGIONS[1]], t1s[1], rtol=0.05)
        assert (t1[0] == 0).all()  # the signal-free border is not mapped
        side = json.loads((_anat(out, sub, ses) / f"{_name(sub, ses)}_desc-mle_T1map.json").read_text())
        assert side["Units"] == "s" and side["Sources"][0].startswith(f"bids:raw:sub-{sub}/")
    reference = {k: _t1(out, *k) for k in TRUTH}

    # a second run skips every complete output and touches no file
    before = _mtimes(out)
    assert main(["bids", str(raw), str(out), "participant", "--participant_label", "01", "sub-02", "03"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(": skipped (complete" in x for x in lines[:4]) and "0 mapped, 4 skipped" in lines[4]
    assert _mtimes(out) == before

    # killed runs: sub-01's new anat folder never renamed into place; sub-02's maps without their record
    # (one missing, a temporary file left); sub-03 ses-b's record listing a map that is gone: all three
    # are mapped again and cleaned up, sub-03 ses-a is skipped and untouched
    a01, a02, a3b = _anat(out, "01", None), _anat(out, "02", None), _anat(out, "03", "b")
    a01.rename(a01.with_name(".anat.tmp-0123456789ab"))
    (a02 / "sub-02_desc-mle_qmriRun.json").unlink()
    (a02 / "sub-02_desc-mle_PDmap.nii.gz").unlink()
    (a02 / ".tmp-0123456789ab-sub-02_desc-mle_InvEffmap.nii.gz").write_bytes(b"half")
    (a3b / "sub-03_ses-b_desc-mle_InvEffmap.nii.gz").unlink()
    before = _mtimes(out)
    assert main(["bids", str(raw), str(out), "participant"]) == 0
    status = dict(x.split(": ", 1) for x in capsys.readouterr().out.splitlines()[:4])
    assert [s.split()[0] for s in status.values()] == ["mapped", "mapped", "skipped", "mapped"]
    after = _mtimes(out)
    for p, t in before.items():
        assert p.parent in (a02, a3b) or p.parent.name.startswith(".anat.tmp-") or after[p] == t, p
    assert not a01.with_name(".anat.tmp-0123456789ab").exists() and (a01 / "sub-01_desc-mle_qmriRun.json").is_file()
    assert (a02 / "sub-02_desc-mle_PDmap.nii.gz").is_file() and (a02 / "sub-02_desc-mle_qmriRun.json").is_file()
    assert not list(a02.glob(".tmp-*")) and (a3b / "sub-03_ses-b_desc-mle_InvEffmap.nii.gz").is_file()
    for k in TRUTH:
        np.testing.assert_array_equal(_t1(out, *k), reference[k])

    # --n_jobs 2 (a process per participant, from the installed entry point): the same maps
    par = tmp_path / "parallel"
    run = subprocess.run([sys.executable, "-m", "custom_components.cli", "bids", str(raw), str(par), "participant",
                          "--n_jobs", "2"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert sorted(x.split(":")[0] for x in run.stdout.splitlines()[:4]) == sorted(_name(*k) for k in TRUTH)
    for k in TRUTH:
        for name in ("T1map", "PDmap", "InvEffmap", "Residualmap", "ResidualFlag"):
            f = f"{_name(*k)}_desc-mle_{name}.nii.gz"
            np.testing.assert_array_equal(nib.load(_anat(par, *k) / f).get_fdata(), nib.load(_anat(out, *k) / f).get_fdata())

    # group level: one row per participant and session, the classes' medians at the regions' T1
    assert main(["bids", str(raw), str(out), "group"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out / "group_desc-mle_T1.tsv"))
    head, *rows = [r.split("\t") for r in (out / "group_desc-mle_T1.tsv").read_text().splitlines()]
    table = {(r[head.index("participant_id")], r[head.index("session_id")]): dict(zip(head, r)) for r in rows}
    assert set(table) == {("sub-01", "n/a"), ("sub-02", "n/a"), ("sub-03", "ses-a"), ("sub-03", "ses-b")}
    for (sub, ses), t1s in TRUTH.items():
        row = table[(f"sub-{sub}", f"ses-{ses}" if ses else "n/a")]
        for cls, value in zip(("short", "mid", "long"), t1s):
            assert float(row[f"T1_{cls}_median_ms"]) == pytest.approx(1000 * value, rel=0.02)
            assert int(row[f"n_{cls}"]) + int(row["n_flagged"]) >= 47
        assert float(row["T1_median_ms"]) == pytest.approx(1000 * t1s[1], rel=0.03)
        assert row["method"] == "mle" and row["inversion_times_ms"] == "50,100,250,500,850,1500,2500"
        assert row["field_strength_T"] == "3" and row["source"] == (
            f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + f"anat/{_name(sub, ses)}_inv-*_IRT1.nii.gz")
        assert row["date"][:4].isdigit() and row["software_version"]
    meta = json.loads((out / "group_desc-mle_T1.json").read_text())
    assert meta["T1_short_median_ms"]["Units"] == "ms" and "3-class k-means" in meta["qMRITissueClasses"]
    # the group table of two participants only
    assert main(["bids", str(raw), str(out), "group", "--participant_label", "sub-01,03"]) == 0
    assert len((out / "group_desc-mle_T1.tsv").read_text().splitlines()) == 1 + 3


def test_bad_labels_failed_collections_and_changed_options(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    save_bids_irt1(raw / "sub-01" / "anat", "01", _images(TRUTH[("01", None)], 0)[:8, :8], np.eye(4), paper_protocol())
    save_bids_irt1(raw / "sub-02" / "anat", "02", _images(TRUTH[("01", None)], 1)[:8, :8], np.eye(4), paper_protocol())
    out = tmp_path / "out"
    # an unknown label: one line naming the participants there are, nothing written
    for level in ("participant", "group"):
        assert main(["bids", str(raw), str(out), level, "--participant_label", "01", "07"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "participant(s) 07; available: 01, 02" in err
    assert main(["bids", str(raw), str(out), "everyone"]) == 2
    assert "analysis_level must be participant or group" in capsys.readouterr().err
    assert not out.exists()
    # a collection that cannot be read fails with its reason; the others are mapped; exit status 2
    (raw / "sub-02" / "anat" / "sub-02_inv-3_IRT1.json").unlink()
    assert main(["bids", str(raw), str(out), "participant"]) == 2
    cap = capsys.readouterr()
    assert "sub-01: mapped" in cap.out and "sub-02: failed: " in cap.out and "missing sidecar" in cap.out
    assert "1 of 2 collections failed: sub-02" in cap.err
    # a complete output made with other options is neither kept silently nor replaced
    assert main(["bids", str(raw), str(out), "participant", "--participant_label", "01", "--sigma", "0.5"]) == 2
    assert "was made with" in capsys.readouterr().out
    # the group level needs complete outputs
    assert main(["bids", str(raw), str(tmp_path / "none"), "group"]) == 2
    assert "run the participant level first" in capsys.readouterr().err


def test_participant_label_flag_and_classes():
    assert _quote_labels(["bids", "r", "o", "participant", "--participant_label", "01", "sub-02", "--n_jobs", "2"]) == \
        ["bids", "r", "o", "participant", "--participant_label", "'01 sub-02'", "--n_jobs", "2"]
    assert _quote_labels(["bids", "--participant_label=1e3"]) == ["bids", "--participant_label='1e3'"]
    labels, bounds = t1_classes(np.r_[np.full(10, 800.0), np.full(20, 1300.0), np.full(5, 4000.0)])
    assert np.bincount(labels).tolist() == [10, 20, 5]
    np.testing.assert_allclose(bounds, [np.sqrt(800 * 1300), np.sqrt(1300 * 4000)])
