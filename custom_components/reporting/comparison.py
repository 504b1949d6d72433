"""The comparison of every mapping method on the same data: ``qmri compare`` -> docs/RESULTS.md.

One run maps, with the shipped weights, the classical fit and the TV-regularised fit (the two
baselines every learned method is set beside), the same inputs by every method and writes the tables
(markdown) and figures (PNG) of the paper's Table 1, Fig. 2 and Fig. 3, with numbers. The report opens
with the data nothing was chosen on, and gives the scene the Diffusor's settings were chosen on later,
named as such:

1. Real scans: the NIST phantom scans in ../shared/data/nist_phantom_ir (1.5 T, six TIs 50-800 ms):
   every method that can map that protocol (the classical and TV-regularised fits, the RIM, and the
   learned models for which protocol-specific weights ``models/model_<protocol>.pt`` exist).
2. Brain: synthetic slices whose deformations, tissue draws and noise come from a seed never used
   in training (the embedded MNI anatomy is the only anatomy without a download, so the template is
   shared with training): T1/PD NRMSE and SSIM in the brain mask, T1 bias per tissue.
3. A pointer to docs/ROBUSTNESS.md (``qmri robustness``): scenes drawn independently of the training data.
4. The development scene: the digital NIST twin (paper protocol, echo-train blurring, Rician noise) at
   SNR 50, where the Diffusor's training stage and self-ensemble were chosen, and at a lower SNR: per
   sphere the reference T1 and each method's ROI mean +- within-sphere std.
5. Uncertainty (Diffusor): correlation of the ensemble std with |error|, coverage of the truth by
   1 and 2 std, for the few-step sampler and for the full 1000-step DDPM (on a crop: the full chain
   takes about an hour per 240 x 240 slice on 2 CPU cores), and a calibration factor of the std
   fitted on a separate slice; for every method the physics-consistency flag
   (:mod:`custom_components.mapping.consistency`) scored against the voxels with large error.
6. Speed and memory: seconds per 240 x 240 slice, peak resident memory of a fresh process, network
   evaluations per slice, and the time for 1 and 2 slices.

Scores (:mod:`custom_components.reporting.map_metrics`) are computed in the label mask (tissue with PD >= 0.1).
"Large error" for the flag is |T1 error| > 20 % of the true T1. Nothing is tuned on the cases of
sections 1-2 and 5-6; section 4's SNR 50 twin is where the Diffusor's stage and self-ensemble were chosen.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

from ..io import InputError
from ..mapping import FLAG_ALPHA

REPO = Path(__file__).resolve().parents[2]
TEST_SEED = 917_203  # the brain test slices' seed (training uses 0, validation 100003)
CALIBRATION_SEED = 917_204  # the slice the Diffusor's std calibration factor is fitted on
SHORT_T1_S = (0.1, 0.4)  # the "short T1" spheres of the summaries (the shorter spheres' means hinge on a few failed voxels: see the full tables)
LARGE_ERROR = 0.20  # relative T1 error that counts as a failure for the flag scores
TISSUES = {1: "CSF", 2: "GM", 3: "WM"}
#: The classical baselines every learned method is compared with: the plain fit and the TV-regularised fit.
BASELINES = ("mle", "tv")
CLASSICAL = ("mle", "tv", "ls")  # map any protocol: no weights
REAL_SCANS_HEAD = "## 1. Real scans"  # the section ``qmri compare --only real_scans`` replaces


@dataclass
class MethodSpec:
    """A method as the comparison runs it: ``map_series`` method name, label and options."""

    key: str
    label: str
    method: str
    options: dict = field(default_factory=dict)


def default_methods(quick: bool = False, steps: int = 10, samples: int = 10) -> list[MethodSpec]:
    """The classical fit, the TV-regularised fit, the ResNet, the RIM, both Diffusor variants with
    their shipped weights, the Diffusor with the prior over maps and the one conditioned on the fit and
    its CRLB (both any protocol, at their bundle settings)."""
    b = REPO / "bundles"
    diff = {"samples": samples, "steps": steps}
    specs = [MethodSpec("mle", "classical fit (Rician ML)", "mle"),
             MethodSpec("tv", "TV-regularised fit", "tv"),
             MethodSpec("resnet", "ResNet", "resnet"),
             MethodSpec("rim", "RIM", "rim"),
             MethodSpec("diffusor", "Diffusor (images only)", "diffusor", {**diff, "weights": str(b / "diffusor/models/model.pt")})]
    fitcond = b / "diffusor/models/model_fitcond.pt"
    if fitcond.exists():
        specs.append(MethodSpec("diffusor_fit", "Diffusor (images + fit)", "diffusor", {**diff, "weights": str(fitcond)}))
    if (b / "diffusor/models/model_prior.pt").exists():  # one set of weights for any protocol, at its own settings
        specs.append(MethodSpec("diffusor_prior", "Diffusor, prior over maps (any protocol)", "diffusor",
                                {"samples": samples, "variant": "prior"}))
    if (b / "diffusor/models/model_crlb.pt").exists():  # design (b): the fit and its CRLB, any protocol
        specs.append(MethodSpec("diffusor_crlb", "Diffusor, fit + CRLB (any protocol)", "diffusor",
                                {"samples": samples, "variant": "crlb"}))
    return specs


# ------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One slice to map: images (N, H, W), truth (3, H, W) or None, mask (H, W), noise sigma."""

    name: str
    images: np.ndarray
    protocol: object
    mask: np.ndarray
    truth: np.ndarray | None = None
    sigma: float | None = None
    extra: dict = field(default_factory=dict)
    pixel_spacing_mm: tuple = (250 / 240, 250 / 240)

    def series(self):
        from ..io import IRSeries

        px = self.pixel_spacing_mm
        return IRSeries(data=np.asarray(self.images, dtype=np.float64).transpose(1, 2, 0)[:, :, None, :],
                        affine=np.diag([px[0], px[1], 1.0, 1.0]), protocol=self.protocol, source=self.name)


