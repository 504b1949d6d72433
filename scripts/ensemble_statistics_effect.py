"""The Diffusor's ensemble statistics before and after issue 19 item 4, from the same members.

    python scripts/ensemble_statistics_effect.py capture brain|twin [--weights W] [--out members_X.npz]
    python scripts/ensemble_statistics_effect.py analyse members_brain.npz|members_twin.npz

``capture`` maps one held-out synthetic brain slice (``brain_cases(1)``: seed 917203, SNR 50,
Rician noise, echo-train blurring) or the digital NIST twin (paper protocol, SNR 50, seed 0) with
the Diffusor at the bundle's defaults (10 samples, DPM-Solver++(2M) 20 steps, dihedral
self-ensemble) and saves the raw network-space members (B, S, 3, H, W) with the truth and mask.
``analyse`` computes, from those same members, the plain statistics (mean and std of the decoded
members, ``robust_clip=None``, the behaviour before) and the robust ones (members clamped to the
median +- 4 robust stds, the default now): brain -- T1 bias, RMSE, ensemble std and coverage
(``map_metrics.coverage``) over the mask, in CSF and in the voxels where a member sits at the
sampler's clip; twin -- the sphere table (ROI mean, within-sphere std, error, mean ensemble std).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def capture(which: str, weights: str, out: str) -> None:
    import custom_components.methods.inferers as inf
    from custom_components.mapping import map_series
    from custom_components.reporting.comparison import brain_cases, twin_case

    captured = []
    original = inf.ensemble_statistics

    def grab(samples, scale, **kw):
        captured.append((samples.detach().cpu().clone(), torch.as_tensor(scale).detach().cpu().clone()))
        return original(samples, scale, **kw)

    inf.ensemble_statistics = grab  # decode_prediction imports it at call time
    case = brain_cases(1)[0] if which == "brain" else twin_case(50.0, seed=0)
    map_series(case.series(), method="diffusor", mask=case.mask[:, :, None], progress=False, weights=weights,
               sigma=case.sigma)
    inf.ensemble_statistics = original
    samples, scale = captured[0]
    extra = {"extra_" + k: v for k, v in case.extra.items() if isinstance(v, np.ndarray)}
    np.savez_compressed(out, samples=samples.numpy(), scale=scale.numpy(), mask=case.mask, truth=case.truth, **extra)
    print(f"saved {tuple(samples.shape)} members to {out}")


def _stats(samples: torch.Tensor, scale: torch.Tensor) -> dict:
    from custom_components.methods.inferers import ensemble_statistics

    out = {}
    for name, kw in (("plain", {"robust_clip": None}), ("robust", {})):
        m, s = ensemble_statistics(samples, scale, **kw)
        out[name] = (m[0, 0].numpy(), s[0, 0].numpy())
    return out


def analyse_brain(d) -> None:
    from custom_components.data.anatomy import Tissue
    from custom_components.reporting.map_metrics import coverage

    samples, scale = torch.from_numpy(d["samples"]).double(), torch.from_numpy(d["scale"]).double()
    mask, t = d["mask"], d["truth"][0]
    at_clip = (d["samples"][0, :, 0] >= 0.9999).any(0)
    res = _stats(samples, scale)
    print(f"members at the clip (y >= 0.9999) in the mask: {int((d['samples'][0, :, 0][:, mask] >= 0.9999).sum())} "
          f"of {int(mask.sum()) * d['samples'].shape[1]}, in {int((at_clip & mask).sum())} voxels")
    print("| voxels | n | true T1 (s) | statistics | T1 bias (s) | T1 RMSE (s) | max abs. error (s) | "
          "mean / median ensemble std (s) | coverage 1 / 2 std |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for label, sel in (("all in the mask", mask), ("CSF", mask & (d["extra_tissue"] == int(Tissue.CSF))),
                       ("a member at the clip", mask & at_clip)):
        for name, (m, s) in res.items():
            err = m[sel] - t[sel]
            cov = coverage(t, m, s, sel)
            print(f"| {label} | {int(sel.sum())} | {t[sel].mean():.3f} | {name} | {err.mean():+.3f} | "
                  f"{np.sqrt(np.mean(err ** 2)):.3f} | {np.abs(err).max():.2f} | {s[sel].mean():.3f} / "
                  f"{np.median(s[sel]):.3f} | {cov[1.0]:.3f} / {cov[2.0]:.3f} |")


def analyse_twin(d) -> None:
    from custom_components.reporting.comparison import twin_case
    from custom_components.reporting.evaluation import locate_spheres, roi_statistics

    samples, scale = torch.from_numpy(d["samples"]).double(), torch.from_numpy(d["scale"]).double()
    case = twin_case(50.0, seed=0)
    ref = case.extra["reference"]
    layout = locate_spheres(case.images, case.pixel_spacing_mm, t1_map=case.extra["spheres_truth"], reference_t1_s=ref)
    res = {k: (roi_statistics(m, layout), roi_statistics(s, layout)) for k, (m, s) in _stats(samples, scale).items()}
    mask = d["mask"]
    print(f"members at the clip in the mask: top {int((d['samples'][0, :, 0][:, mask] >= 0.9999).sum())}, "
          f"bottom {int((d['samples'][0, :, 0][:, mask] <= -0.9999).sum())}")
    print("| sphere | reference T1 (ms) | plain: mean ± within-sphere std (ms), error, mean ensemble std (ms) | "
          "robust: the same |")
    print("|---:|---:|---:|---:|")
    errs = {k: [] for k in res}
    for k in range(len(ref)):
        cells = []
        for name, (st, sd) in res.items():
            e = 100 * (st[k]["mean"] - ref[k]) / ref[k]
            if 0.4 <= ref[k] <= 2.0:
                errs[name].append(abs(e))
            cells.append(f"{1000 * st[k]['mean']:.1f} ± {1000 * st[k]['std']:.1f}, {e:+.1f} %, {1000 * sd[k]['mean']:.1f}")
        print(f"| {k + 1} | {1000 * ref[k]:.1f} | " + " | ".join(cells) + " |")
    for name, e in errs.items():
        print(f"{name}: 0.4-2 s spheres mean / max abs. error {np.mean(e):.2f} / {np.max(e):.2f} %")
    sel = mask & (d["samples"][0, :, 0] >= 0.9999).any(0)
    t = d["truth"][0]
    print("mask voxels by the number of members at the clip (0, 1, 2, ...):",
          np.bincount((d["samples"][0, :, 0] >= 0.9999).sum(0)[mask]).tolist())
    for name, (m, s) in _stats(samples, scale).items():
        print(f"{name}: the {int(sel.sum())} mask voxels with a member at the clip (true T1 {t[sel].mean():.3f} s): "
              f"mean T1 {m[sel].mean():.3f} s, RMSE {np.sqrt(np.mean((m[sel] - t[sel]) ** 2)):.3f} s, "
              f"mean ensemble std {s[sel].mean():.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("which", choices=("brain", "twin"))
    c.add_argument("--weights", default="bundles/diffusor/models/model_fitcond.pt")
    c.add_argument("--out", default=None)
    a = sub.add_parser("analyse")
    a.add_argument("npz")
    args = ap.parse_args()
    if args.cmd == "capture":
        capture(args.which, args.weights, args.out or f"members_{args.which}.npz")
    else:
        d = np.load(args.npz)
        (analyse_brain if "extra_tissue" in d.files else analyse_twin)(d)


if __name__ == "__main__":
    main()
