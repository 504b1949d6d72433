"""What every mapping method returns and what ``qmri map`` writes: the output contract.

:class:`MappingResult` holds the maps (T1 in s, PD, B, and "<key>_std" for ensembles), the mask and
provenance; :data:`OUTPUT_MAPS` names each map's file, units and meaning; :func:`sidecars_for` and
:func:`output_arrays` turn a result into the files written by :func:`custom_components.io.save_maps`.
This module imports no method, so methods and the dispatcher can both depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from ..io import IRSeries, protocol_sidecar

# map key -> (file stem, units, description)
OUTPUT_MAPS = {
    "T1": ("T1map", "s", "longitudinal relaxation time T1"),
    "PD": ("PDmap", "a.u. (scanner intensity units)",
           "proton density PD of S_n = |PD (1 - B exp(-TI_n/T1) + (B - 1) exp(-Trec_n/T1))|, Trec_n = TR_n - readout "
           "(full recovery: no last term); corrected for TR, includes the T2 weighting at TE"),
    "B": ("InvEffmap", "1", "inversion efficiency B of the same model (Mz -> (1 - B) Mz at the inversion; 2 = ideal "
                            "inversion); corrected for TR: a property of the inversion pulse, not of the protocol"),
    "residual": ("Residualmap", "a.u. (scanner intensity units)",
                 "RMS over inversion times of |model| - data, the model above with the maps' own T1, PD and B"),
    "flag": ("ResidualFlag", "1", "1 where the maps do not explain the images: sum over TIs of ((data - E|S|)/sigma)^2 "
                                  "above the chi-square(N) quantile at 1 - alpha"),
}
FLAG_ALPHA = 1e-3  # false-alarm rate of the "flag" map (custom_components.mapping.consistency.residual_flag)


@dataclass
class MappingResult:
    maps: dict[str, np.ndarray]  # keys of OUTPUT_MAPS (and "<key>_std" for ensemble methods)
    mask: np.ndarray
    info: dict = field(default_factory=dict)


METHOD_DESCRIPTIONS = {
    "mle": "classical maximum-likelihood fit (Rician by default; noncentral chi with --noise ncchi --n_coils N)",
    "ls": "classical magnitude least-squares fit (polarity restoration x T1 grid + Gauss-Newton)",
    "tv": "classical maximum-likelihood fit with a total-variation prior on each slice (log T1, PD, B; strength --tv_weight)",
    "diffusor": "qMRI Diffusor: conditional DDPM, mean and voxel-wise std over an ensemble of samples",
    "resnet": "ResNet baseline: direct regression of the maps from the images",
    "rim": "recurrent inference machine: learned iterative updates from the likelihood gradient of the signal model",
}


def sidecars_for(result: MappingResult, series: IRSeries, method: str) -> dict[str, dict]:
    """JSON sidecars (units, method, protocol, provenance) for each written map."""
    common = {"Method": method, "MethodDescription": METHOD_DESCRIPTIONS.get(method, method),
              "Software": {"Name": "qmri-diffusor", "Version": __version__},
              "Source": str(series.source), "InputNotes": list(series.notes),
              "Protocol": protocol_sidecar(series.protocol),
              "Fit": {k: v for k, v in result.info.items() if isinstance(v, (str, int, float, list, bool, type(None)))}}
    if isinstance(result.info.get("weights"), dict):  # learned methods: file, sha256, card (mapping.learned.weights_record)
        common["Weights"] = result.info["weights"]
    for key, name in (("data_consistency", "DataConsistency"), ("std_calibration", "StdCalibration")):
        if isinstance(result.info.get(key), dict):  # the Diffusor's settings that are records, not single values
            common[name] = result.info[key]
    out = {}
    for key, arr in result.maps.items():
        base = key[:-4] if key.endswith("_std") else key
        stem, units, desc = OUTPUT_MAPS[base]
        name = stem + ("_std" if key.endswith("_std") else "")
        out[name] = {"Units": units, "Description": desc + (" (voxel-wise standard deviation over samples)" if key.endswith("_std") else ""), **common}
    return out


def output_arrays(result: MappingResult) -> dict[str, np.ndarray]:
    out = {}
    for key, arr in result.maps.items():
        base = key[:-4] if key.endswith("_std") else key
        out[OUTPUT_MAPS[base][0] + ("_std" if key.endswith("_std") else "")] = np.asarray(arr, dtype=np.float32)
    return out


__all__ = ["OUTPUT_MAPS", "FLAG_ALPHA", "METHOD_DESCRIPTIONS", "MappingResult", "sidecars_for", "output_arrays"]
