"""The main job on the embedded defaults: map T1/PD/B of the digital NIST twin and of a synthetic
brain slice with the classical fit and with the default qMRI Diffusor (mean and ensemble std), write
the maps, a figure per case and a summary (Markdown table + JSON).

    python scripts/demo.py --out out/demo        (what `make demo` runs)

Both methods are called as ``qmri map`` calls them (``map_series(series, "mle" | "diffusor")``); the
Diffusor gets no weights argument, so it uses what ``qmri map --method diffusor`` uses by default
(the bundle's choice for the input's protocol). To stay within a few minutes on 2 CPU cores the
Diffusor draws ``--samples`` members (default 8, the bundle's is 10) with ``--steps`` sampler steps
(default 10, the bundle's is 20; its docs/README.md speed sweep: 0.9 / 2.3 % twin error with 10
steps against 0.9 / 2.0 % with 20), and the brain case is a ``--brain_crop`` x ``--brain_crop``
crop of the slice (default 128; both methods map the same crop); the summary says so. Nothing is downloaded: the phantom is the digital twin, the brain comes
from the MNI template shipped inside nilearn.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PIXEL_MM = 250.0 / 240  # the twin's and the synthetic brain's in-plane spacing (250 mm field of view, 240 px)
T1_RANGE_S = (0.4, 2.0)  # the spheres the paper highlights (brain range)


# ---------------------------------------------------------------------------------------- mapping
def as_series(images: np.ndarray, protocol, source: str):
    """(N, H, W) images of one slice -> the IRSeries ``qmri map`` would read (X, Y, 1, N)."""
    from custom_components.io import IRSeries

    return IRSeries(data=np.asarray(images, dtype=np.float64).transpose(1, 2, 0)[:, :, None, :],
                    affine=np.diag([PIXEL_MM, PIXEL_MM, 1.0, 1.0]), protocol=protocol, source=source)


def run_methods(series, mask: np.ndarray, sigma: float, samples: int | None, steps: int | None) -> dict:
    """The classical Rician-ML fit and the default Diffusor on one slice, as ``qmri map`` runs them
    (``--sigma`` known: the twin and the brain are synthetic). Returns method -> dict(result, seconds
    (wall), cpu_seconds (this process's CPU time, all threads: the work, whatever else the machine runs))."""
    from custom_components.mapping import map_series

    out = {}
    diffusor_opts = {k: v for k, v in (("samples", samples), ("steps", steps)) if v is not None}
    for method, opts in (("mle", {}), ("diffusor", diffusor_opts)):
        t, c = time.perf_counter(), time.process_time()
        res = map_series(series, method, mask=mask[:, :, None], sigma=sigma, progress=False, **opts)
        out[method] = {"result": res, "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c}
    return out


def slice_maps(res) -> dict[str, np.ndarray]:
    """The result's maps of the single slice, (H, W) each."""
    return {k: np.asarray(v)[:, :, 0] for k, v in res.maps.items()}


def write_method(out_dir: Path, series, method: str, res) -> None:
    """The maps and sidecars ``qmri map`` writes (T1map, PDmap, InvEffmap, Residualmap, ..., _std)."""
    from custom_components.io import save_maps
    from custom_components.mapping.results import output_arrays, sidecars_for

    save_maps(out_dir, output_arrays(res), series.affine, sidecars_for(res, series, method), overwrite=True)


def weights_line(info: dict) -> str:
    """Which weights made the Diffusor's maps (the sidecars carry the same record)."""
    w = info.get("weights")
    if isinstance(w, dict) and w.get("File"):
        sha = str(w.get("SHA256") or "")
        return f"weights {w['File']}" + (f" (sha256 {sha[:16]}...)" if sha else "")
    return f"weights: the bundle's default ({info.get('bundle', 'bundles/diffusor')})"


def ensemble_line(info: dict) -> str:
    return (f"{info.get('n_samples')} samples, sampler {info.get('sampler')} with "
            f"{info.get('network_evaluations_per_sample')} network evaluations per sample, "
            f"self-ensemble {info.get('symmetry')}")


# ---------------------------------------------------------------------------------------- the twin
def twin_case(snr: float, seed: int, protocol):
    from custom_components.data.synthesis import Effects, nist_twin

    return nist_twin(protocol, snr=snr, effects=Effects(noise="rician", echo_train=True), seed=seed)


def twin_rows(maps_by_method: dict, times: dict, layout, reference_t1_s) -> list[dict]:
    """One row per method: time (``times``: method -> (wall s, CPU s)), T1 error over the 0.4-2 s spheres (mean / max |error| %), within-
    sphere T1 std (% of T1), and for the Diffusor the mean ensemble T1 std (% of T1) in the same ROIs."""
    from custom_components.reporting.evaluation import roi_statistics

    ref = np.asarray(reference_t1_s, dtype=float)
    sel = [k for k in range(len(ref)) if T1_RANGE_S[0] <= ref[k] <= T1_RANGE_S[1]]
    rows = []
    for method, maps in maps_by_method.items():
        st = roi_statistics(maps["T1"], layout)
        err = [100 * abs(st[k]["mean"] - ref[k]) / ref[k] for k in sel]
        row = {"method": method, "seconds": float(times[method][0]), "cpu_seconds": float(times[method][1]),
               "t1_error_mean_percent": float(np.mean(err)), "t1_error_max_percent": float(np.max(err)),
               "within_sphere_std_percent": float(np.mean([100 * st[k]["std"] / st[k]["mean"] for k in sel])),
               "ensemble_std_percent": None}
        if "T1_std" in maps:
            sd = roi_statistics(maps["T1_std"], layout)
            row["ensemble_std_percent"] = float(np.mean([100 * sd[k]["mean"] / st[k]["mean"] for k in sel]))
        rows.append(row)
    return rows


def brain_rows(maps_by_method: dict, times: dict, truth_t1: np.ndarray, mask: np.ndarray) -> list[dict]:
    """One row per method on the brain (crop): time (as in :func:`twin_rows`), T1 NRMSE (%), median
    T1 error and median |T1 error| (%) over the
    tissue mask, and for the Diffusor the mean ensemble T1 std (% of T1) and the fraction of tissue
    voxels whose truth lies within 2 ensemble std of the mean (%)."""
    t = truth_t1[mask]
    rows = []
    for method, maps in maps_by_method.items():
        est = maps["T1"][mask]
        err = est - t
        row = {"method": method, "seconds": float(times[method][0]), "cpu_seconds": float(times[method][1]),
               "t1_nrmse_percent": float(100 * np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(t**2))),
               "t1_median_error_percent": float(100 * np.median(err / t)),
               "t1_median_abs_error_percent": float(100 * np.median(np.abs(err) / t)),
               "ensemble_std_percent": None, "within_2std_percent": None}
        if "T1_std" in maps:
            sd = maps["T1_std"][mask]
            row["ensemble_std_percent"] = float(100 * np.mean(sd / est))
            row["within_2std_percent"] = float(100 * np.mean(np.abs(err) <= 2 * sd))
        rows.append(row)
    return rows


LABELS = {"mle": "classical fit (Rician ML)", "diffusor": "qMRI Diffusor (default weights)"}


def _num(x, fmt=".1f"):
    return "n/a" if x is None else format(x, fmt)


def twin_table(rows: list[dict]) -> str:
    lines = ["| method | seconds, wall / CPU | T1 error, 0.4-2 s spheres: mean / max (%) | within-sphere T1 std (% of T1) | "
             "mean ensemble T1 std (% of T1) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {LABELS[r['method']]} | {r['seconds']:.1f} / {r['cpu_seconds']:.1f} | {r['t1_error_mean_percent']:.1f} / "
                     f"{r['t1_error_max_percent']:.1f} | {r['within_sphere_std_percent']:.1f} | "
                     f"{_num(r['ensemble_std_percent'])} |")
    return "\n".join(lines) + "\n"


def brain_table(rows: list[dict]) -> str:
    lines = ["| method | seconds, wall / CPU | T1 NRMSE (%) | median T1 error (%) | median abs. T1 error (%) | "
             "mean ensemble T1 std (% of T1) | truth within 2 std (% of voxels) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {LABELS[r['method']]} | {r['seconds']:.1f} / {r['cpu_seconds']:.1f} | {r['t1_nrmse_percent']:.1f} | "
                     f"{r['t1_median_error_percent']:+.2f} | {r['t1_median_abs_error_percent']:.2f} | "
                     f"{_num(r['ensemble_std_percent'])} | "
                     f"{_num(r['within_2std_percent'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- figures
def _lipari():
    try:
        from cmcrameri import cm as cmc

        return cmc.lipari
    except ImportError:  # the recommended map is optional (make venv installs it)
        return "magma"


def _upper(img: np.ndarray, mask: np.ndarray, q: float = 95.0) -> float:
    v = np.asarray(img)[mask]
    v = v[np.isfinite(v)]
    return float(np.percentile(v, q)) if v.size and np.percentile(v, q) > 0 else 1.0


def figure(path: Path, title: str, maps: dict, t1_truth: np.ndarray, image: np.ndarray, image_title: str,
           mask: np.ndarray, t1_max: float) -> None:
    """Rows T1, PD, B; columns: reference (T1 truth, an input image), classical fit, Diffusor mean,
    Diffusor ensemble std (0 to its 95th percentile in the mask: a few edge voxels have far larger
    values). The fit and the mean share one colour scale per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit, dif = maps["mle"], maps["diffusor"]
    lipari = _lipari()
    pd_max = 1.6 * float(np.median(fit["PD"][mask]))
    rows = [("T1 (s)", "T1", lipari, (0.0, t1_max)), ("PD", "PD", "gray", (0.0, pd_max)),
            ("B", "B", "viridis", (1.5, 2.1))]
    fig, axes = plt.subplots(3, 4, figsize=(13.0, 9.6))
    for i, (label, key, cmap, clim) in enumerate(rows):
        first = {0: ("T1 truth (s)", t1_truth, lipari, clim), 1: (image_title, image, "gray", (0.0, 1.0))}.get(i)
        panels = [first,
                  (f"{label}, classical fit", fit[key], cmap, clim),
                  (f"{label}, Diffusor mean", dif[key], cmap, clim),
                  (f"{label}, Diffusor std", dif[key + "_std"], "cividis", (0.0, _upper(dif[key + "_std"], mask)))]
        for ax, panel in zip(axes[i], panels):
            ax.axis("off")
            if panel is None:
                continue
            name, img, cm, (lo, hi) = panel
            im = ax.imshow(img, cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(name, fontsize=10)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- the cases
def crop_slices(mask: np.ndarray, size: int) -> tuple[slice, slice]:
    """A size x size window centred on the mask's centre of mass, inside the image."""
    h, w = mask.shape
    size = min(int(size), h, w)
    ys, xs = np.nonzero(mask)
    y0 = int(np.clip(round(ys.mean()) - size // 2, 0, h - size))
    x0 = int(np.clip(round(xs.mean()) - size // 2, 0, w - size))
    return slice(y0, y0 + size), slice(x0, x0 + size)


def run_twin(out: Path, snr: float, seed: int, samples: int | None, steps: int | None) -> tuple[list[str], list[dict]]:
    from custom_components.io import save_maps
    from custom_components.physics.protocol import paper_protocol
    from custom_components.reporting.evaluation import format_table_markdown, locate_spheres, sphere_table

    tw = twin_case(snr, seed, paper_protocol())
    series = as_series(tw["image"], tw["protocol"], "digital NIST twin (T1 plate), paper protocol")
    mask = np.asarray(tw["mask"], bool)
    runs = run_methods(series, mask, 1.0 / tw["snr"], samples, steps)
    maps = {m: slice_maps(r["result"]) for m, r in runs.items()}
    for m, r in runs.items():
        write_method(out / "phantom" / m, series, m, r["result"])
    save_maps(out / "phantom" / "truth", {"T1map": tw["label"][0][:, :, None].astype(np.float32)}, series.affine,
              {"T1map": {"Units": "s", "Description": "the twin's true T1"}}, overwrite=True)
    ref = tw["reference"]["T1_s"]
    layout = locate_spheres(tw["image"], tw["pixel_spacing_mm"], plate="T1", t1_map=tw["label"][0], reference_t1_s=ref)
    rows = twin_rows(maps, {m: (r["seconds"], r["cpu_seconds"]) for m, r in runs.items()}, layout, ref)
    info = runs["diffusor"]["result"].info
    figure(out / "phantom.png", f"Digital NIST twin, paper protocol, SNR {snr:g}: classical fit and qMRI Diffusor "
           f"({info.get('n_samples')} samples)", maps, tw["label"][0], tw["image"][3], "input image, TI 0.5 s",
           mask, 2.5)
    lines = [f"## Digital NIST twin (T1 plate, paper protocol, SNR {snr:g}, whole 240 x 240 slice)", "",
             twin_table(rows),
             f"Diffusor: {weights_line(info)}; {ensemble_line(info)}. Ensemble std: the voxel-wise std over the "
             "samples, averaged in each sphere's ROI. Figure: phantom.png; maps: phantom/mle, phantom/diffusor "
             "(as `qmri map` writes them), phantom/truth.", "",
             format_table_markdown(sphere_table(maps["mle"]["T1"], layout, ref), "Classical fit, sphere by sphere"),
             format_table_markdown(sphere_table(maps["diffusor"]["T1"], layout, ref),
                                   "qMRI Diffusor (mean), sphere by sphere")]
    return lines, rows


def run_brain(out: Path, snr: float, seed: int, samples: int | None, steps: int | None,
              crop: int) -> tuple[list[str], list[dict]]:
    from custom_components.data.synthesis import Effects, SynthesisConfig, SyntheticIRDataset
    from custom_components.io import save_maps

    ds = SyntheticIRDataset(SynthesisConfig(protocol="paper", n_slices=1, realisations=1, seed=seed + 1000,
                                            effects=Effects(snr_range=(snr, snr), echo_train=True)))
    item = ds[0]
    images = item["image"].numpy().astype(np.float64)
    truth_t1 = item["label"].numpy()[0].astype(np.float64)  # T1 is the same in every convention
    mask = item["mask"].numpy()[0] > 0
    sy, sx = crop_slices(mask, crop) if crop else (slice(None), slice(None))
    images, truth_t1, mask = images[:, sy, sx], truth_t1[sy, sx], mask[sy, sx]
    h, w = mask.shape
    series = as_series(images, ds.protocol, f"synthetic brain slice (MNI anatomy), {h} x {w}")
    runs = run_methods(series, mask, 1.0 / float(item["snr"]), samples, steps)
    maps = {m: slice_maps(r["result"]) for m, r in runs.items()}
    for m, r in runs.items():
        write_method(out / "brain" / m, series, m, r["result"])
    save_maps(out / "brain" / "truth", {"T1map": truth_t1[:, :, None].astype(np.float32),
                                        "mask": mask[:, :, None].astype(np.float32)}, series.affine,
              {"T1map": {"Units": "s", "Description": "the slice's true T1"},
               "mask": {"Units": "1", "Description": "tissue mask the table is computed over"}}, overwrite=True)
    rows = brain_rows(maps, {m: (r["seconds"], r["cpu_seconds"]) for m, r in runs.items()}, truth_t1, mask)
    info = runs["diffusor"]["result"].info
    where = f"a {h} x {w} crop of the 240 x 240 slice" if crop else f"the whole {h} x {w} slice"
    figure(out / "brain.png", f"Synthetic brain, {where}, SNR {float(item['snr']):.0f}: classical fit and qMRI Diffusor "
           f"({info.get('n_samples')} samples)", maps, truth_t1, images[4], "input image, TI 0.85 s", mask, 4.5)
    lines = [f"## Synthetic brain slice (MNI anatomy, paper protocol, SNR {float(item['snr']):.0f}; {where}, "
             f"{int(mask.sum())} voxels with tissue)", "", brain_table(rows),
             f"Diffusor: {weights_line(info)}; {ensemble_line(info)}. Figure: brain.png; maps: brain/mle, "
             "brain/diffusor, brain/truth (T1 and the tissue mask).", ""]
    return lines, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=8,
                    help="Diffusor ensemble size (default 8, one member per grid frame of the bundle's dihedral "
                         "self-ensemble; 0: the bundle's default, 10)")
    ap.add_argument("--steps", type=int, default=10, help="Diffusor sampler steps (default 10; 0: the bundle's default, 20)")
    ap.add_argument("--brain_crop", type=int, default=128, help="size of the brain crop in pixels (0: whole slice)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    samples, steps = a.samples or None, a.steps or None

    t0, c0 = time.perf_counter(), time.process_time()
    twin_lines, twin = run_twin(out, a.snr, a.seed, samples, steps)
    brain_lines, brain = run_brain(out, a.snr, a.seed, samples, steps, a.brain_crop)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    shortened = [f"{samples} samples instead of the bundle's 10"] if samples else []
    shortened += [f"{steps} sampler steps instead of 20"] if steps else []
    head = [f"# qMRI demo: classical Rician-ML fit and the default qMRI Diffusor, paper protocol (7 TIs), SNR {a.snr:g}",
            "",
            "Both methods run as `qmri map --method mle|diffusor` runs them, with the noise level known "
            "(synthetic data). To keep the demo short the Diffusor runs with "
            + (" and ".join(shortened) or "the bundle's ensemble (10 samples, 20 steps)") + ", and the brain case is "
            + (f"a {a.brain_crop} x {a.brain_crop} crop" if a.brain_crop else "the whole slice")
            + "; the twin is the whole slice. Seconds: wall time of each `map_series` call and the CPU time it used "
            f"(all threads); mapping, tables and figures took {total:.0f} s wall, {cpu:.0f} s CPU in all.", ""]
    summary = head + twin_lines + brain_lines
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    (out / "summary.json").write_text(json.dumps({"snr": a.snr, "seed": a.seed, "samples": samples, "steps": steps,
                                                  "brain_crop": a.brain_crop, "seconds_total": total, "cpu_seconds_total": cpu,
                                                  "twin": twin, "brain": brain}, indent=1) + "\n")
    print("\n".join(summary))
    print(f"maps, figures (phantom.png, brain.png) and summary (summary.md, summary.json) -> {out}")
    return out


if __name__ == "__main__":
    main()
