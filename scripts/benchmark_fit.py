"""Speed and accuracy of the classical fit against a plain NumPy RD-NLS-PR (not a test: its numbers go in the docs).

    python scripts/benchmark_fit.py [--slices 4] [--threads 2] [--device cpu] [--out docs/benchmark_fit.md]

One set of voxels (--slices x 240 x 240; the paper's protocol, 7 TIs; T1 log-uniform in 0.05-4 s, PD
0.5-1, B 1.8-2; Rician noise at SNR 50), fitted four ways in one run: least squares and Rician ML, each by
the package's fit (custom_components.methods.fitting) and by the NumPy reference
(custom_components.methods.fitting_reference: the same grid of 96 T1 values, float64, scipy's Bessel
functions). Reports voxels per second, the speed ratio against the reference, and the T1 error against
the truth over 0.1-2 s (median, median absolute, 95th percentile absolute), so that speed is never
bought with accuracy.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", type=str, default="cpu")
    ap.add_argument("--out", type=str, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from custom_components.methods.fitting import InversionRecoveryModel
    from custom_components.methods.fitting_reference import reference_fit
    from custom_components.physics.image_formation import add_rician_noise
    from custom_components.physics.protocol import paper_protocol
    from custom_components.physics.signal_model import signal

    prot = paper_protocol()
    rng = np.random.default_rng(0)
    v = a.slices * 240 * 240
    sigma = 1 / 50
    t1 = np.exp(rng.uniform(np.log(0.05), np.log(4.0), v))
    pd = rng.uniform(0.5, 1.0, v)
    b = rng.uniform(1.8, 2.0, v)
    clean = signal(torch.tensor(np.stack([t1, pd, b], -1)), prot, dim=-1)
    y = add_rician_noise(clean, sigma, torch.Generator().manual_seed(0)).numpy()
    inrange = (t1 > 0.1) & (t1 < 2.0)
    model = InversionRecoveryModel(prot, device=a.device)
    model.fit(y[:2000], noise="rician", sigma=sigma)  # warm-up (first calls of the kernels)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()

    def timed(fn):
        t = time.perf_counter()
        t1_fit = fn()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return t1_fit, time.perf_counter() - t

    runs = [
        ("least squares", "NumPy reference", lambda: reference_fit(y, prot)["T1"]),
        ("least squares", "this package", lambda: model.fit(y).t1),
        ("Rician ML", "NumPy reference", lambda: reference_fit(y, prot, noise="rician", sigma=sigma)["T1"]),
        ("Rician ML", "this package", lambda: model.fit(y, noise="rician", sigma=sigma).t1),
    ]
    rows, ref_time = [], {}
    for fit_name, impl, fn in runs:
        t1_fit, dt = timed(fn)
        rel = np.abs(t1_fit / t1 - 1)[inrange] * 100
        signed = (t1_fit / t1 - 1)[inrange] * 100
        if impl == "NumPy reference":
            ref_time[fit_name] = dt
        ratio = ref_time[fit_name] / dt
        rows.append((fit_name, impl, dt, v / dt, ratio, np.median(signed), np.median(rel), np.quantile(rel, 0.95)))
        print(f"{fit_name:14s} {impl:16s} {dt:7.2f} s {v / dt:12,.0f} voxels/s  x{ratio:5.1f}", flush=True)
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    dev = a.device if not a.device.startswith("cuda") else f"{a.device} ({torch.cuda.get_device_name()})"
    lines = [f"Classical fit benchmark: {a.slices} slices of 240 x 240 = {v:,} voxels, paper protocol (7 TIs), Rician "
             f"SNR 50, every voxel fitted; device {dev}, {a.threads} torch threads; {machine}, {os.cpu_count()} CPUs; "
             f"torch {torch.__version__}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "| fit | implementation | seconds | voxels / s | speed vs the NumPy reference | median T1 error, 0.1-2 s (%) "
             "| median abs. T1 error (%) | 95th pct abs. T1 error (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:,.0f} | {r[4]:.1f}x | {r[5]:+.2f} | {r[6]:.2f} | {r[7]:.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        extra = f" --device {a.device}" if a.device != "cpu" else ""
        Path(a.out).write_text(text + "\n\nCommand: `python scripts/benchmark_fit.py " +
                               f"--slices {a.slices} --threads {a.threads}{extra} --out {a.out}`\n")


if __name__ == "__main__":
    main()
