"""BIDS in and out: an IRT1 collection from a BIDS dataset mapped into a BIDS derivatives dataset."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from custom_components import __version__
from custom_components.cli import main
from custom_components.io import InputError, bids_entities, save_bids_derivatives, save_bids_irt1
from custom_components.physics.protocol import nist_15t_protocol
from custom_components.physics.signal_model import signal


def _dataset(root):
    """A BIDS raw dataset with one IRT1 collection (1.5 T NIST protocol): T1 1 s (left) and 0.3 s (right)."""
    p = nist_15t_protocol()
    t1 = np.where(np.arange(8)[:, None, None] < 4, 1.0, 0.3) * np.ones((8, 6, 1))
    params = np.stack([t1, np.full_like(t1, 100.0), np.full_like(t1, 1.9)])
    sig = signal(params, p).numpy().transpose(1, 2, 3, 0)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.10.0"}))
    save_bids_irt1(root / "sub-07" / "anat", "07", sig, np.eye(4), p)
    return root / "sub-07" / "anat"


def test_bids_entities():
    assert bids_entities(["/d/sub-07_ses-a_inv-1_IRT1.nii.gz"]) == {"sub": "07", "ses": "a"}
    assert bids_entities(["/d/sub-x1/anat/sub-x1_inv-2_IRT1.nii.gz"]) == {"sub": "x1"}
    assert bids_entities(["/d/scan.nii.gz", "/d/subject-3.nii"]) == {}


def test_map_a_bids_irt1_collection_into_a_bids_derivatives_dataset(tmp_path, capsys):
    anat = _dataset(tmp_path / "raw")
    deriv = tmp_path / "raw" / "derivatives" / "qmri"
    assert main(["map", str(anat), "--out", str(deriv), "--bids", "--sigma", "1", "--quiet"]) == 0
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "qmri-diffusor" and desc["GeneratedBy"][0]["Version"] == __version__
    out = deriv / "sub-07" / "anat"
    t1 = nib.load(out / "sub-07_desc-mle_T1map.nii.gz").get_fdata()
    # noise-free data read as Rician (sigma 1): within 1 % of the truth
    np.testing.assert_allclose(t1[:4], 1.0, rtol=1e-2)
    np.testing.assert_allclose(t1[4:], 0.3, rtol=1e-2)
    side = json.loads((out / "sub-07_desc-mle_T1map.json").read_text())
    assert side["Units"] == "s" and side["Method"] == "mle" and side["Software"]["Version"] == __version__
    # provenance as BIDS URIs into the raw dataset, linked from the description
    assert desc["DatasetLinks"] == {"raw": (tmp_path / "raw").resolve().as_uri()}
    assert len(side["Sources"]) == 12 and "qMRISourceFiles" not in side
    assert all(s.startswith("bids:raw:sub-07/anat/sub-07_inv-") for s in side["Sources"])
    # the tool's own suffixes are declared to the BIDS validator
    assert set((deriv / ".bidsignore").read_text().split()) == {"*_InvEffmap.*", "*_Residualmap.*", "*_ResidualFlag.*"}
    for name in ("PDmap", "InvEffmap", "Residualmap", "ResidualFlag"):
        assert (out / f"sub-07_desc-mle_{name}.nii.gz").is_file() and (out / f"sub-07_desc-mle_{name}.json").is_file()
    # the same maps as the plain output
    assert main(["map", str(anat), "--out", str(tmp_path / "plain"), "--sigma", "1", "--quiet"]) == 0
    np.testing.assert_array_equal(nib.load(tmp_path / "plain" / "T1map.nii.gz").get_fdata(), t1)

    # a second method joins the same dataset; GeneratedBy records it once
    assert main(["map", str(anat), "--out", str(deriv), "--bids", "--method", "ls", "--quiet"]) == 0
    assert (out / "sub-07_desc-ls_T1map.nii.gz").is_file()
    assert [g["Description"].endswith("(ls)") for g in
            json.loads((deriv / "dataset_description.json").read_text())["GeneratedBy"]] == [False, True]
    # existing maps are not replaced without --overwrite; nothing is touched
    before = (out / "sub-07_desc-mle_T1map.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["map", str(anat), "--out", str(deriv), "--bids", "--sigma", "1", "--quiet"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "sub-07_desc-mle_T1map.nii.gz").stat().st_mtime_ns == before
    assert main(["map", str(anat), "--out", str(deriv), "--bids", "--sigma", "1", "--overwrite", "--quiet"]) == 0
    # a raw (non-derivative) dataset is never written into
    capsys.readouterr()
    assert main(["map", str(anat), "--out", str(tmp_path / "raw"), "--bids", "--quiet"]) == 2
    assert "not a BIDS derivatives dataset" in capsys.readouterr().err
    assert not (tmp_path / "raw" / "sub-07" / "anat" / "sub-07_desc-mle_T1map.nii.gz").exists()


def test_bids_output_of_a_plain_nifti_needs_a_subject(tmp_path, capsys):
    from custom_components.io import save_series

    p = nist_15t_protocol()
    params = np.stack([np.linspace(0.3, 1.5, 36).reshape(6, 6, 1), np.full((6, 6, 1), 50.0), np.full((6, 6, 1), 2.0)])
    save_series(tmp_path / "scan.nii.gz", signal(params, p).numpy().transpose(1, 2, 3, 0), np.eye(4), p)
    assert main(["map", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "d"), "--bids", "--sigma", "1",
                 "--quiet"]) == 2
    assert "--bids needs --subject" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main(["map", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "d"), "--bids", "--subject", "p1",
                 "--session", "2", "--sigma", "1", "--quiet"]) == 0
    assert (tmp_path / "d" / "sub-p1" / "ses-2" / "anat" / "sub-p1_ses-2_desc-mle_T1map.nii.gz").is_file()
    side = json.loads((tmp_path / "d" / "sub-p1" / "ses-2" / "anat" / "sub-p1_ses-2_desc-mle_T1map.json").read_text())
    # an input outside any BIDS dataset has no BIDS URI: its path is kept under the tool's own key
    assert "Sources" not in side and side["qMRISourceFiles"][0] == str(tmp_path / "scan.nii.gz")
    assert "DatasetLinks" not in json.loads((tmp_path / "d" / "dataset_description.json").read_text())
    with pytest.raises(InputError, match="letters and digits"):
        save_bids_derivatives(tmp_path / "e", {"T1map": np.ones((2, 2, 1))}, np.eye(4), {}, subject="a_b",
                              method="mle", version="1")


def test_bad_bids_labels_and_targets_fail_before_any_mapping(tmp_path, capsys, monkeypatch):
    import custom_components.mapping as mapping
    from custom_components.io import save_series

    def no_mapping(*a, **k):
        raise AssertionError("mapped although the BIDS target was refused")

    p = nist_15t_protocol()
    params = np.stack([np.linspace(0.3, 1.5, 36).reshape(6, 6, 1), np.full((6, 6, 1), 50.0), np.full((6, 6, 1), 2.0)])
    save_series(tmp_path / "scan.nii.gz", signal(params, p).numpy().transpose(1, 2, 3, 0), np.eye(4), p)
    monkeypatch.setattr(mapping, "map_series", no_mapping)
    assert main(["map", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "d"), "--bids", "--subject", "a_b",
                 "--quiet"]) == 2
    assert "subject label must be letters and digits" in capsys.readouterr().err and not (tmp_path / "d").exists()
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "raw"}')
    assert main(["map", str(tmp_path / "scan.nii.gz"), "--out", str(raw), "--bids", "--subject", "01", "--quiet"]) == 2
    assert "not a BIDS derivatives dataset" in capsys.readouterr().err and sorted(os.listdir(raw)) == ["dataset_description.json"]


def test_numeric_looking_labels_stay_verbatim(tmp_path):
    """fire reads '0x1F' as 31 and '1e3' as 1000.0; a BIDS label must reach the file name unchanged."""
    from custom_components.cli import _quote_labels
    from custom_components.io import save_series

    assert _quote_labels(["map", "x", "--subject", "0x1F", "--session=1e3", "--sigma", "1"]) == \
        ["map", "x", "--subject", "'0x1F'", "--session='1e3'", "--sigma", "1"]
    p = nist_15t_protocol()
    params = np.stack([np.linspace(0.3, 1.5, 36).reshape(6, 6, 1), np.full((6, 6, 1), 50.0), np.full((6, 6, 1), 2.0)])
    save_series(tmp_path / "scan.nii.gz", signal(params, p).numpy().transpose(1, 2, 3, 0), np.eye(4), p)
    assert main(["map", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "d"), "--bids", "--subject", "0x1F",
                 "--session=007", "--sigma", "1", "--quiet"]) == 0
    assert (tmp_path / "d" / "sub-0x1F" / "ses-007" / "anat" / "sub-0x1F_ses-007_desc-mle_T1map.nii.gz").is_file()
