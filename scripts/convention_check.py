"""The parameter convention's effect on the consistency flag (docs/physics.md, "Parameter convention").

Maps the nist15 twin (SNR 50, seed 0) with the classical fit and the fit-conditioned nist15 Diffusor
(few samples and steps), and scores every method's maps against the truth in the output convention:
the flagged fraction (alpha 1e-3, the known sigma), the B and PD bias, and the flag of the truth
itself decoded as a perfect network's output. Run it on a checkout to compare commits:

    python scripts/convention_check.py [--samples 2] [--steps 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args(argv)
    from custom_components.data.synthesis import Effects, nist_twin
    from custom_components.io import IRSeries
    from custom_components.mapping import MappingResult, add_consistency_maps, map_series
    from custom_components.mapping.learned import decode_prediction
    from custom_components.methods.scaling import encode_maps

    snr = 50.0
    tw = nist_twin("nist15", snr=snr, effects=Effects(noise="rician"), seed=0)
    prot = tw["protocol"]
    series = IRSeries(data=tw["image"].transpose(1, 2, 0)[:, :, None, :], affine=np.eye(4), protocol=prot, source="twin")
    m = tw["mask"].astype(bool)
    truth = tw["truth"]
    print(f"nist15 twin, SNR {snr:g}: {m.sum()} mask voxels")
    scale = torch.tensor([1.0])
    perfect, _ = decode_prediction(encode_maps(torch.as_tensor(tw["label"]).float()[None], scale), scale, prot)
    res = MappingResult(maps={k: perfect[0, i].numpy()[:, :, None] for i, k in enumerate(("T1", "PD", "B"))},
                        mask=m[:, :, None], info={"sigma": 1.0 / snr})
    r = add_consistency_maps(res, series)
    print(f"truth decoded as a perfect network's output: flagged {100 * r.info['flagged_fraction']:.2f} %, "
          f"median RMS residual {np.median(r.maps['residual'][m] * snr):.1f} sigma")
    runs = [("mle", {}), ("diffusor", {"weights": str(REPO / "bundles/diffusor/models/model_fitcond_nist15.pt"),
                                       "samples": a.samples, "steps": a.steps})]
    for name, kw in runs:
        r = map_series(series, method=name, mask=m[:, :, None], progress=False, sigma=1.0 / snr, **kw)
        t1, pd, b = (np.asarray(r.maps[k])[:, :, 0][m] for k in ("T1", "PD", "B"))
        print(f"{name}: flagged {100 * r.info['flagged_fraction']:.2f} %; B bias vs truth mean {np.mean(b - truth[2][m]):+.3f} "
              f"(median {np.median(b - truth[2][m]):+.3f}); PD bias mean {100 * np.mean(pd / truth[1][m] - 1):+.1f} % "
              f"(median {100 * np.median(pd / truth[1][m] - 1):+.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
