"""Choose the TV-regularised fit's default strength on the VALIDATION half of the robustness suite
(custom_components.data.scenes; the test half is never looked at here).

The TV fit (`qmri map --method tv --tv_weight w`, with the scene's noise model: Rician, or noncentral chi
of its coils) maps every validation scene for each w of --weights; the plain fit maps them too. Rule
(written before the first run, 2026-12-05 11:25 UTC): take the w with the most 0.4-2 s plate spheres whose
T1 the protocol determines (CRLB/T1 <= 10 %) within the issue-20 bias target (|bias| <= 2 % at SNR >= 30,
<= 3 % at SNR 15-30; inner ROIs); ties go to the lower mean T1 NRMSE over the determined brain-tissue ROIs.
The within-ROI std is reported, not used: lowering it is what the prior is for, its risk is bias.

    python scripts/tv_suite_validation.py --out /tmp/tv_suite.md [--plates 6 --brains 3 --weights 0.25,0.5,1,2]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from custom_components.data.scenes import SPLIT_SEEDS
from custom_components.reporting.comparison import MethodSpec, _cpu_name
from custom_components.reporting.robustness import target_sphere_rows, validation_runs, within_bias_target


def summarise(runs, key: str) -> dict:
    """Determined 0.4-2 s plate spheres within the bias target, their bias, the within-ROI std relative
    to the plain fit's, and the determined brain tissues' NRMSE, for method ``key``."""
    det = [(sc, x, f) for sc, x, f in target_sphere_rows(runs, key) if x["determined"]]
    spheres = [(within_bias_target(x, sc.snr), abs(x["bias_pct"])) for sc, x, _ in det]
    ratio = [x["std_s"] / f["std_s"] for _, x, f in det]
    tissue = {}
    for r in runs:
        if r.scene.kind == "brain" and key in r.rows:
            for x in r.rows[key]:
                if x["determined"]:
                    tissue.setdefault(x["roi"], []).append(x["nrmse"])
    nan = float("nan")
    return {"n_spheres": len(spheres), "n_meet": int(sum(ok for ok, _ in spheres)),
            "mean_abs_bias_pct": float(np.mean([b for _, b in spheres])) if spheres else nan,
            "max_abs_bias_pct": float(np.max([b for _, b in spheres])) if spheres else nan,
            "median_std_ratio": float(np.median(ratio)) if ratio else nan,
            "tissue_nrmse": {k: float(np.mean(v)) for k, v in tissue.items()},
            "mean_tissue_nrmse": float(np.mean([x for v in tissue.values() for x in v])) if tissue else nan,
            "seconds_per_scene": float(np.mean([r.results[key].seconds for r in runs if key in r.results]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plates", type=int, default=6)
    ap.add_argument("--brains", type=int, default=3)
    ap.add_argument("--weights", default="0.25,0.5,1,2")
    ap.add_argument("--protocols", default="paper,nist15")
    a = ap.parse_args()
    t0 = time.perf_counter()
    weights = [float(w) for w in a.weights.split(",")]
    specs = [MethodSpec("mle", "classical fit (ML)", "mle")]
    specs += [MethodSpec(f"tv{w:g}", f"TV fit, tv_weight {w:g}", "tv", {"tv_weight": w}) for w in weights]
    runs = validation_runs(specs, a.plates, a.brains, a.protocols)
    summ = {w: summarise(runs, f"tv{w:g}") for w in weights}
    fit = summarise(runs, "mle")
    best = max(weights, key=lambda w: (summ[w]["n_meet"], -np.nan_to_num(summ[w]["mean_tissue_nrmse"], nan=np.inf)))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tissues = sorted({k for s in [fit, *summ.values()] for k in s["tissue_nrmse"]})
    md = ["# Choosing the TV fit's default strength (validation half only)", "",
          f"Command: `python scripts/tv_suite_validation.py --out {a.out} --plates {a.plates} --brains {a.brains} "
          f"--weights {a.weights} --protocols {a.protocols}`, {when}, {_cpu_name()}, {platform.machine()}, "
          f"{torch.get_num_threads()} torch threads; {(time.perf_counter() - t0) / 60:.1f} min. Scenes: the validation half of "
          f"`qmri robustness` (split seed {SPLIT_SEEDS['validation']}), {a.plates} plates and {a.brains} brains in each "
          "protocol, each with its own noise model; inner ROIs. The test half was not used.", "",
          "Rule, fixed before the run: the most determined 0.4-2 s spheres within the issue-20 bias target; ties: the "
          "lower mean T1 NRMSE over the determined brain-tissue ROIs.", "",
          "| tv_weight | determined 0.4-2 s spheres within the bias target | their mean / max abs. bias (%) | "
          "median within-ROI std / plain fit's | " + "".join(f"{t} T1 NRMSE | " for t in tissues) + "s per scene |",
          "|---|---|---|---|" + "---|" * len(tissues) + "---|"]

    def row(name, s):
        cells = "".join(f"{s['tissue_nrmse'][t]:.3f} | " if t in s["tissue_nrmse"] else "- | " for t in tissues)
        return (f"| {name} | {s['n_meet']} of {s['n_spheres']} | {s['mean_abs_bias_pct']:.1f} / {s['max_abs_bias_pct']:.1f} | "
                f"{s['median_std_ratio']:.2f} | " + cells + f"{s['seconds_per_scene']:.1f} |")

    md.append(row("plain fit", fit))
    md += [row(f"{w:g}" + (" (chosen)" if w == best else ""), summ[w]) for w in weights]
    if not tissues:
        md += ["", "No brain-tissue ROI of these scenes is determined (CRLB/T1 <= 10 %): the tie-break has no data."]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
