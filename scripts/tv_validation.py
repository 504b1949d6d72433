"""Choose the TV-regularised fit's default strength on synthetic validation brain slices.

    python scripts/tv_validation.py [--seeds 1000,1001] [--snrs 30,15] [--weights 0,0.25,0.5,1,2,4] [--matrix 96]

Validation data only (never the project's test scenes): brain slices of
:func:`custom_components.data.synthesis.brain_scene` with geometry and tissue seeds 1000+ (the training
data's anatomy seeds start at 0), the paper protocol, a smooth B field in 1.8-2.0, echo-train blurring,
Rician noise at each SNR; fitted where the signal exceeds 5 sigma (as ``qmri map``), scored on
the scene's brain-tissue mask. For every ``tv_weight`` prints the T1 error over the tissue mask relative to the
truth (RMS, median of the absolute value, and mean of (T1 - T1_true) / T1_true, in %), the B RMSE and the time per slice; the plain
Rician ML fit is the row ``plain``. docs/physics.md ("The TV-regularised fit") records a run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from custom_components.data.synthesis import Effects, brain_scene, render
from custom_components.methods.fitting import PRECISE_FIT, InversionRecoveryModel, signal_mask
from custom_components.methods.regularised import fit_tv
from custom_components.physics.image_formation import smooth_inversion_efficiency
from custom_components.physics.protocol import get_protocol


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1000,1001")
    ap.add_argument("--snrs", default="30,15")
    ap.add_argument("--weights", default="0,0.25,0.5,1,2,4")
    ap.add_argument("--matrix", type=int, default=96)
    ap.add_argument("--protocol", default="paper")
    a = ap.parse_args(argv)
    prot = get_protocol(a.protocol)
    weights = [float(w) for w in a.weights.split(",")]
    rows: dict[str, list] = {}
    for seed in (int(s) for s in a.seeds.split(",")):
        scene = brain_scene(np.random.default_rng(seed), 0, 0, (a.matrix, a.matrix), geometry_seed=seed)
        gen = torch.Generator().manual_seed(seed)
        b = smooth_inversion_efficiency((a.matrix, a.matrix), gen, (1.8, 2.0))
        for snr in (float(s) for s in a.snrs.split(",")):
            out = render(scene["T1"], scene["T2"], scene["PD"], b, prot, Effects(), gen, sigma=1.0 / snr)
            y = np.moveaxis(out["image"].numpy(), 0, -1)
            truth = out["truth"].numpy()
            sigma = 1.0 / snr
            mask = out["mask"].numpy() & signal_mask(y, sigma)  # what qmri map fits (signal above 5 sigma)
            score = mask & np.asarray(scene["mask"], dtype=bool)  # brain tissue
            t = time.perf_counter()
            plain = InversionRecoveryModel(prot, **PRECISE_FIT).fit(y, mask=mask, noise="rician", sigma=sigma)  # TV's start
            fits = {"plain": (plain, time.perf_counter() - t)}
            for w in weights:
                t = time.perf_counter()
                fits[f"{w:g}"] = (fit_tv(y, prot, w, mask=mask, sigma=sigma, init=plain), time.perf_counter() - t)
            for name, (f, dt) in fits.items():
                rel = (f.t1[score] - truth[0][score]) / truth[0][score]
                b_rmse = float(np.sqrt(np.mean((f.b[score] - truth[2][score]) ** 2)))
                rows.setdefault(name, []).append((seed, snr, 100 * np.sqrt(np.mean(rel**2)), 100 * np.median(np.abs(rel)),
                                                  100 * rel.mean(), b_rmse, dt))
                print(f"seed {seed} SNR {snr:g} {name:>6}: T1 rel RMSE {100 * np.sqrt(np.mean(rel ** 2)):6.2f} %  "
                      f"median |err| {100 * np.median(np.abs(rel)):5.2f} %  bias {100 * rel.mean():+6.2f} %  B RMSE {b_rmse:.4f}  {dt:6.1f} s  ({int(mask.sum())} fitted, {int(score.sum())} scored)",
                      flush=True)
    print("\n| tv_weight | T1 rel. RMSE % | T1 median abs. rel. error % | T1 mean rel. error % | B RMSE | s per slice |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        r = np.array([x[2:] for x in r])
        print(f"| {name} | {r[:, 0].mean():.2f} | {r[:, 1].mean():.2f} | {r[:, 2].mean():+.2f} | {r[:, 3].mean():.4f} | "
              f"{r[:, 4].mean():.1f} |")


if __name__ == "__main__":
    main()
