"""Every entry of the bad-input catalogue (tests/bad_input_cases.py, tabulated in docs/bad_input.md):
one line of error, exit status 2, no output left behind, inputs untouched, no code from a file run."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_cases import CASES, INTERNAL_CASES, REPO, Evil, run_case  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_with_one_line(case, tmp_path):
    o = run_case(case, tmp_path / "case")
    assert o.code == 2, o
    assert o.stderr.startswith("qmri: error: ") and "\n" not in o.stderr, o.stderr
    assert case.expect in o.stderr, o.stderr
    assert o.new_files == [], o.new_files  # nothing half-written (and no empty output folder)
    assert o.inputs_unchanged
    assert not o.code_ran  # a planted pickle never runs


def test_bundle_inference_refuses_weights_with_hidden_code(tmp_path):
    """The bundle's own inference.json (MONAI CheckpointLoader) reads weights with weights_only=True too."""
    import torch

    torch.save({"conv.weight": Evil(str(tmp_path / "PWNED"))}, tmp_path / "evil.pt")
    from bad_input_cases import _nifti

    scan = _nifti(tmp_path)
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                        str(REPO / "bundles" / "resnet" / "configs" / "inference.json"), "--bundle_root",
                        str(REPO / "bundles" / "resnet"), "--ckpt_path", str(tmp_path / "evil.pt"), "--input_path",
                        str(scan), "--output_dir", str(tmp_path / "maps")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Weights only load failed" in r.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "maps" / "T1map.nii.gz").exists()


def test_the_catalogue_in_the_docs_is_current():
    """docs/bad_input.md lists every case of the catalogue (regenerate: python scripts/bad_input_catalogue.py)."""
    text = (REPO / "docs" / "bad_input.md").read_text()
    for case in CASES + INTERNAL_CASES:
        assert f"`{case.name}`" in text, case.name
