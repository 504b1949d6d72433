"""Time the Diffusor's data-consistency step and compare its output with another commit's.

One call of :class:`custom_components.methods.data_consistency.DataConsistency` (Rician, strength 0.2) on
synthetic voxels: 2 members x 192 x 192 (the CPU batch of the samplers) whose network estimate of T1 is
10 % high, with and without the polarity rounds. With ``--reference REV`` the module of commit REV
(``git show REV:custom_components/methods/data_consistency.py``) maps 40,000 random voxels of each protocol
(T1 0.05-2.05 s, the network 30 % off on average) beside the current one, and the largest difference is
printed (float32, as in the samplers, and float64): 0 means the two steps give the same maps.

    python scripts/benchmark_dc.py [--threads 2] [--reference 192280a]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from custom_components.methods.data_consistency import DataConsistency
from custom_components.methods.scaling import encode_maps
from custom_components.physics.protocol import get_protocol

REPO = Path(__file__).resolve().parents[1]


def _images(t1, pd, b, tis, gen, sigma=0.02):
    clean = (pd[..., None] * (1 - b[..., None] * torch.exp(-tis / t1[..., None]))).abs()
    return clean + sigma * torch.rand(clean.shape, generator=gen)


def time_call(rounds: int, repeats: int = 10) -> float:
    """Seconds per call on 2 x 192 x 192 voxels (paper protocol)."""
    p = get_protocol("paper")
    gen = torch.Generator().manual_seed(0)
    t1 = torch.rand(2, 192, 192, generator=gen) * 2 + 0.2
    pd = torch.rand(2, 192, 192, generator=gen) * 0.5 + 0.5
    b = torch.full((2, 192, 192), 1.9)
    img = _images(t1, pd, b, torch.tensor(p.tis, dtype=torch.float32), gen).permute(0, 3, 1, 2)
    x0 = torch.stack([encode_maps(torch.stack([t1[i] * 1.1, pd[i], b[i]]), 1.0) for i in range(2)])
    dc = DataConsistency(p, 0.2, polarity_rounds=rounds)
    dc(x0, img, 0.02)
    t = time.perf_counter()
    for _ in range(repeats):
        dc(x0, img, 0.02)
    return (time.perf_counter() - t) / repeats


def compare_with(rev: str) -> None:
    source = subprocess.run(["git", "show", f"{rev}:custom_components/methods/data_consistency.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data_consistency.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("custom_components.methods._dc_reference", path)
        ref = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = ref
        spec.loader.exec_module(ref)  # relative imports resolve in custom_components.methods
    for name in ("paper", "nist15"):
        p = get_protocol(name)
        gen = torch.Generator().manual_seed(1)
        n = 40000
        t1 = torch.rand(n, generator=gen) * 2 + 0.05
        pd = torch.rand(n, generator=gen) * 0.5 + 0.5
        b = 1.5 + 0.5 * torch.rand(n, generator=gen)
        y = _images(t1, pd, b, torch.tensor(p.tis, dtype=torch.float32), gen)
        q0 = torch.stack([pd, pd * b, torch.log(t1 * (1 + 0.3 * torch.randn(n, generator=gen)).clamp(0.3, 3))], 1)
        sig = torch.full((n,), 0.02)
        for dtype in (torch.float32, torch.float64):
            args = (q0.to(dtype), y.to(dtype), sig.to(dtype))
            d = (ref.DataConsistency(p, 0.2).prox(*args) - DataConsistency(p, 0.2).prox(*args)).abs()
            # column 2 is log T1: |difference| = relative difference in T1
            d_t1 = d[:, 2]
            print(f"{name} ({dtype}): {int((d.amax(1) > 0).sum())} of {n} voxels differ from {rev}'s step; "
                  f"T1 relative difference: largest {float(d_t1.max()):.2g}, 99.9th percentile "
                  f"{float(d_t1.quantile(0.999)):.2g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", default=None, help="a commit whose data-consistency step to compare with")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for rounds in (2, 0):
        print(f"polarity_rounds {rounds}: {1000 * time_call(rounds):.0f} ms per call (2 x 192 x 192 voxels, "
              f"{a.threads} threads)")
    if a.reference:
        compare_with(a.reference)


if __name__ == "__main__":
    main()
