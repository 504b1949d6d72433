"""Accuracy of the default Diffusor against network evaluations per sample, with data-consistency on, on
the VALIDATION half of the robustness suite (issue 21, item 4; the test half is never looked at here).

For each sampler step count of --steps, the default `qmri map --method diffusor --steps k` (DPM-Solver++,
10 samples, the bundle's data-consistency) maps every validation scene; the classical fit maps them too.
Reported per step count: the determined 0.4-2 s plate spheres (CRLB/T1 <= 10 %) within the issue-20 bias
target, their mean / max |bias|, the median within-ROI std relative to the fit's, the mean |bias| over
every 0.4-2 s sphere, and seconds per scene. Nothing is chosen here: it is the measurement that a
few-step formulation (issue 21) has to beat.

    python scripts/steps_validation.py --out /tmp/steps.md [--plates 3 --brains 0 --steps 1,2,5,10,20]
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
    rows = target_sphere_rows(runs, key)
    every = [abs(x["bias_pct"]) for _, x, _ in rows]
    ratio = [x["std_s"] / f["std_s"] for _, x, f in rows]
    det = [(within_bias_target(x, sc.snr), abs(x["bias_pct"])) for sc, x, _ in rows if x["determined"]]
    nan = float("nan")
    return {"n_det": len(det), "n_meet": int(sum(ok for ok, _ in det)),
            "mean_det": float(np.mean([b for _, b in det])) if det else nan,
            "max_det": float(np.max([b for _, b in det])) if det else nan,
            "mean_all": float(np.mean(every)) if every else nan,
            "median_std_ratio": float(np.median(ratio)) if ratio else nan,
            "seconds": float(np.mean([r.results[key].seconds for r in runs if key in r.results]))}


def method_specs(steps: list[int]) -> list[MethodSpec]:
    """The classical fit, and the default Diffusor at each step count (the bundle's other settings)."""
    return [MethodSpec("mle", "classical fit (ML)", "mle")] + [
        MethodSpec(f"s{k}", f"Diffusor, {k} steps", "diffusor", {"steps": k}) for k in steps]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plates", type=int, default=3, help="validation plates 0..PLATES-1 (no brains)")
    ap.add_argument("--steps", default="1,2,5,10,20", help="sampler step counts, comma separated")
    ap.add_argument("--protocols", default="paper,nist15")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    t0 = time.perf_counter()
    steps = [int(k) for k in a.steps.split(",")]
    runs = validation_runs(method_specs(steps), a.plates, 0, a.protocols)
    fit = summarise(runs, "mle")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = ["# The default Diffusor against sampler steps (validation half only)", "",
          f"Command: `python scripts/steps_validation.py --out {a.out} --plates {a.plates} --steps {a.steps} "
          f"--protocols {a.protocols}`, {when}, {_cpu_name()}, {platform.machine()}, {torch.get_num_threads()} torch "
          f"threads; {(time.perf_counter() - t0) / 60:.1f} min. Scenes: validation plates 0-{a.plates - 1} of `qmri "
          f"robustness` (split seed {SPLIT_SEEDS['validation']}) in each protocol; inner ROIs; 10 samples, "
          "DPM-Solver++, data-consistency on (the bundle's defaults). Nothing was chosen on this run.", "",
          "| sampler steps (network evaluations per sample) | determined 0.4-2 s spheres within the bias target | "
          "their mean / max abs. bias (%) | mean abs. bias, every 0.4-2 s sphere (%) | median within-ROI std / fit's | "
          "s per scene |", "|---|---|---|---|---|---|",
          f"| classical fit | {fit['n_meet']} of {fit['n_det']} | {fit['mean_det']:.1f} / {fit['max_det']:.1f} | "
          f"{fit['mean_all']:.1f} | 1.00 | {fit['seconds']:.1f} |"]
    for k in steps:
        s = summarise(runs, f"s{k}")
        md.append(f"| {k} | {s['n_meet']} of {s['n_det']} | {s['mean_det']:.1f} / {s['max_det']:.1f} | {s['mean_all']:.1f} | "
                  f"{s['median_std_ratio']:.2f} | {s['seconds']:.1f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