def twin_case(snr: float, seed: int = 0, protocol="paper", echo_train: bool = True) -> Case:
    """The digital NIST twin at ``snr`` (Rician noise); ``echo_train=False`` leaves out the
    echo-train T2 blurring (a diagnostic: the comparison always uses it)."""
    from ..data.synthesis import Effects, nist_twin

    tw = nist_twin(protocol, snr=snr, effects=Effects(noise="rician", echo_train=echo_train), seed=seed)
    # truth in the output convention of every method's maps (physical PD and B), not the training labels
    return Case(f"NIST twin, SNR {snr:g}" + ("" if echo_train else ", no echo-train blurring"), tw["image"], tw["protocol"], tw["mask"].astype(bool), tw["truth"],
                1.0 / snr, {"reference": tw["reference"]["T1_s"], "spheres_truth": tw["truth"][0]}, tw["pixel_spacing_mm"])


def brain_cases(n: int, seed: int = TEST_SEED, snr: float = 50.0, protocol="paper", matrix: int = 240) -> list[Case]:
    """Held-out synthetic brain slices (seed never used in training), SNR fixed, echo-train blurring."""
    from ..data.synthesis import Effects, SyntheticIRDataset, maps_from_labels

    ds = SyntheticIRDataset(protocol=protocol, n_slices=max(n, 1) * 7, realisations=1, matrix=(matrix, matrix),
                            seed=seed, with_tissue=True,
                            effects=Effects(snr_range=(snr, snr), noise="rician", echo_train=True, pe_axis=-2))
    out = []
    for i in range(n):
        it = ds[7 * i + 3]  # spread over the slice positions
        out.append(Case(f"brain slice {i + 1} (seed {seed}, SNR {snr:g})", it["image"].numpy(), ds.protocol,
                        it["mask"][0].numpy() > 0.5, maps_from_labels(it["label"].double().numpy(), ds.protocol),  # output convention
                        1.0 / snr, {"tissue": it["tissue"].numpy()}))
    return out


# ---------------------------------------------------------------------------------------- running
@dataclass
class Result:
    maps: dict  # "T1", "PD", "B" (H, W) and "T1_std"... for the Diffusor
    seconds: float
    info: dict


def run_method(case: Case, spec: MethodSpec, mask: np.ndarray | None = None) -> Result:
    from ..mapping import map_series

    m = case.mask if mask is None else mask
    opts = dict(spec.options)
    if case.sigma is not None and "sigma" not in opts:
        opts["sigma"] = case.sigma  # known for synthetic data: the fit's and the RIM's likelihood, every method's flag map
    t = time.perf_counter()
    res = map_series(case.series(), method=spec.method, mask=m[:, :, None], progress=False, **opts)
    dt = time.perf_counter() - t
    maps = {k: np.asarray(v)[:, :, 0] for k, v in res.maps.items()}
    return Result(maps, dt, res.info)


