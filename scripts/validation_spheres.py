"""Sphere by sphere on the VALIDATION half of the robustness suite: where T1 is determined (CRLB/T1 <= 10 %),
the bias and within-ROI std of the classical fit, the default Diffusor, the images-only Diffusor and the
Diffusor without data-consistency, side by side (inner ROIs). The test half is never looked at here.

    python scripts/validation_spheres.py --plates 0,2 --protocols paper
"""

from __future__ import annotations

import argparse

from custom_components.data.scenes import robustness_scenes
from custom_components.reporting.comparison import MethodSpec
from custom_components.reporting.robustness import run_scene

SPECS = [MethodSpec("mle", "fit", "mle"), MethodSpec("dc", "Diffusor", "diffusor", {}),
         MethodSpec("img", "images only", "diffusor", {"variant": "images"}),
         MethodSpec("nodc", "without DC", "diffusor", {"dc": 0})]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", default="0,2", help="validation plate indices (comma separated)")
    ap.add_argument("--protocols", default="paper")
    a = ap.parse_args()
    keep = {int(i) for i in a.plates.split(",")}
    scenes = [s for s in robustness_scenes("validation", n_plates=max(keep) + 1, n_brains=0,
                                           protocols=tuple(a.protocols.split(","))) if s.index in keep]
    print("| scene | SNR | sphere | band | CRLB/T1 (%) | " + " | ".join(f"{s.label}: bias (%) / std (ms)" for s in SPECS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(SPECS))
    for sc in scenes:
        r = run_scene(sc, SPECS, log=lambda *_: None)
        for i, row in enumerate(r.rows["mle"]):
            if not row["determined"] or row["band"] not in ("0.4-2 s", "0.1-0.4 s"):
                continue
            cells = [f"{r.rows[s.key][i]['bias_pct']:+.1f} / {1000 * r.rows[s.key][i]['std_s']:.1f}" if s.key in r.rows
                     else "-" for s in SPECS]
            print(f"| {sc.name} | {sc.snr:.1f} | {row['roi']} | {row['band']} | {row['crlb_pct']:.1f} | "
                  + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
