"""Sphere table of a mapping method on the digital NIST twin (the paper's Table 1, digital).

    python scripts/evaluate_twin.py --method diffusor --bundle bundles/diffusor [--weights W] \
        [--samples 10] [--steps 20] [--sampler dpm++2m] [--symmetry dihedral] [--snr 50] [--seeds 1] [--out docs/x.md] \
        [--decompose] [--vary_sampler_seed] [--no_echo_train]
    python scripts/evaluate_twin.py --method resnet|rim [--bundle bundles/<method>] [--weights W]
    python scripts/evaluate_twin.py --method mle

The twin: T1 plate (version 2, 3 T reference), the paper's IR-FSE protocol (7 TIs, TR 10 s, ETL 64,
echo-train blurring on), Rician noise at the given SNR, smooth B in 1.8-2.0, 240 x 240 over 250 mm.
Spheres are located from the images; ROIs are 0.6 x the sphere radius. For the Diffusor the table
also gives the mean voxel-wise ensemble std in each ROI, and for every method the classical fit's
within-sphere std for comparison. ``--decompose`` (with ``--seeds`` >= 2) adds a table that splits
the within-sphere std into noise (what changes between noise realisations) and a spatial pattern
(what does not), for the method and for the fit; ``--no_echo_train`` leaves the blurring out
(a diagnostic).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np


def run(method: str, seeds: int, snr: float, protocol: str = "paper", echo_train: bool = True,
        vary_sampler_seed: bool = False, **kw):
    from custom_components.reporting.comparison import twin_case
    from custom_components.reporting.evaluation import locate_spheres, roi_statistics
    from custom_components.mapping import map_series

    per_seed = []
    times = []
    t1_maps = []
    for seed in range(seeds):
        case = twin_case(snr, seed=seed, protocol=protocol, echo_train=echo_train)
        t = time.perf_counter()
        opts = dict(kw, seed=seed) if vary_sampler_seed else kw
        res = map_series(case.series(), method=method, mask=case.mask[:, :, None], progress=False, **opts)
        times.append(time.perf_counter() - t)
        ref = case.extra["reference"]
        layout = locate_spheres(case.images, case.pixel_spacing_mm, t1_map=case.extra["spheres_truth"], reference_t1_s=ref)
        stats = {"T1": roi_statistics(res.maps["T1"][:, :, 0], layout)}
        if "T1_std" in res.maps:
            stats["T1_std"] = roi_statistics(res.maps["T1_std"][:, :, 0], layout)
        per_seed.append(stats)
        t1_maps.append(res.maps["T1"][:, :, 0])
        if seed == 0:
            layout0 = layout
    # the T1 maps of all realisations and the first one's layout (the geometry is the same in every one)
    return per_seed, ref, times, res.info, (np.stack(t1_maps), layout0)


def decomposition_table(method_maps, fit_maps, layout, ref, label) -> str:
    """Within-sphere std split into noise (changes between realisations) and a spatial pattern
    (the same in every realisation) for the method and the classical fit."""
    from custom_components.reporting.evaluation import roi_std_decomposition

    dm, df = roi_std_decomposition(method_maps, layout), roi_std_decomposition(fit_maps, layout)
    lines = [f"Within-sphere T1 std (ms) split over {method_maps.shape[0]} noise realisations "
             "(`custom_components.reporting.evaluation.roi_std_decomposition`): noise = the part that changes between "
             "realisations within the ROI, pattern = the part that does not (a bias varying over the ROI), "
             "shift = the std over realisations of the ROI mean (not part of the within-sphere std).", "",
             f"| sphere | reference T1 (ms) | {label}: total / noise / pattern / shift | classical fit: total / noise / pattern / shift |",
             "|---:|---:|---|---|"]
    for k in range(14):
        cells = [" / ".join(f"{r[q] * 1e3:.1f}" for q in ("total", "noise", "pattern", "mean_std")) for r in (dm[k], df[k])]
        row = [f"{k + 1}", f"{ref[k] * 1000:.1f}", *cells]
        if 0.4 <= ref[k] <= 2.0:
            row = [f"**{c}**" for c in row]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def table(per_seed, ref, title, baseline=None):
    lines = [f"### {title}", "",
             "| sphere | reference T1 (ms) | mean ± within-sphere std (ms) | error (%) |"
             + (" mean ensemble std (ms) |" if "T1_std" in per_seed[0] else "")
             + (" classical fit within-sphere std (ms) |" if baseline is not None else ""),
             "|---:|---:|---:|---:|" + ("---:|" if "T1_std" in per_seed[0] else "") + ("---:|" if baseline is not None else "")]
    errs = []
    for k in range(14):
        mean = np.mean([s["T1"][k]["mean"] for s in per_seed])
        std = np.mean([s["T1"][k]["std"] for s in per_seed])
        err = 100 * (mean - ref[k]) / ref[k]
        bold = 0.4 <= ref[k] <= 2.0
        if bold:
            errs.append(abs(err))
        row = [f"{k + 1}", f"{ref[k] * 1000:.1f}", f"{mean * 1000:.1f} ± {std * 1000:.1f}", f"{err:+.1f}"]
        if "T1_std" in per_seed[0]:
            row.append(f"{np.mean([s['T1_std'][k]['mean'] for s in per_seed]) * 1000:.1f}")
        if baseline is not None:
            row.append(f"{np.mean([s['T1'][k]['std'] for s in baseline]) * 1000:.1f}")
        if bold:
            row = [f"**{c}**" for c in row]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Spheres with reference T1 in 0.4-2 s (bold): mean |error| {np.mean(errs):.1f} %, max |error| {np.max(errs):.1f} %."]
    return "\n".join(lines), float(np.max(errs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="diffusor")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--symmetry", default=None, help="diffusor: frames of the ensemble (default: the bundle's, dihedral)")
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--protocol", default="paper", help="protocol preset of the twin (a learned model other than the RIM maps only its own)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--no_echo_train", action="store_true",
                    help="leave out the echo-train T2 blurring (a diagnostic; the twin of the docs has it)")
    ap.add_argument("--vary_sampler_seed", action="store_true",
                    help="diffusor: draw the ensemble's initial noise with the realisation's seed (default: seed 0 "
                         "for all, so the ensemble's sampling noise is the same in every realisation)")
    ap.add_argument("--decompose", action="store_true",
                    help="also split the within-sphere std into noise and a fixed spatial pattern (needs --seeds >= 2)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.decompose and a.seeds < 2:
        ap.error("--decompose needs --seeds 2 or more (the noise part is the variation between realisations)")
    kw = {}
    if a.method == "diffusor":
        kw = dict(bundle_dir=a.bundle, weights=a.weights, samples=a.samples, steps=a.steps, sampler=a.sampler,
                  symmetry=a.symmetry)
    elif a.method in ("resnet", "rim"):
        kw = dict(bundle_dir=a.bundle, weights=a.weights)
    et = not a.no_echo_train
    base, ref, _, _, (fit_maps, _) = run("mle", a.seeds, a.snr, a.protocol, echo_train=et)
    per_seed, ref, times, info, (method_maps, layout0) = run(a.method, a.seeds, a.snr, a.protocol, echo_train=et,
                                                             vary_sampler_seed=a.vary_sampler_seed, **kw)
    desc = ", ".join(f"{k} {v}" for k, v in info.items()
                     if k in ("n_samples", "sampler", "network_evaluations_per_sample", "fit_condition", "symmetry", "n_steps",
                              "likelihood"))
    title = (f"{a.method} on the digital NIST twin, {a.protocol} protocol, SNR {a.snr:g}, {'echo-train blurring' if et else 'no echo-train blurring'}, {a.seeds} noise realisation(s)"
             + (f" ({desc}; weights {a.weights or 'the default, chosen by the cards (qmri map)'})" if desc else ""))
    text, worst = table(per_seed, ref, title, baseline=base if a.method != "mle" else None)
    if a.decompose:
        text += "\n\n" + decomposition_table(method_maps, fit_maps, layout0, ref, a.method)
    cmd = "python scripts/evaluate_twin.py " + " ".join(
        (f"--{k}" if v is True else f"--{k} {v}") for k, v in vars(a).items() if v not in (None, False) and k != "out")
    text += (f"\n\nMade by `{cmd}` on {date.today()}, {platform.machine()} CPU ({time.strftime('%H:%M')}); "
             f"mapping took {np.mean(times):.1f} s per 240 x 240 slice.\n")
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
