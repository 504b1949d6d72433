"""The Diffusor's ensemble-std calibration file (bundles/diffusor/models/std_calibration.json) is data:
numbers and names, applied only to runs with the settings it was fitted with."""

import json

import numpy as np
import pytest

from custom_components.io import InputError
from custom_components.mapping.learned import calibrate_std, std_calibration

RUN = {"n_samples": 10, "network_evaluations_per_sample": 20, "sampler": "dpm++2m", "symmetry": "dihedral",
       "data_consistency": {"strength": 0.05}}
ENTRY = {"factor": 1.7, "dc_strength": 0.05, "n_samples": 10, "network_evaluations_per_sample": 20,
         "sampler": "dpm++2m", "symmetry": "dihedral", "fitted_on": "validation half"}


def _write(tmp_path, table):
    (tmp_path / "std_calibration.json").write_text(json.dumps(table))
    return tmp_path / "model_x.pt"


def test_matching_settings_scale_every_std_map(tmp_path):
    w = _write(tmp_path, {"weights": {"model_x.pt": ENTRY}})
    maps = {"T1": np.ones((2, 2)), "T1_std": np.full((2, 2), 0.1), "B_std": np.full((2, 2), 0.2)}
    info = dict(RUN)
    calibrate_std(maps, w, info)
    assert np.allclose(maps["T1_std"], 0.17) and np.allclose(maps["B_std"], 0.34) and np.allclose(maps["T1"], 1.0)
    assert info["std_calibration"]["factor"] == 1.7


@pytest.mark.parametrize("change", [{"n_samples": 4}, {"data_consistency": {"strength": 0.0}}, {"symmetry": "none"}])
def test_other_settings_or_weights_leave_the_std_alone(tmp_path, change):
    w = _write(tmp_path, {"weights": {"model_x.pt": ENTRY}})
    factor, rec = std_calibration(w, {**RUN, **change})
    assert factor == 1.0 and "uncalibrated" in rec["note"]
    assert std_calibration(tmp_path / "model_y.pt", RUN)[0] == 1.0
    assert std_calibration(tmp_path / "sub" / "model_x.pt", RUN)[1]["note"].startswith("uncalibrated: no")


@pytest.mark.parametrize("bad", ["$__import__('os').system('touch PWNED')", -1.0, float("nan"), True, None])
def test_a_factor_that_is_not_a_positive_number_is_refused(tmp_path, bad):
    w = _write(tmp_path, {"weights": {"model_x.pt": {**ENTRY, "factor": bad}}})
    with pytest.raises(InputError, match="positive number"):
        std_calibration(w, RUN)
    assert not (tmp_path / "PWNED").exists()
