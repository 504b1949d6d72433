"""The classical fit's error on the Diffusor bundle's validation slices (the reference for val_t1_mape).

    python scripts/validation_reference.py [--bundle bundles/diffusor] [--n_val_slices 4]

Builds the validation items exactly as train.json does (held-out seed, 96 x 96 centre crops), fits
them with the classical Rician-ML fit (true SNR given) and least squares, and prints the same
metrics as the bundle's validation: mean absolute relative T1 and PD error (%) over tissue voxels.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="bundles/diffusor")
    ap.add_argument("--n_val_slices", type=int, default=4)
    a = ap.parse_args()
    from monai.bundle import ConfigParser

    from custom_components.methods.fitting import fit_ir
    from custom_components.bundle.metrics import relative_map_error
    from custom_components.physics.protocol import get_protocol
    from custom_components.bundle.transforms import SyntheticItemd

    p = ConfigParser()
    p.read_config(f"{a.bundle}/configs/train.json")
    p["bundle_root"] = a.bundle
    syn = SyntheticItemd(p.get_parsed_content("val_synthesis"))
    prot = get_protocol(p.get_parsed_content("protocol"))
    out = {}
    for noise in ("rician", "gaussian"):
        sums = {0: [0.0, 0], 1: [0.0, 0]}
        for i in range(a.n_val_slices):
            it = syn({"index": 4 * i})
            img, lab = it["image"].double(), it["label"].double()
            h, w = img.shape[-2:]
            sl = (slice(h // 2 - 48, h // 2 + 48), slice(w // 2 - 48, w // 2 + 48))
            img, lab = img[:, sl[0], sl[1]], lab[:, sl[0], sl[1]]
            kw = {"noise": "rician", "sigma": 1 / float(it["snr"])} if noise == "rician" else {}
            f = fit_ir(img.numpy().transpose(1, 2, 0), prot, **kw)
            pred = torch.as_tensor(np.stack([f.t1, f.pd, f.b]))[None]
            for c in (0, 1):
                s, n = relative_map_error(pred, lab[None], c)
                sums[c][0] += s
                sums[c][1] += n
        out[noise] = {c: 100 * v[0] / v[1] for c, v in sums.items()}
        print(f"classical fit ({'Rician ML' if noise == 'rician' else 'least squares'}) on {a.n_val_slices} validation "
              f"slices: T1 {out[noise][0]:.1f} %, PD {out[noise][1]:.1f} % (mean absolute relative error over tissue)")


if __name__ == "__main__":
    main()