def crop_case(case: Case, size: int) -> tuple[Case, tuple[slice, slice]]:
    """A size x size crop centred on the mask's centre of mass (for the full-DDPM uncertainty run)."""
    ys, xs = np.nonzero(case.mask)
    cy, cx = int(ys.mean()), int(xs.mean())
    h, w = case.mask.shape
    y0, x0 = int(np.clip(cy - size // 2, 0, h - size)), int(np.clip(cx - size // 2, 0, w - size))
    sl = (slice(y0, y0 + size), slice(x0, x0 + size))
    c = Case(case.name + f", {size} x {size} crop", case.images[:, sl[0], sl[1]], case.protocol, case.mask[sl],
             None if case.truth is None else case.truth[:, sl[0], sl[1]], case.sigma,
             {k: v[sl] for k, v in case.extra.items() if isinstance(v, np.ndarray) and v.shape == case.mask.shape},
             case.pixel_spacing_mm)
    return c, sl


# ---------------------------------------------------------------------------------------- sections
def _fmt(x, f="{:.1f}"):
    return "n/a" if x is None or not np.isfinite(x) else f.format(x)


def phantom_section(case: Case, results: dict[str, Result], specs: list[MethodSpec]) -> tuple[str, dict]:
    """Sphere table (ms) of every method on a twin case, and a per-method summary."""
    from .evaluation import locate_spheres, roi_statistics

    ref = np.asarray(case.extra["reference"])
    layout = locate_spheres(case.images, case.pixel_spacing_mm, t1_map=case.extra["spheres_truth"], reference_t1_s=ref)
    stats = {k: roi_statistics(r.maps["T1"], layout) for k, r in results.items()}
    head = "| sphere | reference T1 (ms) | " + " | ".join(s.label for s in specs if s.key in results) + " |"
    lines = [head, "|---:|---:|" + "---:|" * len(results)]
    summary = {}
    for s in specs:
        if s.key not in results:
            continue
        errs = [100 * (stats[s.key][k]["mean"] - ref[k]) / ref[k] for k in range(14)]
        sel = [k for k in range(14) if 0.4 <= ref[k] <= 2.0]
        summary[s.key] = {"mean_abs_err": float(np.mean([abs(errs[k]) for k in sel])),
                          "max_abs_err": float(np.max([abs(errs[k]) for k in sel])),
                          "std_ms": [1000 * stats[s.key][k]["std"] for k in range(14)], "errors": errs,
                          "short_mean_abs_err": float(np.mean([abs(errs[k]) for k in range(14) if SHORT_T1_S[0] <= ref[k] < SHORT_T1_S[1]])),
                          "in_range": sel}
    for k in range(14):
        bold = 0.4 <= ref[k] <= 2.0
        row = [str(k + 1), f"{1000 * ref[k]:.1f}"]
        for s in specs:
            if s.key in results:
                st = stats[s.key][k]
                row.append(f"{1000 * st['mean']:.0f} ± {1000 * st['std']:.0f} ({summary[s.key]['errors'][k]:+.1f} %)")
        lines.append("| " + " | ".join(f"**{c}**" if bold else c for c in row) + " |")
    bases = [(b.key, b.label) for b in specs if b.key in BASELINES and b.key in summary]
    lines += ["", "| method | 0.4-2 s spheres: mean / max abs. error (%) | 0.1-0.4 s spheres: mean abs. error (%) | "
              + "".join(f"0.4-2 s spheres with a within-sphere std below the {label}'s | " for _, label in bases)
              + "seconds per slice |", "|---|---|---|" + "---|" * len(bases) + "---|"]
    sel = [k for k in range(14) if 0.4 <= ref[k] <= 2.0]
    for s in specs:
        if s.key not in summary:
            continue
        sm = summary[s.key]
        below = ["-" if s.key == key else f"{sum(sm['std_ms'][k] < summary[key]['std_ms'][k] for k in sel)} of {len(sel)}"
                 for key, _ in bases]
        lines.append(f"| {s.label} | {sm['mean_abs_err']:.1f} / {sm['max_abs_err']:.1f} | {sm['short_mean_abs_err']:.1f} | "
                     + "".join(f"{b} | " for b in below) + f"{results[s.key].seconds:.1f} |")
    return "\n".join(lines), summary


def brain_section(cases: list[Case], results: list[dict[str, Result]], specs: list[MethodSpec]) -> tuple[str, dict]:
    from .map_metrics import nrmse, ssim, tissue_bias

    agg: dict = {}
    for case, res in zip(cases, results):
        m = case.mask
        for key, r in res.items():
            a = agg.setdefault(key, {"t1_nrmse": [], "pd_nrmse": [], "t1_ssim": [], "pd_ssim": [], "bias": {}})
            a["t1_nrmse"].append(nrmse(r.maps["T1"], case.truth[0], m))
            a["pd_nrmse"].append(nrmse(r.maps["PD"], case.truth[1], m))
            a["t1_ssim"].append(ssim(r.maps["T1"], case.truth[0], m))
            a["pd_ssim"].append(ssim(r.maps["PD"], case.truth[1], m))
            tb = tissue_bias(r.maps["T1"], case.truth[0], case.extra["tissue"], TISSUES, mask=m)
            for name, d in tb.items():
                a["bias"].setdefault(name, []).append((d["mean_pred"], d["mean_truth"], d["n"]))
    lines = ["| method | T1 NRMSE | PD NRMSE | T1 SSIM | PD SSIM | T1 bias WM (ms, %) | T1 bias GM (ms, %) | T1 bias CSF (ms, %) |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for s in specs:
        if s.key not in agg:
            continue
        a = agg[s.key]
        cells = []
        for name in ("WM", "GM", "CSF"):
            v = a["bias"].get(name, [])
            n = sum(x[2] for x in v)
            if n == 0:
                cells.append("n/a")
                continue
            mp = sum(x[0] * x[2] for x in v) / n
            mt = sum(x[1] * x[2] for x in v) / n
            cells.append(f"{1000 * (mp - mt):+.0f} ({100 * (mp - mt) / mt:+.1f} %)")
        summary[s.key] = {k: float(np.mean(a[k])) for k in ("t1_nrmse", "pd_nrmse", "t1_ssim", "pd_ssim")}
        sm = summary[s.key]
        lines.append(f"| {s.label} | {sm['t1_nrmse']:.3f} | {sm['pd_nrmse']:.3f} | {sm['t1_ssim']:.3f} | {sm['pd_ssim']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def uncertainty_rows(cases: list[Case], results: list[Result], factor: float | None = None) -> dict:
    """Pooled std-vs-error scores of Diffusor results on cases with truth (T1)."""
    from .map_metrics import coverage, detection_auc, std_error_correlation

    t, mu, sd, m = [], [], [], []
    for c, r in zip(cases, results):
        t.append(c.truth[0][c.mask])
        mu.append(r.maps["T1"][c.mask])
        sd.append(r.maps["T1_std"][c.mask])
        m.append(np.ones(int(c.mask.sum()), bool))
    t, mu, sd, m = (np.concatenate(x) for x in (t, mu, sd, m))
    err = np.abs(mu - t)
    out = {"corr": std_error_correlation(sd, err, m), "coverage": coverage(t, mu, sd, m),
           "auc": detection_auc(sd / np.maximum(mu, 1e-3), err / t > LARGE_ERROR, m),
           "median_rel_std": float(np.median(sd / np.maximum(mu, 1e-3))), "n": int(m.sum())}
    if factor is not None:
        out["coverage_calibrated"] = coverage(t, mu, factor * sd, m)
    return out


def flag_rows(cases: list[Case], results: list[dict[str, Result]], specs: list[MethodSpec], alpha: float = FLAG_ALPHA) -> str:
    from ..mapping.consistency import residual_rms
    from .map_metrics import detection_auc, detection_rates

    lines = ["| method | voxels with large error (%) | flagged (%) | sensitivity | specificity | precision | "
             "AUC of the residual | AUC of the Diffusor's relative std |", "|---|---|---|---|---|---|---|---|"]
    for s in specs:
        flags, bad, score, stdscore, mask = [], [], [], [], []
        for c, res in zip(cases, results):
            if s.key not in res:
                continue
            r = res[s.key]
            data = np.moveaxis(c.images, 0, -1)
            if r.info.get("flag_alpha") != alpha or r.info.get("flag_sigma") != c.sigma:
                raise ValueError(f"{s.label}: its flag map was not made with alpha {alpha:g} and the case's sigma")
            flags.append(r.maps["flag"][c.mask] > 0.5)  # the map qmri map writes (mapping.add_consistency_maps)
            score.append(residual_rms(data, r.maps["T1"], r.maps["PD"], r.maps["B"], c.protocol, sigma=c.sigma)[c.mask])
            bad.append(np.abs(r.maps["T1"][c.mask] - c.truth[0][c.mask]) / c.truth[0][c.mask] > LARGE_ERROR)
            if "T1_std" in r.maps:
                stdscore.append((r.maps["T1_std"] / np.maximum(r.maps["T1"], 1e-3))[c.mask])
            mask.append(np.ones(int(c.mask.sum()), bool))
        if not flags:
            continue
        f, b, sc, m = (np.concatenate(x) for x in (flags, bad, score, mask))
        fin = np.isfinite(sc)
        sc = np.where(fin, sc, (sc[fin].max() + 1.0) if fin.any() else 0.0)  # a map that cannot be re-synthesised ranks highest
        dr = detection_rates(f, b, m)
        auc_std = _fmt(detection_auc(np.concatenate(stdscore), b, m), "{:.2f}") if stdscore else "-"
        lines.append(f"| {s.label} | {100 * b.mean():.1f} | {100 * f.mean():.1f} | {_fmt(dr['sensitivity'], '{:.2f}')} | "
                     f"{_fmt(dr['specificity'], '{:.2f}')} | {_fmt(dr['precision'], '{:.2f}')} | "
                     f"{_fmt(detection_auc(sc, b, m), '{:.2f}')} | {auc_std} |")
    return "\n".join(lines)


def real_scan_section(data_dir: Path, specs: list[MethodSpec]) -> str | tuple[str, list, list[str]]:
    """Every method that can map the scans' protocol, sphere by sphere against the 1.5 T references."""
    from .evaluation import locate_spheres, sphere_table, table_summary
    from ..io import load_series
    from ..mapping import map_series
    from ..mapping.learned import PROTOCOL_FREE
    from ..data.phantoms import reference_values

    folders = sorted(p for p in Path(data_dir).glob("site*/plate*") if p.is_dir())
    if not folders:
        return f"No scan folders under {data_dir}: section skipped."
    lines = ["| scan | plate | " + " | ".join(f"{s.label}: 0.4-2 s mean abs. error (%) / mean CV (%)" for s in specs) + " |",
             "|---|---|" + "---|" * len(specs)]
    details, skipped = [], {}
    for folder in folders:
        series = load_series(folder)
        plate = "T1" if folder.name == "plate5" else "T2"
        ref = reference_values(plate, 1.5, 1)["T1_s"]
        cells = []
        for s in specs:
            if s.method not in (*CLASSICAL, "rim") and s.options.get("variant") not in PROTOCOL_FREE:
                # the fits, the physics-driven RIM and the protocol-free Diffusors map any protocol
                w = weights_for_protocol(s.method, series.protocol, fit_condition=s.key.endswith("_fit"))
                if w is None:
                    skipped.setdefault(s.label, set()).add(_timing(series.protocol))
                    cells.append("not run")
                    continue
                s = MethodSpec(s.key, s.label, s.method, {**s.options, "weights": str(w)})
            res = map_series(series, method=s.method, progress=False, **s.options)
            t1 = res.maps["T1"][:, :, 0]
            layout = locate_spheres(series.data[:, :, 0, :].transpose(2, 0, 1), series.voxel_size_mm[:2], plate=plate,
                                    t1_map=t1 if s.method == "mle" else None, reference_t1_s=ref)
            rows = sphere_table(t1, layout, ref)
            sm = table_summary(rows)["in_vivo_range"]
            cells.append(f"{sm['mean_abs_error_percent']:.1f} / {sm['mean_cv_percent']:.1f}")
            details.append((folder, s, rows))
        lines.append(f"| {folder.parent.name} | {folder.name} ({plate}) | " + " | ".join(cells) + " |")
    skipped = [f"{label} (no weights for {' or '.join(sorted(t))})" for label, t in sorted(skipped.items())]
    return "\n".join(lines), details, skipped


def real_scan_sphere_tables(details: list) -> str:
    """One sphere-by-sphere table per scan (ms): the reference and every method that mapped it, as
    ROI mean ± within-sphere std (error of the mean); bold: the 0.4-2 s spheres."""
    by_scan: dict = {}
    for folder, spec, rows in details:
        by_scan.setdefault(folder, []).append((spec, rows))
    out = []
    for folder, runs in by_scan.items():
        out += [f"#### {folder.parent.name} / {folder.name}", "",
                "| sphere | reference T1 (ms) | " + " | ".join(spec.label for spec, _ in runs) + " |",
                "|---:|---:|" + "---:|" * len(runs)]
        for k, ref_row in enumerate(runs[0][1]):
            cells = [str(ref_row["sphere"]), f"{ref_row['reference_ms']:.1f}"]
            cells += [f"{r[k]['mean_ms']:.0f} ± {r[k]['std_ms']:.0f} ({r[k]['error_percent']:+.1f} %)" for _, r in runs]
            out.append("| " + " | ".join(f"**{c}**" if ref_row["in_vivo_range"] else c for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def real_scan_verdict(details: list) -> str:
    """Per learned method, over the scans it mapped: the mean of the per-scan 0.4-2 s mean absolute T1
    errors, the classical fit's on the same scans and on how many scans it beats the fit, and the same
    against the TV-regularised fit where that ran (computed from the sphere tables)."""
    from .evaluation import table_summary

    err = {}
    for folder, spec, rows in details:
        err[(folder, spec.label)] = (spec.method, table_summary(rows)["in_vivo_range"]["mean_abs_error_percent"])
    fit = {f: e for (f, _), (m, e) in err.items() if m == "mle"}
    tv = {f: e for (f, _), (m, e) in err.items() if m == "tv"}
    labels = list(dict.fromkeys(label for (_, label), (m, _) in err.items() if m not in BASELINES))
    out = []
    for label in labels:
        mine = {f: e for (f, lab), (_, e) in err.items() if lab == label and f in fit}
        if not mine:
            continue
        wins = sum(e < fit[f] for f, e in mine.items())
        line = (f"{label}: {sum(mine.values()) / len(mine):.1f} % against the fit's "
                f"{sum(fit[f] for f in mine) / len(mine):.1f} % on the same {len(mine)} scan(s); "
                f"better than the fit on {wins} of them")
        both = {f: e for f, e in mine.items() if f in tv}
        if both:
            line += (f"; against the TV-regularised fit's {sum(tv[f] for f in both) / len(both):.1f} % "
                     f"({sum(both.values()) / len(both):.1f} % on the same {len(both)} scan(s)), better on "
                     f"{sum(e < tv[f] for f, e in both.items())} of them")
        out.append(line)
    if not out:
        return ""
    return ("Mean over scans of the 0.4-2 s mean absolute error: " + "; ".join(out) + ". The phantom's reference "
            "values are the measure; the learned models here are compact CPU-trained ones (see the bundles' docs).")


def _timing(protocol) -> str:
    """'TIs 50, 100, ... ms, TR 1 s' (TR listed per image when it varies)."""
    tis = ", ".join(f"{1000 * t:.0f}" for t in protocol.inversion_times_s)
    tr = protocol.repetition_time_s
    if tr is None:
        trs = "unknown TR"
    elif isinstance(tr, tuple) and len(set(tr)) > 1:
        trs = "TR " + ", ".join(f"{t:g}" for t in tr) + " s"
    else:
        trs = f"TR {float(tr[0] if isinstance(tr, tuple) else tr):g} s"
    return f"TIs {tis} ms, {trs}"


def real_scan_markdown(data_dir: Path, specs: list[MethodSpec]) -> list[str]:
    """Section 1 of the report (:data:`REAL_SCANS_HEAD`): every method on the real NIST scans, a summary table, the reasons a
    model did not run, and the sphere-by-sphere tables."""
    md = ["## 1. Real scans of the NIST phantom (1.5 T, TIs 50-800 ms; TR 1 s on GE and Philips, growing with TI "
          "to 2.46 s on Siemens)", ""]
    out = real_scan_section(data_dir, specs)
    if isinstance(out, str):
        return md + [out, ""]
    table, details, skipped = out
    md += ["Sphere ROIs located from the images; references: phantom version 1 at 1.5 T. Per scan the mean absolute "
           "T1 error and mean coefficient of variation over the spheres of 0.4-2 s.", "", table, ""]
    verdict = real_scan_verdict(details)
    if verdict:
        md += [verdict, ""]
    if skipped:
        md += ["Not run: " + "; ".join(skipped) + ". These models map only the protocol (inversion and "
               "repetition times) they were trained for, and no weights for that protocol are shipped. One command "
               "per model makes them, and this report then runs them (it finds them by their weights cards): "
               "`python -m monai.bundle run training --config_file bundles/<method>/configs/train.json "
               "--bundle_root bundles/<method> --protocol nist15 --n_images 6 --model_name model_nist15` (TR 1 s; "
               "for the Siemens scans' TR `--protocol nist15_variable_tr --model_name model_nist15_variable_tr`; "
               "for the fit-conditioned Diffusor add `--fit_condition True --fit_residual True` and a "
               "`model_fitcond_` name). The bundles' docs/README.md record the commands and budgets used for the "
               "shipped ones.", ""]
    return md + ["### Sphere by sphere", "", real_scan_sphere_tables(details)]


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or 'unknown model'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown model"


def update_real_scan_section(out_dir: str | Path = "docs", data_dir: str | Path | None = None, steps: int = 10,
                             samples: int = 10, methods: list[MethodSpec] | None = None) -> Path:
    """Regenerate only section 1 (real scans) of an existing ``out_dir/RESULTS.md`` in place, e.g. after
    training a model for the scans' protocol; the section says when and where it was regenerated, and
    the other sections keep the date of their own run."""
    import torch

    path = Path(out_dir) / "RESULTS.md"
    if not path.is_file():
        raise InputError(f"{path}: no report to update; run `qmri compare --out {out_dir}` first")
    text = path.read_text()
    head = REAL_SCANS_HEAD
    if text.count(head) != 1:
        raise ValueError(f"{path}: expected one section starting with {head!r}")
    i = text.index(head)
    j = text.find("\n## ", i + len(head))
    j = len(text) if j < 0 else j + 1
    specs = methods if methods is not None else default_methods(steps=steps, samples=samples)
    data_dir = Path(data_dir) if data_dir is not None else REPO.parent / "shared" / "data" / "nist_phantom_ir"
    md = real_scan_markdown(data_dir, specs)
    md.insert(2, f"This section alone was regenerated by `qmri compare --out {out_dir} --only real_scans` on "
                 f"{date.today()}, {platform.machine()} CPU ({_cpu_name()}), "
                 f"{torch.get_num_threads()} threads, torch {torch.__version__}; the other sections are from the run "
                 "dated at the top.")
    md.insert(3, "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text[:i] + "\n".join(md).rstrip("\n") + "\n\n" + text[j:])
    tmp.replace(path)
    return path


def weights_for_protocol(method: str, protocol, fit_condition: bool = False) -> Path | None:
    """The shipped weights of ``bundles/<method>`` that ``qmri map`` would choose for ``protocol``
    (:func:`custom_components.mapping.learned.choose_weights`; for the Diffusor restricted to the
    fit-conditioned or the images-only variant), or None where none was trained for it."""
    from ..mapping.learned import choose_weights

    variant = ("fit" if fit_condition else "images") if method == "diffusor" else None
    try:
        return choose_weights(REPO / "bundles" / method, method, protocol, variant=variant)[0]
    except InputError:
        return None


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def speed_probe(method: str, slices: int, options: dict) -> dict:
    """Seconds to map ``slices`` twin slices (loading the model included) and the peak resident
    memory of this process while mapping (MB; Linux: the peak is reset after the input is built)."""
    import gc

    import torch

    from ..mapping import map_series

    torch.set_num_threads(int(options.pop("threads", 2)))
    c = twin_case(50.0)
    series = c.series()
    series.data = np.repeat(series.data, slices, axis=2)
    mask = np.repeat(c.mask[:, :, None], slices, axis=2)
    if method in ("mle", "rim"):
        options.setdefault("sigma", c.sigma)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass
    t = time.perf_counter()
    res = map_series(series, method=method, mask=mask, progress=False, **options)
    dt = time.perf_counter() - t
    return {"seconds": dt, "peak_rss_mb": _peak_rss_mb(),
            "info": {k: v for k, v in res.info.items() if isinstance(v, (int, float, str, bool))}}


def measure_speed(spec: MethodSpec, slices: int, threads: int = 2) -> dict:
    """:func:`speed_probe` in a fresh Python process (so the peak memory is the method's own)."""
    opts = {**spec.options, "threads": threads}
    code = ("import json,sys; from custom_components.reporting.comparison import speed_probe; "
            f"print('RESULT' + json.dumps(speed_probe({spec.method!r}, {int(slices)}, {opts!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    for line in r.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"speed probe of {spec.key} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


# ----------------------------------------------------------------------------------------- figures
def _figure(path: Path, panels: list[list[tuple]], title: str):
    """panels: rows of (image, title, cmap, vmin, vmax, units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(nr, nc, figsize=(2.3 * nc, 2.3 * nr), squeeze=False)
    for i, row in enumerate(panels):
        for j in range(nc):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(row) or row[j] is None:
                continue
            img, t, cmap, vmin, vmax, units = row[j]
            im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(t, fontsize=7)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.ax.tick_params(labelsize=6)
            cb.set_label(units, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def map_figure(path: Path, case: Case, results: dict[str, Result], specs: list[MethodSpec], title: str, t1_max_s: float = 2.5):
    from cmcrameri import cm

    m = case.mask

    def masked(x):
        return np.where(m, x, np.nan)

    safe_t1 = np.where(m, case.truth[0], 1.0)
    row_t1 = [(masked(case.truth[0]), "truth T1", cm.lipari, 0, t1_max_s, "s")]
    row_pd = [(masked(case.truth[1]), "truth PD", "gray", 0, 1.1, "a.u.")]
    row_err = [None]
    row_std = [None]
    for s in specs:
        if s.key not in results:
            continue
        r = results[s.key]
        row_t1.append((masked(r.maps["T1"]), s.label + " T1", cm.lipari, 0, t1_max_s, "s"))
        row_pd.append((masked(r.maps["PD"]), s.label + " PD", "gray", 0, 1.1, "a.u."))
        row_err.append((masked(100 * (r.maps["T1"] - case.truth[0]) / safe_t1), s.label + " T1 error", "RdBu_r", -30, 30, "%"))
        row_std.append((masked(r.maps["T1_std"]), s.label + " T1 std", "magma", 0, 0.3, "s") if "T1_std" in r.maps else None)
    rows = [row_t1, row_pd, row_err] + ([row_std] if any(x is not None for x in row_std) else [])
    _figure(path, rows, title)


# --------------------------------------------------------------------------------------- the report
def run_comparison(out_dir: str | Path = "docs", brain_slices: int = 4, low_snr: float = 20.0, steps: int = 10,
                   samples: int = 10, ddpm_crop: int = 40, data_dir: str | Path | None = None, speed: bool = True,
                   methods: list[MethodSpec] | None = None, log=print) -> Path:
    """Regenerate ``out_dir/RESULTS.md`` and ``out_dir/figures/`` from scratch; returns the report path."""
    import torch

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    specs = methods if methods is not None else default_methods(steps=steps, samples=samples)
    t_start = time.perf_counter()
    data_dir = Path(data_dir) if data_dir is not None else REPO.parent / "shared" / "data" / "nist_phantom_ir"
    md = ["# Results: the classical fit, the ResNet, the RIM and the Diffusor on the same data", "",
          f"Regenerated by `qmri compare --out {out_dir}` (brain slices {brain_slices}, low SNR {low_snr:g}, "
          f"Diffusor {samples} samples x {steps} DPM-Solver++ steps) on {date.today()}, {platform.machine()} CPU, "
          f"{torch.get_num_threads()} threads, Python {platform.python_version()}, torch {torch.__version__}. "
          "Every number below comes from this one command with the shipped weights. Sections 1-3 are data nothing "
          "was chosen on: the real scans, the held-out brain slices, and the robustness suite. Section 4 is the "
          "development scene: the Diffusor's training stage and self-ensemble were chosen on its SNR 50 twin "
          "(bundles/diffusor/docs/README.md), so those numbers are not a test. Every learned method stands beside "
          "two classical baselines: the plain fit and the TV-regularised fit (docs/physics.md). PD and B of every method are the TR-corrected ones of the "
          "full signal model (docs/physics.md, 'Parameter convention'); the Diffusor's mean and std are taken over "
          "ensemble members clamped to their median +- 4 MAD-sigma (bundles/diffusor/docs/README.md, 'Ensemble "
          "statistics').", ""]
    methods_line = len(md)  # filled in after the twin's maps: the Diffusor's ensemble settings come from its results
    md += ["", ""]

    # 1. real scans (nothing was chosen on them)
    md += real_scan_markdown(data_dir, specs)

    # 2. brain (held-out seed)
    cases = brain_cases(brain_slices)
    brain_res = []
    for c in cases:
        r = {}
        for s in specs:
            log(f"{c.name}: {s.label}")
            r[s.key] = run_method(c, s)
        brain_res.append(r)
    text, brain_summ = brain_section(cases, brain_res, specs)
    md += ["## 2. Synthetic brains, held out (the paper's Fig. 3, with numbers)", "",
           f"{brain_slices} slices of the embedded anatomy with deformations, tissue values and noise from seed {TEST_SEED} "
           "(training: seed 0, validation: 100003), SNR 50, echo-train blurring. Scores in the label mask (tissue with "
           "PD >= 0.1), averaged over slices; NRMSE = ||estimate - truth|| / ||truth||; SSIM of Wang et al. 2004 "
           "(Gaussian window 1.5 px) averaged over the mask; bias = mean estimate - mean truth per tissue class.", "", text, ""]
    md += [*brain_verdicts(brain_summ, specs), ""]
    map_figure(fig_dir / "brain.png", cases[0], brain_res[0], specs, cases[0].name, t1_max_s=4.5)
    md += ["![brain](figures/brain.png)", ""]

    # 3. the robustness suite (another command)
    md += ["## 3. The robustness suite", "",
           "Scenes drawn independently of the training data (NIST-like plates of varied layout, size, walls, fill, "
           "matrix and B field; Rician and noncentral-chi noise; brain slices from unseen anatomy seeds, with lesions), "
           "split by seed into a validation half (the only one any choice may look at) and a test half (only reported), "
           "scored on inner ROIs and tissue masks for every method beside both classical baselines: "
           "[ROBUSTNESS.md](ROBUSTNESS.md), written by `qmri robustness --out docs` (not by this command).", ""]

    # 4. the development scene: the twin
    md += ["## 4. The development scene: the digital NIST twin (the paper's Table 1)", "",
           "The Diffusor's training stage and self-ensemble were chosen on the SNR 50 twin (bundles/diffusor/docs/"
           "README.md): read its numbers as development results, not as a test. "
           "T1 plate (3 T reference), paper protocol (7 TIs, TR 10 s, ETL 64) with echo-train blurring, Rician noise, "
           "smooth inversion efficiency B in 1.8-2.0, 240 x 240 over 250 mm. Cells: ROI mean ± within-sphere std (ms) and "
           "the error of the mean. Bold: the 0.4-2 s spheres (the brain's range, as in the paper). On synthetic data the "
           "classical fits and the RIM are given the true noise level; on the real scans they estimate it from the background.", ""]
    twin_summ = {}
    for snr in (50.0, low_snr):
        case = twin_case(snr)
        res = {}
        for s in specs:
            log(f"twin SNR {snr:g}: {s.label}")
            res[s.key] = run_method(case, s)
        if snr == 50.0:
            md[methods_line] = methods_sentence(specs, res)
        text, summ = phantom_section(case, res, specs)
        twin_summ[snr] = summ
        md += [f"### SNR {snr:g}" + (" (where the Diffusor's settings were chosen)" if snr == 50.0 else ""), "", text, ""]
        map_figure(fig_dir / f"twin_snr{snr:g}.png", case, res, specs, f"Digital NIST twin, SNR {snr:g}")
        md += [f"![twin SNR {snr:g}](figures/twin_snr{snr:g}.png)", ""]
    md += ["### Where each method beats or loses to the classical baselines (SNR 50, the development scene)", "",
           *verdicts(twin_summ[50.0], specs), ""]

    # 5. uncertainty
    md += ["## 5. Uncertainty and physics consistency", ""]
    cal = brain_cases(1, seed=CALIBRATION_SEED)[0]
    unc_lines = ["| Diffusor | sampler | voxels | Pearson / Spearman of std with abs. error | coverage 1 std / 2 std | "
                 "median std / T1 | AUC of std / T1 for large errors | calibration factor (fitted on another slice) | "
                 "coverage 1 / 2 std after calibration |", "|---|---|---|---|---|---|---|---|---|"]
    from .map_metrics import calibration_factor

    for s in specs:
        if s.method != "diffusor":
            continue
        log(f"calibration slice: {s.label}")
        rc = run_method(cal, s)
        f = calibration_factor(cal.truth[0], rc.maps["T1"], rc.maps["T1_std"], cal.mask)
        u = uncertainty_rows(cases, [r[s.key] for r in brain_res], f)
        unc_lines.append(_unc_row(s.label, f"DPM-Solver++ {steps} steps", u, f))
        # the full chain on a crop of the first test slice, against the few-step sampler on the same crop
        crop, _ = crop_case(cases[0], ddpm_crop)
        full = MethodSpec(s.key + "_ddpm", s.label, "diffusor", {**s.options, "sampler": "ddpm", "steps": None})
        few = MethodSpec(s.key + "_few", s.label, "diffusor", dict(s.options))
        log(f"full DDPM on a {ddpm_crop} x {ddpm_crop} crop: {s.label}")
        r_full, r_few = run_method(crop, full), run_method(crop, few)
        unc_lines.append(_unc_row(s.label, f"full DDPM (1000 steps), {ddpm_crop} x {ddpm_crop} crop of slice 1 "
                                  f"({r_full.seconds:.0f} s)", uncertainty_rows([crop], [r_full])))
        unc_lines.append(_unc_row(s.label, f"DPM-Solver++ {steps} steps, the same crop", uncertainty_rows([crop], [r_few])))
    md += ["### The Diffusor's ensemble std against its error (T1, brain test slices)", "",
           "Coverage: fraction of voxels whose true T1 lies within k ensemble std of the ensemble mean (a calibrated "
           "Gaussian posterior gives 0.68 / 0.95). The calibration factor scales the std so that 68 % are covered on a "
           f"separate slice (seed {CALIBRATION_SEED}); it is then applied unchanged to the test slices.", "",
           "\n".join(unc_lines), ""]
    md += ["### The physics-consistency flag", "",
           "For every method, the measured images are compared with images re-synthesised from its maps; a voxel is "
           "flagged when the sum over TIs of ((data - E|S|) / sigma)^2 exceeds the chi-square quantile at 1 - 0.001 "
           f"(`qmri map` writes it as ResidualFlag.nii.gz). Large error: |T1 error| > {100 * LARGE_ERROR:.0f} %. "
           "AUC: how well the residual (or the Diffusor's relative std) ranks the voxels with large error above the "
           "others (0.5 = chance). Brain test slices, noise sigma known.", "",
           flag_rows(cases, brain_res, specs), ""]

    # 6. speed
    if speed:
        md += ["## 6. Speed and memory (CPU)", "",
               "One fresh process per measurement maps 1 or 2 slices of the 240 x 240 twin with 2 threads; the times "
               "include loading the model, so the second slice's cost is the difference. Peak memory: the process's "
               "peak resident set size while mapping (Python, torch and the model included).", "",
               "| method | network evaluations per slice | seconds, 1 slice | seconds, 2 slices | each further slice (s) | peak memory (MB) |",
               "|---|---|---|---|---|---|"]
        for s in specs:
            log(f"speed: {s.label}")
            one, two = measure_speed(s, 1), measure_speed(s, 2)
            evals = _evaluations(s, one["info"])
            md.append(f"| {s.label} | {evals} | {one['seconds']:.1f} | {two['seconds']:.1f} | "
                      f"{further_slice_seconds(one['seconds'], two['seconds'])} | {max(one['peak_rss_mb'], two['peak_rss_mb']):.0f} |")
        md += ["", "No GPU was used for this report.", ""]
    md += [f"Total time of this run: {(time.perf_counter() - t_start) / 60:.1f} min.", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "RESULTS.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md))
    tmp.replace(path)
    return path


def further_slice_seconds(one_slice_s: float, two_slices_s: float) -> str:
    """The cost of each further slice (s): the difference of two timed runs, each including the
    model's loading. When the second run was the faster one the difference is timing noise, not a
    negative cost, and the cell says so instead of printing a negative time."""
    diff = two_slices_s - one_slice_s
    if diff < 0.05:
        return "< 0.1 (timing noise)"
    return f"{diff:.1f}"


def methods_sentence(specs: list[MethodSpec], results: dict) -> str:
    """The report's list of methods, with each one's weights and, for the Diffusor, the frames its
    ensemble members were drawn in (from the ``info`` of its results)."""
    parts = []
    for s in specs:
        extra = [Path(s.options["weights"]).name] if "weights" in s.options else []
        info = results[s.key].info if s.key in results else {}
        if s.method == "diffusor" and info.get("symmetry") not in (None, "none"):
            extra.append(f"members in the {info['symmetry']} frames of the grid")
        parts.append(f"**{s.label}** (`{s.method}`" + "".join(", " + e for e in extra) + ")")
    return "Methods: " + "; ".join(parts) + "."


def _unc_row(label, sampler, u, factor=None):
    cov = u["coverage"]
    c1, c2 = cov.get(1.0, float("nan")), cov.get(2.0, float("nan"))
    cal = "-" if factor is None else f"{factor:.2f}"
    cc = u.get("coverage_calibrated")
    ccs = "-" if cc is None else f"{cc.get(1.0):.2f} / {cc.get(2.0):.2f}"
    return (f"| {label} | {sampler} | {u['n']} | {u['corr']['pearson']:.2f} / {u['corr']['spearman']:.2f} | "
            f"{c1:.2f} / {c2:.2f} | {100 * u['median_rel_std']:.1f} % | {_fmt(u['auc'], '{:.2f}')} | {cal} | {ccs} |")


def _evaluations(spec: MethodSpec, info: dict) -> str:
    if spec.method == "diffusor":
        n = info.get("n_samples", spec.options.get("samples", 10))
        k = info.get("network_evaluations_per_sample", spec.options.get("steps"))
        return f"{n} x {k} = {int(n) * int(k)} (batched)"
    if spec.method == "rim":
        return str(info.get("n_steps", 9))
    if spec.method == "resnet":
        return "1"
    return "0 (iterative fit)"


def brain_verdicts(summ: dict, specs: list[MethodSpec]) -> list[str]:
    """Plain sentences from the brain summary: each learned method's T1 and PD NRMSE against the
    classical fit's and, where it ran, the TV-regularised fit's."""
    base = summ.get("mle")
    if base is None:
        return []
    out = []
    tv = summ.get("tv")
    for s in specs:
        if s.key in BASELINES or s.key not in summ:
            continue
        sm = summ[s.key]
        parts = [f"T1 NRMSE {sm['t1_nrmse']:.3f} against the classical fit's {base['t1_nrmse']:.3f}"
                 + ("" if tv is None else f" and the TV-regularised fit's {tv['t1_nrmse']:.3f}"),
                 f"PD NRMSE {sm['pd_nrmse']:.3f} against {base['pd_nrmse']:.3f}" + ("" if tv is None else f" and {tv['pd_nrmse']:.3f}")]
        better = [name for name, b in (("the classical fit", base), ("the TV-regularised fit", tv))
                  if b is not None and sm["t1_nrmse"] < b["t1_nrmse"]]
        verdict = ("better in T1 than " + " and ".join(better)) if better else "better in T1 than neither baseline"
        out.append(f"- **{s.label}**: " + "; ".join(parts) + f": {verdict}.")
    return out


def verdicts(summ: dict, specs: list[MethodSpec]) -> list[str]:
    """Plain sentences from the SNR-50 twin numbers: where each learned method beats or loses to the
    classical fit and, where it ran, to the TV-regularised fit."""
    base = summ.get("mle")
    if base is None:
        return []
    out = []
    for s in specs:
        if s.key in BASELINES or s.key not in summ:
            continue
        sm = summ[s.key]
        acc = "beats" if sm["mean_abs_err"] < base["mean_abs_err"] else "loses to"
        sel = base["in_range"]
        prec = sum(sm["std_ms"][k] < base["std_ms"][k] for k in sel)
        short = "beats" if sm["short_mean_abs_err"] < base["short_mean_abs_err"] else "loses to"
        line = (f"- **{s.label}**: in accuracy on the 0.4-2 s spheres it {acc} the classical fit (mean abs. error "
                f"{sm['mean_abs_err']:.1f} % vs {base['mean_abs_err']:.1f} %, max {sm['max_abs_err']:.1f} % vs "
                f"{base['max_abs_err']:.1f} %); its within-sphere std is lower in {prec} of {len(sel)} of those spheres; "
                f"for 0.1-0.4 s it {short} the fit (mean abs. error {sm['short_mean_abs_err']:.1f} % vs "
                f"{base['short_mean_abs_err']:.1f} %).")
        tv = summ.get("tv")
        if tv is not None:
            line += (f" Against the TV-regularised fit it {'beats' if sm['mean_abs_err'] < tv['mean_abs_err'] else 'loses to'} "
                     f"it on the 0.4-2 s spheres ({sm['mean_abs_err']:.1f} % vs {tv['mean_abs_err']:.1f} %, max "
                     f"{sm['max_abs_err']:.1f} % vs {tv['max_abs_err']:.1f} %), its within-sphere std is lower in "
                     f"{sum(sm['std_ms'][k] < tv['std_ms'][k] for k in sel)} of {len(sel)}, and for 0.1-0.4 s it "
                     f"{'beats' if sm['short_mean_abs_err'] < tv['short_mean_abs_err'] else 'loses to'} it "
                     f"({sm['short_mean_abs_err']:.1f} % vs {tv['short_mean_abs_err']:.1f} %).")
        out.append(line)
    return out


__all__ = ["MethodSpec", "Case", "default_methods", "further_slice_seconds", "methods_sentence", "twin_case", "brain_cases", "run_method", "run_comparison",
           "phantom_section", "brain_section", "brain_verdicts", "uncertainty_rows", "flag_rows", "verdicts", "speed_probe",
           "BASELINES", "REAL_SCANS_HEAD"]
