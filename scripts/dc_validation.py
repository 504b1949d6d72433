"""Choose the Diffusor's data-consistency strength and its ensemble-std calibration on the VALIDATION half
of the robustness suite only (custom_components.data.scenes; the test half is never looked at here).

For each setting of --strengths, a strength w or w:k with the CRLB bound k, the default Diffusor (`qmri map
--method diffusor --dc w --dc_crlb k`, the bundle's default sampler settings) maps every validation scene;
the classical fit maps them too. Rule (written before the run of 2026-12-05 09:20 UTC; the runs before it
counted every 0.4-2 s sphere, also those the protocol does not determine): among the settings, take the one
with the most 0.4-2 s plate spheres whose T1 the protocol determines (CRLB/T1 <= 10 %) that meet the
issue-20 targets (|bias| <= 2 % at SNR >= 30, <= 3 % at SNR 15-30, and a within-ROI std below the fit's);
ties go to the lower mean |bias| over those spheres. At the chosen setting, the calibration factor of
the ensemble std is fitted per weights file on the validation brains
(custom_components.reporting.robustness.calibration_factor) and written to
bundles/diffusor/models/std_calibration.json (data: numbers and names only).

    python scripts/dc_validation.py --out docs/dc_validation.md [--plates 6 --plate_indices 0,2,4,5 --brains 2 --strengths 0.2,0.2:2,0.2:4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from custom_components.data.scenes import SPLIT_SEEDS, robustness_scenes
from custom_components.reporting.comparison import MethodSpec, _cpu_name
from custom_components.reporting.robustness import (run_scene, std_calibration_entries, target_sphere_rows,
                                                    within_bias_target)

REPO = Path(__file__).resolve().parents[1]


def meets(sc, x, f) -> bool:
    """A sphere row ``x`` of scene ``sc`` meets the issue-20 targets (bias, and a std below the fit's row ``f``)."""
    return within_bias_target(x, sc.snr) and x["std_s"] < f["std_s"]


def summarise(runs, key):
    rows = target_sphere_rows(runs, key)
    ok = [meets(sc, x, f) for sc, x, f in rows]
    det = [(sc, x, f) for sc, x, f in rows if x["determined"]]
    bias_det = np.array([x["bias_pct"] for _, x, _ in det])
    bias = np.array([x["bias_pct"] for _, x, _ in rows])
    std_ratio = np.array([x["std_s"] / f["std_s"] for _, x, f in rows])
    tissue = {}
    for r in runs:
        if r.scene.kind == "brain" and key in r.rows:
            for row in r.rows[key]:
                tissue.setdefault(row["roi"], []).append(row["bias_pct"])
    short = [x["bias_pct"] for r in runs if r.scene.kind == "plate" and key in r.rows
             for x in r.rows[key] if x["band"] == "0.1-0.4 s" and x["determined"]]
    nan = float("nan")
    return {"n_spheres": len(rows), "n_meet": int(sum(ok)), "n_determined": len(det),
            "n_meet_determined": int(sum(meets(*t) for t in det)),
            "mean_abs_bias_determined_pct": float(np.mean(np.abs(bias_det))) if det else nan,
            "max_abs_bias_determined_pct": float(np.max(np.abs(bias_det))) if det else nan,
            "mean_abs_bias_pct": float(np.mean(np.abs(bias))) if rows else nan,
            "max_abs_bias_pct": float(np.max(np.abs(bias))) if rows else nan,
            "median_std_ratio": float(np.median(std_ratio)) if rows else nan,
            "short_mean_abs_bias_pct": float(np.mean(np.abs(short))) if short else float("nan"),
            "tissue_bias_pct": {k: float(np.mean(v)) for k, v in tissue.items()},
            "seconds_per_scene": float(np.mean([r.results[key].seconds for r in runs if key in r.results]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/dc_validation.md")
    ap.add_argument("--plates", type=int, default=4)
    ap.add_argument("--brains", type=int, default=2)
    ap.add_argument("--plate_indices", default=None, help="only these plates of the first --plates (comma separated)")
    ap.add_argument("--strengths", default="0,0.03,0.05,0.1")
    ap.add_argument("--calibration_out", default="bundles/diffusor/models/std_calibration.json")
    ap.add_argument("--weights", default=None, help="a weights file (with its card beside it) instead of the "
                    "bundle's choice per protocol; give --protocols to match")
    ap.add_argument("--protocols", default="paper,nist15")
    a = ap.parse_args()
    t0 = time.perf_counter()
    pairs = [tuple(float(v) for v in (x.split(":") + ["0"])[:2]) for x in a.strengths.split(",")]
    setting = {f"{w:g}" + (f":{k:g}" if k else ""): (w, k) for w, k in pairs}  # name -> (strength, CRLB factor)
    strengths = list(setting)
    specs = [MethodSpec("mle", "classical fit (ML)", "mle")]
    specs += [MethodSpec(f"dc{name}", f"Diffusor, dc {name}", "diffusor", {"dc": w, "dc_crlb": k})
              for name, (w, k) in setting.items()]
    if a.weights:
        specs = specs[:1] + [MethodSpec(s.key, s.label, s.method, {**s.options, "weights": a.weights}) for s in specs[1:]]
    scenes = robustness_scenes("validation", n_plates=a.plates, n_brains=a.brains,
                               protocols=tuple(a.protocols.split(",")))
    keep = None if a.plate_indices is None else {int(i) for i in a.plate_indices.split(",")}
    plates = [sc for sc in scenes if sc.kind == "plate" and (keep is None or sc.index in keep)]
    runs = [run_scene(sc, specs) for sc in plates]  # the choice: plates only (the rule is on their spheres)
    summ = {w: summarise(runs, f"dc{w}") for w in strengths}
    best = max(strengths, key=lambda w: (summ[w]["n_meet_determined"],
                                         -np.nan_to_num(summ[w]["mean_abs_bias_determined_pct"], nan=np.inf)))
    key = f"dc{best}"
    best_w, best_k = setting[best]
    # the brains: the fit and the chosen strength only (calibration and tissue bias)
    runs += [run_scene(sc, [specs[0]] + [s for s in specs if s.key == key]) for sc in scenes if sc.kind == "brain"]
    summ[best] = summarise(runs, key)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = (f"python scripts/dc_validation.py --out {a.out} --plates {a.plates} --brains {a.brains} "
           f"--strengths {a.strengths}" + (f" --plate_indices {a.plate_indices}" if a.plate_indices else "")
           + (f" --weights {a.weights}" if a.weights else "")
           + (f" --protocols {a.protocols}" if a.protocols != "paper,nist15" else ""))
    calib = std_calibration_entries(runs, key, cmd, date)  # per weights file, validation brains, chosen strength
    machine = f"{_cpu_name()}, {platform.machine()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
    md = ["# Choosing the Diffusor's data-consistency strength (validation half only)", "",
          f"Command: `{cmd}`, {date}, {machine}; {(time.perf_counter() - t0) / 60:.1f} min. Scenes: the validation "
          f"half of `qmri robustness` (split seed {SPLIT_SEEDS['validation']}): plates "
          f"{a.plate_indices or ', '.join(map(str, range(a.plates)))} for the choice, {a.brains} brains (mapped with the "
          "chosen strength only: tissue bias and calibration), each in the paper and nist15 protocols; the default "
          "Diffusor settings of the bundle, inner ROIs. The test half was not used.", "",
          "Rule, fixed before the run: the setting (strength w, or w:k with the CRLB bound k) with the most 0.4-2 s "
          "spheres whose T1 the protocol determines (CRLB/T1 <= 10 %) meeting the targets (|bias| <= 2 % at SNR >= 30, "
          "<= 3 % at 15-30, and a within-ROI std below the fit's); ties: the lower mean |bias| over those spheres.", "",
          "| setting | determined 0.4-2 s spheres meeting the targets | their mean / max abs. bias (%) | "
          "all 0.4-2 s spheres meeting the targets | their mean / max abs. bias (%) | median std / fit's std | "
          "0.1-0.4 s mean abs. bias where determined (%) | WM / GM / CSF / lesion bias (%) | s per scene |",
          "|---|---|---|---|---|---|---|---|---|"]
    for w in strengths:
        s = summ[w]
        tb = " / ".join(f"{s['tissue_bias_pct'].get(t, float('nan')):+.1f}" for t in ("WM", "GM", "CSF", "lesion"))
        md.append(f"| {w}{' (chosen)' if w == best else ''} | {s['n_meet_determined']} of {s['n_determined']} | "
                  f"{s['mean_abs_bias_determined_pct']:.1f} / {s['max_abs_bias_determined_pct']:.1f} | "
                  f"{s['n_meet']} of {s['n_spheres']} | "
                  f"{s['mean_abs_bias_pct']:.1f} / {s['max_abs_bias_pct']:.1f} | {s['median_std_ratio']:.2f} | "
                  f"{s['short_mean_abs_bias_pct']:.1f} | {tb} | {s['seconds_per_scene']:.0f} |")
    fit_rows = target_sphere_rows(runs, "mle")
    fit_ok = [(within_bias_target(x, sc.snr), x["determined"]) for sc, x, _ in fit_rows]
    md += ["", "Fit for reference: the classical fit meets the same bias targets on "
           f"{sum(o for o, d in fit_ok if d)} of {sum(d for _, d in fit_ok)} determined spheres and "
           f"{sum(o for o, _ in fit_ok)} of {len(fit_rows)} in all (its std is the reference).", "",
           "## Ensemble-std calibration at the chosen strength (validation brains)", "",
           "| weights | factor c | coverage 1 / 2 std before | after | Spearman(std, abs. error) | its ceiling for these stds |",
           "|---|---|---|---|---|---|"]
    for wfile, c in calib.items():
        b, af = c["before"], c["after"]
        md.append(f"| {wfile} | {c['factor']:.3f} | {100 * b['coverage_1']:.0f} / {100 * b['coverage_2']:.0f} % | "
                  f"{100 * af['coverage_1']:.0f} / {100 * af['coverage_2']:.0f} % | {b['spearman']:.2f} | {b['spearman_oracle']:.2f} |")
    md += ["", f"Written to `{a.calibration_out}`; "
           "`qmri map` multiplies the ensemble std by c when the run's settings are the ones it was fitted with."]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(md) + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps({"summary": {str(k): v for k, v in summ.items()}, "chosen": best,
                                                            "chosen_dc_strength": best_w, "chosen_dc_crlb_factor": best_k,
                                                            "calibration": calib}, indent=1))
    if calib:
        Path(a.calibration_out).write_text(json.dumps({"chosen_dc_strength": best_w, "chosen_dc_crlb_factor": best_k,
                                                       "weights": calib}, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
