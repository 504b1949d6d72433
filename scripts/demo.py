"""The main job on the embedded defaults: map T1/PD/B of the digital NIST twin and of a synthetic
brain slice with the classical fit, write the maps, a figure and a summary.

    python scripts/demo.py --out out/demo        (what `make demo` runs)

Nothing is downloaded: the phantom is the digital twin, the brain comes from the MNI template
shipped inside nilearn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _figure(path: Path, panels: list[tuple[str, np.ndarray, str, tuple[float, float]]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        from cmcrameri import cm as cmc

        lipari = cmc.lipari
    except ImportError:  # the recommended map is optional
        lipari = "magma"
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (name, img, cmap, clim) in zip(np.atleast_1d(axes), panels):
        im = ax.imshow(img, cmap=lipari if cmap == "lipari" else cmap, vmin=clim[0], vmax=clim[1])
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from custom_components.reporting.evaluation import format_table_markdown, locate_spheres, sphere_table
    from custom_components.methods.fitting import fit_ir
    from custom_components.io import save_maps
    from custom_components.physics.protocol import paper_protocol
    from custom_components.data.synthesis import Effects, SynthesisConfig, SyntheticIRDataset, nist_twin

    prot = paper_protocol()
    summary = [f"# qMRI demo: classical Rician-ML fit, paper protocol (7 TIs), SNR {a.snr:g}", ""]

    # ---------------------------------------------------------------- the digital NIST twin
    tw = nist_twin(prot, snr=a.snr, effects=Effects(noise="rician", echo_train=True), seed=a.seed)
    img = tw["image"].transpose(1, 2, 0)
    t = time.perf_counter()
    fit = fit_ir(img, prot, mask=tw["mask"], noise="rician", sigma=1 / tw["snr"])
    dt = time.perf_counter() - t
    ref = tw["reference"]["T1_s"]
    layout = locate_spheres(tw["image"], tw["pixel_spacing_mm"], plate="T1", t1_map=fit.t1, reference_t1_s=ref)
    rows = sphere_table(fit.t1, layout, ref)
    summary += [format_table_markdown(rows, f"Digital NIST twin (T1 plate, v2 3 T reference), fit in {dt:.1f} s"), ""]
    px = 250.0 / 240
    aff = np.diag([px, px, 1.0, 1.0])
    save_maps(out / "phantom", {"T1map": fit.t1[:, :, None], "PDmap": fit.pd[:, :, None], "InvEffmap": fit.b[:, :, None]},
              aff, {k: {"Units": u, "Method": "mle"} for k, u in (("T1map", "s"), ("PDmap", "a.u."), ("InvEffmap", "1"))},
              overwrite=True)
    _figure(out / "phantom.png", [("TI 0.5 s image", tw["image"][3], "gray", (0, 1)),
                                  ("T1 fit (s)", fit.t1, "lipari", (0, 2.5)),
                                  ("T1 truth (s)", tw["label"][0], "lipari", (0, 2.5)),
                                  ("PD fit", fit.pd, "gray", (0, 1.1)),
                                  ("B fit", fit.b, "viridis", (1.6, 2.1))],
            f"Digital NIST twin, SNR {a.snr:g}, Rician ML fit")

    # ---------------------------------------------------------------- a synthetic brain slice
    ds = SyntheticIRDataset(SynthesisConfig(protocol="paper", n_slices=1, realisations=1, seed=a.seed + 1000,
                                            effects=Effects(snr_range=(a.snr, a.snr), echo_train=True)))
    item = ds[0]
    y = item["image"].numpy().transpose(1, 2, 0).astype(float)
    lab = item["label"].numpy()
    mask = item["mask"].numpy()[0] > 0
    fit_b = fit_ir(y, prot, mask=mask, noise="rician", sigma=1 / float(item["snr"]))
    err = fit_b.t1[mask] - lab[0][mask]
    nrmse = np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(lab[0][mask] ** 2))
    nrmse_pd = np.sqrt(np.mean((fit_b.pd[mask] - lab[1][mask]) ** 2)) / np.sqrt(np.mean(lab[1][mask] ** 2))
    summary += [f"Synthetic brain slice (MNI anatomy, {int(mask.sum())} voxels with tissue, SNR {float(item['snr']):.0f}): "
                f"T1 NRMSE {nrmse * 100:.1f} %, PD NRMSE {nrmse_pd * 100:.1f} %, median T1 error "
                f"{np.median(err / lab[0][mask]) * 100:+.2f} %", ""]
    save_maps(out / "brain", {"T1map": fit_b.t1[:, :, None], "PDmap": fit_b.pd[:, :, None], "InvEffmap": fit_b.b[:, :, None],
                              "truth_T1map": lab[0][:, :, None]}, aff,
              {k: {"Units": u} for k, u in (("T1map", "s"), ("PDmap", "a.u."), ("InvEffmap", "1"), ("truth_T1map", "s"))},
              overwrite=True)
    _figure(out / "brain.png", [("TI 0.85 s image", item["image"][4].numpy(), "gray", (0, 1)),
                                ("T1 fit (s)", fit_b.t1, "lipari", (0, 4.5)),
                                ("T1 truth (s)", lab[0], "lipari", (0, 4.5)),
                                ("|T1 error| (s)", np.abs(fit_b.t1 - lab[0]) * mask, "magma", (0, 0.5)),
                                ("PD fit", fit_b.pd, "gray", (0, 1.1))],
            f"Synthetic brain slice, SNR {float(item['snr']):.0f}, Rician ML fit")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    print(f"maps, figures and summary -> {out}")


if __name__ == "__main__":
    main()
