"""Network evaluations, seconds per 240 x 240 slice and T1 accuracy of the Diffusor vs sampler steps.

    python scripts/benchmark_diffusor.py --bundle bundles/diffusor [--weights W] [--steps 5,10,20,40] \
        [--device cpu] [--threads 2] [--symmetry dihedral|flips|none] [--max_batch 40] [--out docs/x.md]

For the 10-sample ensemble on one slice of the digital NIST twin (paper protocol, SNR 50):
- the few-step sampler (DPM-Solver++(2M)) at each step count: measured seconds, network
  evaluations, and the T1 error in the spheres of 0.4-2 s;
- the full 1000-step DDPM (the paper): seconds = 1000 x the measured time of one batched network
  evaluation (10 samples, 240 x 240) -- running all 1000 steps on a CPU takes over an hour, so the
  time is measured per evaluation and multiplied, and the table says so.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--steps", default="5,10,20,40")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--symmetry", default=None, help="frames of the ensemble (default: the bundle's, dihedral)")
    ap.add_argument("--max_batch", type=int, default=None, help="samples per network call (default: the bundle's: 2 on a CPU, 40 on a GPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from custom_components.reporting.evaluation import locate_spheres, roi_statistics
    from custom_components.mapping.learned import DiffusorMapper
    from custom_components.data.synthesis import Effects, nist_twin

    tw = nist_twin("paper", snr=50, effects=Effects(noise="rician", echo_train=True), seed=0)
    ref = tw["reference"]["T1_s"]
    layout = locate_spheres(tw["image"], tw["pixel_spacing_mm"], t1_map=tw["label"][0], reference_t1_s=ref)
    inrange = [k for k in range(14) if 0.4 <= ref[k] <= 2.0]
    rows = []
    mapper = None
    for steps in [int(s) for s in a.steps.split(",")]:
        opts = {"n_samples": a.samples, "steps": steps, "sampler": "dpm++2m"}
        opts.update({k: v for k, v in (("symmetry", a.symmetry), ("max_batch", a.max_batch)) if v is not None})
        mapper = DiffusorMapper(a.bundle, a.weights, opts, a.device)
        mapper.map_slice(tw["image"][:, :16, :16])  # warm-up
        t = time.perf_counter()
        mean, std = mapper.map_slice(tw["image"])
        dt = time.perf_counter() - t
        st = roi_statistics(mean[0], layout)
        err = [abs(st[k]["mean"] / ref[k] - 1) * 100 for k in inrange]
        wstd = [st[k]["std"] / ref[k] * 100 for k in inrange]
        ens = roi_statistics(std[0], layout)
        estd = [ens[k]["mean"] / ref[k] * 100 for k in inrange]
        rows.append((f"DPM-Solver++(2M), {steps} steps", mapper.inferer.network_evaluations, f"{dt:.1f}",
                     f"{np.mean(err):.1f} / {np.max(err):.1f}", f"{np.mean(wstd):.1f}", f"{np.mean(estd):.1f}"))
    # one batched network evaluation of the ensemble on the whole slice
    from custom_components.methods.scaling import signal_scale

    img = torch.as_tensor(tw["image"], dtype=torch.float32)
    cond = (img / signal_scale(img))[None].repeat(a.samples, 1, 1, 1)
    if mapper.fit_condition:
        cond = torch.cat([cond, torch.zeros(a.samples, 3, *cond.shape[-2:])], dim=1)
    x = torch.randn(a.samples, 3, *cond.shape[-2:])
    net = mapper.network
    with torch.no_grad():
        net(torch.cat([x, cond], 1).to(a.device), timesteps=torch.full((a.samples,), 500, device=a.device))
        t = time.perf_counter()
        for _ in range(3):
            net(torch.cat([x, cond], 1).to(a.device), timesteps=torch.full((a.samples,), 500, device=a.device))
        per_eval = (time.perf_counter() - t) / 3
    rows.insert(0, ("full DDPM (the paper), 1000 steps", 1000, f"{1000 * per_eval:.0f} (1000 x {per_eval:.2f} s measured per evaluation)",
                    "not run", "", ""))
    lines = [f"Diffusor ensemble of {a.samples} samples on one 240 x 240 slice of the digital NIST twin (paper protocol, SNR 50); "
             f"{a.device}, {a.threads} threads, {platform.machine()}; {date.today()}; weights {a.weights or 'the default, chosen by the cards (qmri map)'}; "
             f"symmetry {mapper.inferer.symmetry}, {mapper.inferer.max_batch or 'all'} samples per network call.", "",
             "| sampler | network evaluations per sample | seconds per slice | T1 error in 0.4-2 s spheres, mean / max (%) | "
             "within-sphere T1 std (% of T1) | mean ensemble std (% of T1) |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines) + f"\n\nCommand: `python scripts/benchmark_diffusor.py --steps {a.steps} --samples {a.samples} --device {a.device} --threads {a.threads}" + \
        (f" --bundle {a.bundle}" if a.bundle else "") + (f" --weights {a.weights}" if a.weights else "") + \
        (f" --symmetry {a.symmetry}" if a.symmetry else "") + (f" --max_batch {a.max_batch}" if a.max_batch else "") + "`\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
