"""Speed and accuracy of the classical fit (not a test: its numbers go in the docs).

    python scripts/benchmark_fit.py [--slices 4] [--threads 2] [--out docs/benchmark_fit.md]

Times the fit of 240 x 240 slices (7 TIs, the paper's protocol, Rician noise at SNR 50, every voxel
fitted, random T1 log-uniform 0.05-4 s) for least squares and for Rician ML, and reports voxels per
second with the error against the truth.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=str, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from custom_components.methods.fitting import InversionRecoveryModel
    from custom_components.physics.image_formation import add_rician_noise
    from custom_components.physics.protocol import paper_protocol
    from custom_components.physics.signal_model import signal

    prot = paper_protocol()
    rng = np.random.default_rng(0)
    v = a.slices * 240 * 240
    t1 = np.exp(rng.uniform(np.log(0.05), np.log(4.0), v))
    pd = rng.uniform(0.5, 1.0, v)
    b = rng.uniform(1.8, 2.0, v)
    clean = signal(torch.tensor(np.stack([t1, pd, b], -1)), prot, dim=-1)
    y = add_rician_noise(clean, 1 / 50, torch.Generator().manual_seed(0)).numpy()
    model = InversionRecoveryModel(prot)
    model.fit(y[:2000])  # warm-up
    rows = []
    for name, kw in [("least squares", {}), ("Rician ML (15 MM iterations)", {"noise": "rician", "sigma": 1 / 50})]:
        t = time.perf_counter()
        fit = model.fit(y, **kw)
        dt = time.perf_counter() - t
        rel = fit.t1 / t1 - 1
        inrange = (t1 > 0.1) & (t1 < 2.0)
        rows.append((name, v, dt, v / dt, np.median(rel[inrange]) * 100, np.median(np.abs(rel[inrange])) * 100))
    lines = [f"Classical fit benchmark: {a.slices} slices of 240 x 240 = {v} voxels, paper protocol (7 TIs), "
             f"Rician SNR 50; {a.threads} torch threads; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs; {date.today()}", "",
             "| fit | voxels | seconds | voxels / s | median T1 error, 0.1-2 s (%) | median abs. T1 error, 0.1-2 s (%) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:,.0f} | {r[4]:+.2f} | {r[5]:.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n\nCommand: `python scripts/benchmark_fit.py " +
                               f"--slices {a.slices} --threads {a.threads}`\n")


if __name__ == "__main__":
    main()
