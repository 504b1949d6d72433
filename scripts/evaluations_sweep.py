"""Accuracy against network evaluations per sample (issue 21 item 4), on crops of the VALIDATION half.

Each validation scene (plates 0..PLATES-1, brains 0..BRAINS-1, in every protocol of --protocols) is cropped to
SIZE x SIZE around the object's centre (:func:`custom_components.reporting.comparison.crop_case`) and mapped
with the classical fit, the TV fit and the given Diffusor weights at every number of DPM-Solver++ steps of
--steps, and with the full 1000-step DDPM, data consistency on (the bundle's strength), the scene's noise model
and sigma given. Scores on the inner ROIs inside the crop (at least 10 voxels): mean |bias| (%) over the ROIs
whose CRLB/T1 <= 10 % (determined), and the T1 NRMSE over the voxels of all ROIs. Nothing is chosen here: it
reports the curve.

    python scripts/evaluations_sweep.py --weights bundles/diffusor/models/model_crlb.pt --out docs/evaluations_sweep.md
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from custom_components.data.scenes import SPLIT_SEEDS, robustness_scenes
from custom_components.reporting.comparison import MethodSpec, _cpu_name, crop_case, run_method
from custom_components.reporting.robustness import determined, effective_sigma, roi_crlb, scene_case


def crop_scores(scene, sl, t1_map) -> tuple[list[float], float, float]:
    """|bias| % of the determined inner ROIs inside the crop, and the squared-error sums for the NRMSE."""
    sig = effective_sigma(scene.noise, scene.sigma, scene.n_coils)
    biases, num, den = [], 0.0, 0.0
    for roi in scene.rois.values():
        r = np.asarray(roi, bool)[sl]
        if r.sum() < 10:
            continue
        t = scene.truth[0][sl][r]
        p = np.asarray(t1_map)[r]
        num += float(np.sum((p - t) ** 2))
        den += float(np.sum(t * t))
        ref = float(t.mean())
        c = roi_crlb(ref, float(scene.truth[1][sl][r].mean()), float(scene.truth[2][sl][r].mean()), scene.protocol, sig)
        if determined(c):
            biases.append(abs(100.0 * (float(p.mean()) - ref) / ref))
    return biases, num, den


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plates", type=int, default=2)
    ap.add_argument("--brains", type=int, default=1)
    ap.add_argument("--protocols", default="paper,invivo9")
    ap.add_argument("--steps", default="1,2,5,10,20,50")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--no_ddpm", action="store_true", help="leave out the full 1000-step DDPM")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    steps = [int(k) for k in a.steps.split(",")]
    specs = [MethodSpec("mle", "classical fit (ML)", "mle"), MethodSpec("tv", "TV-regularised fit", "tv")]
    specs += [MethodSpec(f"k{k}", f"Diffusor, {k} DPM-Solver++ steps", "diffusor",
                         {"weights": a.weights, "steps": k, "samples": a.samples}) for k in steps]
    if not a.no_ddpm:
        specs.append(MethodSpec("ddpm", "Diffusor, full DDPM (1000 steps)", "diffusor",
                                {"weights": a.weights, "sampler": "ddpm", "samples": a.samples}))
    scenes = robustness_scenes("validation", n_plates=a.plates, n_brains=a.brains, protocols=tuple(a.protocols.split(",")))
    acc = {s.key: {"bias": [], "num": 0.0, "den": 0.0, "sec": [], "evals": None} for s in specs}
    for sc in scenes:
        case, sl = crop_case(scene_case(sc), a.size)
        for s in specs:
            spec = MethodSpec(s.key, s.label, s.method, {**s.options, "noise": sc.noise, "n_coils": int(sc.n_coils)})
            res = run_method(case, spec)
            b, num, den = crop_scores(sc, sl, res.maps["T1"])
            acc[s.key]["bias"] += b
            acc[s.key]["num"] += num
            acc[s.key]["den"] += den
            acc[s.key]["sec"].append(res.seconds)
            acc[s.key]["evals"] = res.info.get("network_evaluations_per_sample")
        print(sc.name, "done", flush=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = (f"python scripts/evaluations_sweep.py --weights {a.weights} --out {a.out} --plates {a.plates} --brains {a.brains} "
           f"--protocols {a.protocols} --steps {a.steps} --size {a.size} --samples {a.samples}" + (" --no_ddpm" if a.no_ddpm else ""))
    md = ["# Accuracy against network evaluations per sample (validation half, crops)", "",
          f"Command: `{cmd}`, {when}, {_cpu_name()}, {platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"{(time.perf_counter() - t0) / 60:.1f} min. Scenes: {len(scenes)} validation scenes (split seed "
          f"{SPLIT_SEEDS['validation']}), {a.size} x {a.size} crops around the object's centre; data consistency on; "
          "the scene's noise model and sigma given.", "",
          "| method | network evaluations per sample | determined inner ROIs | mean / max abs. bias (%) | T1 NRMSE (all ROIs) | s per crop |",
          "|---|---|---|---|---|---|"]
    for s in specs:
        r = acc[s.key]
        b = r["bias"]
        ev = "-" if r["evals"] is None else str(r["evals"])
        md.append(f"| {s.label} | {ev} | {len(b)} | "
                  + (f"{np.mean(b):.1f} / {np.max(b):.1f}" if b else "n/a") + " | "
                  + (f"{np.sqrt(r['num'] / r['den']):.3f}" if r["den"] else "n/a") + f" | {np.mean(r['sec']):.1f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
