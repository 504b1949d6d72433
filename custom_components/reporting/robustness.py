"""The robustness suite's runner and report: ``qmri robustness`` -> docs/ROBUSTNESS.md (issue 20).

Every scene of one split of :func:`custom_components.data.scenes.robustness_scenes` (NIST-like plates
with another layout, sphere size, walls, fill, B field, noise and echo train than the project's twin,
and brain slices from anatomy seeds never used in training, in each protocol) is mapped once by every
method (:data:`METHODS`: the classical ML fit, the TV-regularised fit, the default Diffusor, the
Diffusor without data consistency, the paper's images-only Diffusor, the ResNet and the RIM), with
the scene's noise level and noise model given (Rician or noncentral chi of ``n_coils`` coils).

Scores are on the scenes' inner ROIs (each sphere's disk eroded by 2 px; brain tissue masks), per ROI
(:func:`roi_scores`):

- bias % = 100 (mean of the map over the ROI - mean of the true T1 over the ROI) / that mean (on a
  plate's inner ROI the true T1 is the sphere's reference value at every voxel);
- within-ROI std (sample std, ddof 1) in s and in % of the reference;
- NRMSE = ||map - truth|| / ||truth|| over the ROI voxels; n voxels;
- CRLB/T1 (:func:`roi_crlb`): the Cramér-Rao bound of one voxel's T1 at the ROI's mean true (T1, PD,
  B) for the scene's protocol and noise level, Gaussian noise of std sigma (for noncentral chi the
  effective sigma of the root-sum-of-squares magnitude at high SNR, which is the per-coil sigma: each
  coil carries signal / sqrt(n)). Where CRLB/T1 > 10 % (:data:`CRLB_LIMIT`) the protocol does not
  determine T1 there: the ROI is listed with the note "not determined", and left out of the band
  summaries (issue 20 item 4).

T1 bands (:data:`BANDS`): below 0.1 s, 0.1-0.4 s, 0.4-2 s (both ends included) and above 2 s, each
reported separately. Targets (:func:`target_misses`, issue 20 "Done when"), per plate sphere and
learned method: 0.4-2 s within 2 % at SNR >= 30 and within 3 % at SNR 15-30, with a within-ROI std
below the classical fit's on the same ROI; 0.1-0.4 s within 5 % where the CRLB determines T1.

Uncertainty (Diffusor, brains, T1, voxels of the tissue ROIs): coverage of |error| <= k c std for
k = 1, 2 and the Spearman correlation of std with |error|; c (:func:`calibration_factor`) is fitted on
the validation half's brains and only applied to the test half.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..io import InputError
from .comparison import Case, MethodSpec, _cpu_name, map_figure, run_method

CRLB_LIMIT = 0.10  # CRLB/T1 above this: "not determined"
NOT_DETERMINED = "not determined"
BANDS = (("below 0.1 s", 0.0, 0.1), ("0.1-0.4 s", 0.1, 0.4), ("0.4-2 s", 0.4, 2.0), ("above 2 s", 2.0, math.inf))
BRAIN_TISSUES = ("WM", "GM", "CSF", "lesion")
NO_IMAGES_WEIGHTS = "no shipped weights for this protocol"

#: key -> (label, map_series method, options). "diffusor" is what ``qmri map --method diffusor`` does.
METHODS = {
    "mle": ("classical fit (ML)", "mle", {}),
    "tv": ("TV-regularised fit", "tv", {}),
    "diffusor": ("Diffusor (default)", "diffusor", {}),
    "diffusor_fit": ("Diffusor, protocol-specific (images + fit)", "diffusor", {"variant": "fit"}),
    "diffusor_nodc": ("Diffusor without DC", "diffusor", {"dc": 0}),
    "diffusor_images": ("Diffusor (images only, the paper's)", "diffusor", {"variant": "images"}),
    "diffusor_prior": ("Diffusor, prior over maps (any protocol)", "diffusor", {"variant": "prior"}),
    "diffusor_crlb": ("Diffusor, fit + CRLB (any protocol)", "diffusor", {"variant": "crlb"}),
    "resnet": ("ResNet", "resnet", {}),
    "rim": ("RIM", "rim", {}),
}
BASELINES = ("mle", "tv")


def method_specs(keys=None) -> list[MethodSpec]:
    """The :class:`MethodSpec` of each key of :data:`METHODS` (default: all), in that order."""
    keys = list(METHODS) if keys is None else list(keys)
    bad = [k for k in keys if k not in METHODS]
    if bad:
        raise InputError(f"--methods: unknown method {bad[0]!r}; available: {', '.join(METHODS)}")
    if not keys:
        raise InputError("--methods: no method given")
    return [MethodSpec(k, METHODS[k][0], METHODS[k][1], dict(METHODS[k][2])) for k in METHODS if k in keys]


# -------------------------------------------------------------------------------------- scoring
def band_of(t1_s: float) -> str:
    """The name of the T1 band of :data:`BANDS` holding ``t1_s`` (0.4 and 2 s belong to 0.4-2 s)."""
    if t1_s < 0.1:
        return BANDS[0][0]
    if t1_s < 0.4:
        return BANDS[1][0]
    if t1_s <= 2.0:
        return BANDS[2][0]
    return BANDS[3][0]


def roi_scores(t1_map, truth_t1, roi) -> dict:
    """Scores of a T1 map (s) on one ROI against the true T1 map: ``n``, ``reference`` (mean true T1),
    ``mean``, ``bias_pct`` (100 (mean - reference) / reference), ``std_s`` (ddof 1; NaN for one
    voxel), ``std_pct`` (100 std / reference), ``nrmse`` (||map - truth|| / ||truth|| over the ROI).
    Raises ValueError for an empty ROI or shapes that differ."""
    roi = np.asarray(roi, dtype=bool)
    t1_map, truth_t1 = np.asarray(t1_map, dtype=float), np.asarray(truth_t1, dtype=float)
    if t1_map.shape != roi.shape or truth_t1.shape != roi.shape:
        raise ValueError(f"shape mismatch: map {t1_map.shape}, truth {truth_t1.shape}, roi {roi.shape}")
    if not roi.any():
        raise ValueError("the ROI selects no voxel")
    p, t = t1_map[roi], truth_t1[roi]
    ref = float(t.mean())
    mean = float(p.mean())
    std = float(np.std(p, ddof=1)) if p.size > 1 else float("nan")
    return {"n": int(p.size), "reference": ref, "mean": mean, "bias_pct": 100.0 * (mean - ref) / ref,
            "std_s": std, "std_pct": 100.0 * std / ref,
            "nrmse": float(np.sqrt(np.sum((p - t) ** 2)) / np.sqrt(np.sum(t * t)))}


def roi_crlb(t1_s: float, pd: float, b: float, protocol, sigma: float) -> float:
    """CRLB/T1 of one voxel at (T1, PD, B) for ``protocol``, Gaussian noise of std ``sigma`` (all three
    parameters free; :func:`custom_components.physics.signal_model.crlb`)."""
    import torch

    from ..physics.signal_model import crlb

    p = torch.tensor([[float(t1_s), float(pd), float(b)]], dtype=torch.float64)
    return float(crlb(p, protocol, float(sigma), dim=-1)[0, 0]) / float(t1_s)


def effective_sigma(noise: str, sigma: float, n_coils: int = 1) -> float:
    """The std of the magnitude at high SNR: sigma for Rician data, and also for the root-sum-of-squares
    of ``n_coils`` coils that each carry signal / sqrt(n) (the noise along the signal direction of the
    combined magnitude has std sigma); the noise floor near the nulls is not in it."""
    if noise not in ("rician", "ncchi", "gaussian"):
        raise ValueError(f"unknown noise model {noise!r}")
    return float(sigma)


def determined(crlb_rel: float) -> bool:
    """True where the protocol determines T1: CRLB/T1 <= :data:`CRLB_LIMIT`."""
    return bool(np.isfinite(crlb_rel) and crlb_rel <= CRLB_LIMIT)


def target_pct(band: str, snr: float) -> float | None:
    """The |bias| target (%) of issue 20 for a plate sphere in ``band`` at ``snr``; None: no target."""
    if band == "0.4-2 s":
        if snr >= 30:
            return 2.0
        if snr >= 15:
            return 3.0
        return None
    if band == "0.1-0.4 s":
        return 5.0
    return None


def within_bias_target(row: dict, snr: float) -> bool:
    """A plate ROI row (:func:`score_scene`) is within its issue-20 bias target at ``snr`` (needs a target:
    :func:`target_pct` not None)."""
    return abs(row["bias_pct"]) <= target_pct(row["band"], snr)


def target_sphere_rows(runs, key: str, band: str = "0.4-2 s") -> list[tuple]:
    """(scene, row, fit row) for every plate ROI of method ``key`` in ``band`` that has a target at its scene's
    SNR, over :class:`SceneRun` s ``runs``; the fit row is the classical fit's ("mle") for the same ROI, None
    where the run has none."""
    out = []
    for r in runs:
        if r.scene.kind != "plate" or key not in r.rows:
            continue
        fit = {x["roi"]: x for x in r.rows.get("mle", [])}
        out += [(r.scene, x, fit.get(x["roi"])) for x in r.rows[key]
                if x["band"] == band and target_pct(band, r.scene.snr) is not None]
    return out


def mean_standard_error_pct(row: dict) -> float | None:
    """The standard error of an ROI's mean T1 as a % of the reference, std / sqrt(n) (None without ``n``).
    It assumes independent voxels: true for the per-voxel fit; for a method that smooths (the TV fit, a
    network) neighbouring errors are correlated and the true standard error is larger."""
    n = row.get("n")
    if not n or "std_s" not in row:
        return None
    return 100.0 * float(row["std_s"]) / math.sqrt(int(n)) / float(row["reference"])


def target_misses(rows: list[dict], fit_rows: list[dict] | None, snr: float) -> list[str]:
    """Plain sentences for every plate ROI where a learned method misses a target: ``rows`` and
    ``fit_rows`` are the scene's ROI rows (:func:`score_scene`) of the method and of the classical
    fit. 0.4-2 s: |bias| within 2 % (SNR >= 30) or 3 % (SNR 15-30), and a within-ROI std below the
    fit's; 0.1-0.4 s: |bias| within 5 % where the CRLB determines T1 (else no target)."""
    fit = {r["roi"]: r for r in (fit_rows or [])}
    out = []
    for r in rows:
        tgt = target_pct(r["band"], snr)
        if tgt is None or (r["band"] == "0.1-0.4 s" and not r["determined"]):
            continue
        why = []
        if not abs(r["bias_pct"]) <= tgt:
            se = mean_standard_error_pct(r)
            why.append(f"bias {r['bias_pct']:+.1f} %" + ("" if se is None else f" ± {se:.1f} %") + f" (target within {tgt:g} %)")
        if r["band"] == "0.4-2 s" and r["roi"] in fit:
            if not r["std_s"] < fit[r["roi"]]["std_s"]:
                why.append(f"within-ROI std {1000 * r['std_s']:.1f} ms, not below the fit's {1000 * fit[r['roi']]['std_s']:.1f} ms")
        if why:
            nd = "" if r["determined"] else f", {NOT_DETERMINED}: CRLB/T1 {r['crlb_pct']:.0f} %"
            out.append(f"{r['roi']} (T1 {1000 * r['reference']:.0f} ms{nd}): " + "; ".join(why))
    return out


def score_scene(scene, t1_map) -> list[dict]:
    """One row per ROI of ``scene`` for a T1 map: :func:`roi_scores` plus ``roi``, ``band`` (of the
    scene's reference T1 of the ROI), ``crlb_pct`` and ``determined``."""
    sig = effective_sigma(scene.noise, scene.sigma, scene.n_coils)
    rows = []
    for name, roi in scene.rois.items():
        roi = np.asarray(roi, bool)
        if not roi.any():
            continue
        s = roi_scores(t1_map, scene.truth[0], roi)
        pd, b = float(scene.truth[1][roi].mean()), float(scene.truth[2][roi].mean())
        c = roi_crlb(s["reference"], pd, b, scene.protocol, sig)
        rows.append({"roi": name, "reference_t1_s": float(scene.roi_t1_s.get(name, s["reference"])),
                     "band": band_of(float(scene.roi_t1_s.get(name, s["reference"]))), **s,
                     "crlb_pct": 100.0 * c, "determined": determined(c)})
    return rows


def uncertainty_voxels(scene, maps: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true T1, mean T1, std T1) over the union of a brain scene's tissue ROIs (1-D arrays)."""
    m = np.zeros(scene.mask.shape, bool)
    for name in BRAIN_TISSUES:
        if name in scene.rois:
            m |= np.asarray(scene.rois[name], bool)
    return scene.truth[0][m], np.asarray(maps["T1"])[m], np.asarray(maps["T1_std"])[m]


def _pool(samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, mu, sd = (np.concatenate([np.ravel(np.asarray(s[i], dtype=float)) for s in samples]) for i in range(3))
    ok = np.isfinite(t) & np.isfinite(mu) & np.isfinite(sd) & (sd > 0)
    if not ok.any():
        raise ValueError("no voxel with finite values and std > 0")
    return t[ok], mu[ok], sd[ok]


def calibration_factor(results, target: float = 0.6827) -> float:
    """The factor c for which |error| <= c std holds for a fraction ``target`` (one Gaussian std) of the
    voxels: the ``target`` quantile of |truth - mean| / std pooled over ``results``, an iterable of
    (true T1, mean T1, std T1) arrays (e.g. :func:`uncertainty_voxels` of the validation brains).
    Calibrated Gaussian errors give c -> 1; a std half the true spread gives c -> 2."""
    t, mu, sd = _pool(results)
    return float(np.quantile(np.abs(t - mu) / sd, target))


ORACLE_DRAWS = 20  # Monte Carlo draws of :func:`oracle_spearman`


def oracle_spearman(sd: np.ndarray, draws: int = ORACLE_DRAWS, seed: int = 0) -> float:
    """The Spearman correlation of ``sd`` with |error| that a perfectly calibrated Gaussian posterior
    with exactly these stds would reach: errors drawn as sd z, z ~ N(0, 1), the mean over ``draws``
    Monte Carlo draws (fixed seed). It is below 1 even then, and near 0 where the std hardly varies
    between the voxels (a half-normal |error| is as spread as its scale): the ceiling of the Spearman
    target for the std as it is."""
    from scipy import stats

    sd = np.asarray(sd, dtype=float).ravel()
    if sd.size < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.mean([stats.spearmanr(sd, np.abs(sd * rng.standard_normal(sd.size))).statistic
                          for _ in range(int(draws))]))


def uncertainty_scores(results, factor: float | None = None) -> dict:
    """Coverage of |error| <= k c std (k = 1, 2; c = ``factor``, None = 1), Spearman correlation of
    std with |error|, its ceiling for these stds (:func:`oracle_spearman`), and the voxel count, pooled
    over ``results`` as in :func:`calibration_factor`."""
    from scipy import stats

    t, mu, sd = _pool(results)
    c = 1.0 if factor is None else float(factor)
    err = np.abs(t - mu)
    rho = float(stats.spearmanr(sd, err).statistic) if t.size > 1 else float("nan")
    return {"coverage_1": float(np.mean(err <= c * sd)), "coverage_2": float(np.mean(err <= 2 * c * sd)),
            "spearman": rho, "spearman_oracle": oracle_spearman(sd), "n": int(t.size), "factor": c}


def std_calibration_entries(runs, key: str, command: str, date: str) -> dict[str, dict]:
    """The ``std_calibration.json`` entry of every weights file that method ``key`` ran with on the brain
    scenes of ``runs`` (:class:`SceneRun`): the factor c that makes the 1-std coverage of the T1 error 68 %
    (:func:`calibration_factor`, on the std before any calibration the run applied), the settings it was
    fitted with (:data:`custom_components.mapping.learned.CALIBRATION_SETTINGS`, from the run's info), the
    coverage before and after, and ``command`` / ``date``."""
    from ..mapping.learned import CALIBRATION_SETTINGS

    by_weights, infos = {}, {}
    for r in runs:
        res = r.results.get(key)
        if r.scene.kind != "brain" or res is None or "T1_std" not in res.maps:
            continue
        wfile = res.info["weights"]["File"]
        t, mu, sd = uncertainty_voxels(r.scene, res.maps)
        applied = (res.info.get("std_calibration") or {}).get("factor", 1.0)  # fit on the uncalibrated std
        by_weights.setdefault(wfile, []).append((t, mu, sd / applied))
        infos[wfile] = res.info
    out = {}
    for wfile, samples in by_weights.items():
        info = infos[wfile]
        dc = info.get("data_consistency") or {}
        c = calibration_factor(samples)
        out[wfile] = {"factor": round(c, 4), "dc_strength": dc.get("strength", 0.0), "dc_crlb_factor": dc.get("crlb_factor", 0.0),
                      **{k: info.get(k) for k in CALIBRATION_SETTINGS[2:]},
                      "fitted_on": f"validation half of the robustness suite (seed {_split_seeds()['validation']}), "
                                   f"{len(samples)} brain scene(s)",
                      "before": uncertainty_scores(samples), "after": uncertainty_scores(samples, c),
                      "command": command, "date": date}
    return out


# -------------------------------------------------------------------------------------- running
@dataclass
class SceneRun:
    scene: object
    results: dict = field(default_factory=dict)  # method key -> Result
    notes: dict = field(default_factory=dict)  # method key -> why it did not run (bad input for it)
    rows: dict = field(default_factory=dict)  # method key -> score_scene rows


def scene_case(scene) -> Case:
    return Case(scene.name, scene.images, scene.protocol, np.asarray(scene.mask, bool), scene.truth, scene.sigma,
                {}, tuple(scene.pixel_spacing_mm))


def run_scene(scene, specs: list[MethodSpec], log=print) -> SceneRun:
    """Map ``scene`` once with each method (noise model and sigma of the scene given) and score it.
    A method that refuses the scene as bad input for it (no weights for the protocol, the TV fit on
    multi-coil data) gets a note instead of maps; any other error is a bug and propagates."""
    run = SceneRun(scene)
    case = scene_case(scene)
    for s in specs:
        spec = MethodSpec(s.key, s.label, s.method, {**s.options, "noise": scene.noise, "n_coils": int(scene.n_coils)})
        log(f"{scene.name}: {s.label}")
        try:
            run.results[s.key] = run_method(case, spec)
        except InputError as e:
            msg = str(e).splitlines()[0]
            run.notes[s.key] = NO_IMAGES_WEIGHTS if s.options.get("variant") == "images" and "weights" in msg else msg
            continue
        run.rows[s.key] = score_scene(scene, run.results[s.key].maps["T1"])
    return run


def validation_runs(specs: list[MethodSpec], n_plates: int, n_brains: int, protocols: str = "paper,nist15",
                    log=print) -> list[SceneRun]:
    """Every scene of the validation half (``n_plates`` plates, then ``n_brains`` brains, each in the
    comma-separated ``protocols``) mapped and scored with every method of ``specs``: what the scripts that
    choose a setting on the validation half (scripts/*_validation.py) start from."""
    from ..data.scenes import robustness_scenes

    scenes = robustness_scenes("validation", n_plates=int(n_plates), n_brains=int(n_brains),
                               protocols=tuple(protocols.split(",")))
    return [run_scene(sc, specs, log=log) for sc in scenes]


def _split_seeds() -> dict:
    from ..data import scenes

    return dict(scenes.SPLIT_SEEDS)


def run_robustness(out_dir: str | Path = "docs", split: str = "test", n_plates: int = 6, n_brains: int = 3,
                   methods=None, protocols=("paper", "nist15"), calibration: float | None = None,
                   command: str | None = None, log=print) -> Path:
    """Map and score one split of the suite, write ``out_dir/ROBUSTNESS.md`` (test) or
    ``ROBUSTNESS_validation.md``, its JSON of every number and its figures; returns the report path.
    Nothing is written until everything is computed; files are written to temporary names and renamed."""
    import torch

    from ..data.scenes import robustness_scenes

    if split not in ("validation", "test"):
        raise InputError(f"--split must be validation or test, got {split!r}")
    specs = method_specs(methods)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is not a folder")
    t0 = time.perf_counter()
    load0 = _load()
    scenes = robustness_scenes(split, n_plates=int(n_plates), n_brains=int(n_brains), protocols=tuple(protocols))
    if not scenes:
        raise InputError("no scene to map: --plates and --brains are both 0")
    runs = [run_scene(sc, specs, log) for sc in scenes]
    fitted_c = None
    if split == "validation" and any(s.key.startswith("diffusor") for s in specs):
        fitted_c = {}
        for s in specs:
            samples = [uncertainty_voxels(r.scene, r.results[s.key].maps) for r in runs
                       if r.scene.kind == "brain" and s.key in r.results and "T1_std" in r.results[s.key].maps]
            if samples:
                fitted_c[s.key] = calibration_factor(samples)
    meta = {"command": command or _default_command(out_dir, split, n_plates, n_brains, methods, protocols, calibration),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{_cpu_name()}, {platform.machine()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads",
            "python": platform.python_version(), "torch": torch.__version__, "split": split,
            "split_seeds": _split_seeds(), "minutes": None, "calibration": calibration, "fitted_calibration": fitted_c}
    name = "ROBUSTNESS.md" if split == "test" else f"ROBUSTNESS_{split}.md"
    stem = Path(name).stem.lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".robustness-", dir=out_dir) as tmp:  # same file system: renames
        tmp = Path(tmp)
        figs = write_figures(tmp, runs, specs, stem, meta["command"])
        meta["minutes"] = (time.perf_counter() - t0) / 60
        meta["load_average"] = f"{load0} at the start, {_load()} at the end"
        md = report_markdown(runs, specs, meta, figs)
        data = report_json(runs, specs, meta)
        (out_dir / "figures").mkdir(exist_ok=True)
        for f in figs:
            (tmp / f["file"]).replace(out_dir / f["file"])
        jpath = out_dir / f"{Path(name).stem}.json"
        (tmp / "report.json").write_text(json.dumps(data, indent=1, allow_nan=True))
        (tmp / "report.json").replace(jpath)
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        (tmp / "report.md").replace(out_dir / name)
    return out_dir / name


def _load() -> str:
    """The 1-minute load average of the machine (others' processes share the CPUs: timings depend on it)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def _default_command(out_dir, split, n_plates, n_brains, methods, protocols, calibration) -> str:
    cmd = f"qmri robustness --out {out_dir} --split {split} --plates {n_plates} --brains {n_brains}"
    if methods is not None:
        cmd += " --methods " + ",".join(methods)
    cmd += " --protocols " + ",".join(protocols)
    if calibration is not None:
        cmd += f" --calibration {calibration:g}"
    return cmd


# ---------------------------------------------------------------------------------------- report
def _f(x, fmt="{:+.1f}") -> str:
    return "n/a" if x is None or not np.isfinite(x) else fmt.format(x)


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def report_json(runs: list[SceneRun], specs: list[MethodSpec], meta: dict) -> dict:
    """Every number of the report: per scene its params, per method its seconds, notes and ROI rows."""
    out = {"meta": meta, "methods": {s.key: {"label": s.label, "method": s.method, "options": s.options} for s in specs},
           "scenes": []}
    for r in runs:
        sc = r.scene
        out["scenes"].append({"name": sc.name, "kind": sc.kind, "split": sc.split, "index": sc.index,
                              "protocol": sc.protocol.name, "noise": sc.noise, "n_coils": int(sc.n_coils),
                              "sigma": sc.sigma, "snr": sc.snr, "params": sc.params,
                              "seconds": {k: v.seconds for k, v in r.results.items()}, "notes": r.notes,
                              "rois": r.rows})
    return _json_safe(out)


def _summary_rows(runs: list[SceneRun], specs: list[MethodSpec], kind: str, band: str | None) -> list[str]:
    """Per method over every ROI of ``kind`` scenes in ``band`` (determined ROIs only): count, mean /
    max |bias|, median std %, median NRMSE, and paired counts against the fit and the TV fit."""
    keys = [s.key for s in specs]
    lines = ["| method | ROIs | not determined | mean / max abs. bias (%) | median within-ROI std (% of T1) | median NRMSE | "
             "abs. bias below the fit's | std below the fit's | abs. bias below the TV fit's | std below the TV fit's |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in specs:
        rows, nd = [], 0
        paired = {b: [0, 0, 0] for b in BASELINES}  # n, bias below, std below
        for r in runs:
            if r.scene.kind != kind or s.key not in r.rows:
                continue
            for row in r.rows[s.key]:
                if band is not None and row["band"] != band:
                    continue
                if not row["determined"]:
                    nd += 1
                    continue
                rows.append(row)
                for b in BASELINES:
                    if b == s.key or b not in r.rows:
                        continue
                    br = {x["roi"]: x for x in r.rows[b]}.get(row["roi"])
                    if br is None:
                        continue
                    paired[b][0] += 1
                    paired[b][1] += abs(row["bias_pct"]) < abs(br["bias_pct"])
                    paired[b][2] += row["std_s"] < br["std_s"]
        if not rows and not nd:
            lines.append(f"| {s.label} | 0 | 0 | - | - | - | - | - | - | - |")
            continue
        if rows:
            bias = np.array([abs(x["bias_pct"]) for x in rows])
            cells = [s.label, str(len(rows)), str(nd), f"{_f(np.mean(bias), '{:.1f}')} / {_f(np.max(bias), '{:.1f}')}",
                     _f(np.median([x["std_pct"] for x in rows]), "{:.1f}"), _f(np.median([x["nrmse"] for x in rows]), "{:.3f}")]
        else:
            cells = [s.label, "0", str(nd), "-", "-", "-"]
        for b in BASELINES:
            n, bb, sb = paired[b]
            cells += (["-", "-"] if b == s.key or b not in keys or n == 0 else [f"{bb} of {n}", f"{sb} of {n}"])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _params_table(runs: list[SceneRun]) -> list[str]:
    seen, rows = set(), []
    for r in runs:
        key = (r.scene.kind, r.scene.index)
        if key in seen:
            continue
        seen.add(key)
        p = {k: v for k, v in r.scene.params.items() if not isinstance(v, (list, dict)) or len(json.dumps(v)) < 60}
        txt = "; ".join(f"{k}: {_short(v)}" for k, v in p.items())
        rows.append(f"| {r.scene.kind} {r.scene.index} | {txt} |")
    return ["| scene | parameters drawn |", "|---|---|", *rows]


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


_RANGE_NAMES = ("LAYOUTS", "SPHERE_DIAMETER_MM", "WALL_MM", "WALL_PROBABILITY", "FILL_T1_S", "SPHERE_PD", "MATRIX_CHOICES",
                "MATRIX_WEIGHTS", "PLATE_FOV_MM", "BRAIN_FOV_MM", "B_RANGE", "B_KINDS", "SNR_RANGE", "NCCHI_PROBABILITY",
                "N_COILS", "ECHO_TRAIN_PROBABILITY", "LESION_PROBABILITY", "N_LESIONS", "LESION_T1_S", "LESION_T2_S",
                "LESION_PD", "PLATE_EROSION_PX", "BRAIN_EROSION_PX")


def _drawn_from() -> str:
    """The ranges the scenes are drawn from: the constants of custom_components.data.scenes."""
    from ..data import scenes

    return "; ".join(f"`{n}` {_short(getattr(scenes, n))}" for n in _RANGE_NAMES if hasattr(scenes, n))


def _ranges(runs: list[SceneRun]) -> list[str]:
    """Observed range of every numeric parameter over this split's drawn scenes."""
    vals: dict = {}
    for r in runs:
        for k, v in r.scene.params.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals.setdefault((r.scene.kind, k), []).append(float(v))
            elif isinstance(v, (str, bool)):
                vals.setdefault((r.scene.kind, k), []).append(str(v))
    out = []
    for (kind, k), v in sorted(vals.items()):
        if all(isinstance(x, float) for x in v):
            out.append(f"- {kind} `{k}`: {min(v):.4g} to {max(v):.4g}")
        else:
            out.append(f"- {kind} `{k}`: {', '.join(sorted(set(v)))}")
    return out


def _scene_table(r: SceneRun, specs: list[MethodSpec]) -> list[str]:
    keys = [s for s in specs if s.key in r.rows]
    head = "| ROI | T1 (ms) | band | CRLB/T1 | n | " + " | ".join(s.label for s in keys) + " |"
    lines = [head, "|---|---:|---|---:|---:|" + "---|" * len(keys)]
    if not keys:
        return lines
    base = r.rows[keys[0].key]
    for i, row0 in enumerate(base):
        note = "" if row0["determined"] else f" ({NOT_DETERMINED})"
        cells = [row0["roi"], f"{1000 * row0['reference']:.0f}", row0["band"], f"{row0['crlb_pct']:.1f} %{note}", str(row0["n"])]
        for s in keys:
            x = {y["roi"]: y for y in r.rows[s.key]}[row0["roi"]]
            cells.append(f"{_f(x['bias_pct'])} % ± {_f(1000 * x['std_s'], '{:.0f}')} ms, NRMSE {_f(x['nrmse'], '{:.3f}')}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(runs: list[SceneRun], specs: list[MethodSpec], meta: dict, figs: list[dict]) -> list[str]:
    split = meta["split"]
    learned = [s for s in specs if s.key not in BASELINES]
    md = [f"# Robustness suite: the {split} half", "",
          f"Written by `{meta['command']}` on {meta['date']}, {meta['machine']}, Python {meta['python']}, torch "
          f"{meta['torch']}; the run took {meta['minutes']:.1f} min (1-minute load average "
          f"{meta.get('load_average', 'unknown')}: the times per slice depend on it). Every number below comes from this run; all of "
          f"them are in `{('ROBUSTNESS' if split == 'test' else 'ROBUSTNESS_' + split)}.json` beside this file.", ""]
    md += ["## The scenes", "",
           f"Drawn by `custom_components/data/scenes.py` (`robustness_scenes`), split seeds {meta['split_seeds']}: "
           "the two halves never share a draw. The validation half may be looked at while developing and choosing "
           "(weights, steps, data-consistency strength, the std calibration); the test half is only reported. "
           f"This report is the **{split}** half. Each drawn scene is rendered in every protocol listed with the "
           "same parameters and noise seed. Scores are on inner ROIs (each sphere's disk eroded by 2 px; brain "
           "tissue masks of pure-tissue pixels), never on full-sphere masks.", "",
           f"Drawn from (constants of `custom_components/data/scenes.py`, whose docstring says what each is): "
           f"{_drawn_from()}.", "",
           "Ranges of the drawn parameters over the scenes of this run:", "", *_ranges(runs), "",
           *_params_table(runs), "",
           "| scene | protocol | noise | coils | sigma | SNR | matrix | seconds per slice: " +
           " / ".join(s.label for s in specs) + " |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        sc = r.scene
        secs = " / ".join(f"{r.results[s.key].seconds:.1f}" if s.key in r.results else "-" for s in specs)
        md.append(f"| {sc.name} | {sc.protocol.name} | {sc.noise} | {sc.n_coils} | {sc.sigma:.4g} | {sc.snr:.1f} | "
                  f"{sc.images.shape[1]} x {sc.images.shape[2]} | {secs} |")
    md += ["", "## Scoring", "",
           "Per ROI: bias % = 100 (ROI mean - mean true T1) / mean true T1 (on a plate's inner ROI the true T1 is the "
           "sphere's reference at every voxel); within-ROI std (ddof 1); NRMSE = ||map - truth|| / ||truth|| over the "
           "ROI; CRLB/T1 = the Cramér-Rao bound of one voxel's T1 at the ROI's true (T1, PD, B), the scene's protocol "
           "and sigma (for noncentral chi: the effective sigma of the root-sum-of-squares magnitude at high SNR, the "
           f"per-coil sigma). Where CRLB/T1 > {100 * CRLB_LIMIT:.0f} % the ROI is marked **{NOT_DETERMINED}**: it is "
           "listed, but left out of the summaries and of the targets below (the protocol cannot tell its T1, so a "
           "number there is a prior's guess, not a measurement). The 0.4-2 s target is checked on every sphere.", ""]
    # summaries
    md += ["## Summary per method (plates)", "",
           "Over every sphere ROI of every plate scene and protocol, determined ROIs only. 'below the fit's' / "
           "'below the TV fit's': paired, the same ROI of the same scene in this run.", ""]
    for band, _, _ in BANDS:
        md += [f"### {band}", "", *_summary_rows(runs, specs, "plate", band), ""]
    md += ["## Summary per method (brains)", "", "Tissue ROIs of every brain scene (WM, GM, CSF, lesion), determined ROIs only.", "",
           *_summary_rows(runs, specs, "brain", None), ""]
    md += _brain_tissue_table(runs, specs)
    # notes
    notes = {}
    for r in runs:
        for k, msg in r.notes.items():
            notes.setdefault((k, msg), []).append(r.scene.name)
    if notes:
        md += ["## Methods that did not run on some scenes", ""]
        for (k, msg), names in notes.items():
            md.append(f"- {METHODS[k][0]}: {msg} ({len(names)} scene{'s' if len(names) > 1 else ''}: {', '.join(names)})")
        md.append("")
    # targets
    md += ["## Targets, scene by scene", "",
           "Issue 20: every learned method within 2 % on every 0.4-2 s sphere at SNR >= 30 and within 3 % at SNR "
           "15-30, with a within-ROI std below the classical fit's there; within 5 % on 0.1-0.4 s spheres where the "
           "CRLB determines T1. A missed bias is given ± one standard error of the ROI mean (std / sqrt(n), "
           "`mean_standard_error_pct`; it assumes independent voxels, so for a method that smooths the true one is "
           "larger): on inner ROIs of about 30 voxels with a within-ROI std of 6-10 % of T1 it is 1-2 %, the size "
           "of the 2 % target, and an unbiased method with that std misses the target by chance on 5-24 % of such "
           "ROIs. The targets are applied as written.", ""]
    fit_det = [within_bias_target(x, sc.snr) for sc, x, _ in target_sphere_rows(runs, "mle") if x["determined"]]
    if fit_det:
        md += [f"For reference, the classical fit scored the same way is within the bias target on {sum(fit_det)} of "
               f"{len(fit_det)} determined 0.4-2 s spheres.", ""]
    if not learned:
        md += ["No learned method in this run.", ""]
    elif "mle" not in [s.key for s in specs]:
        md += ["The classical fit is not in this run: the within-ROI std target is not checked below.", ""]
    for s in learned:
        lines = []
        for r in runs:
            if r.scene.kind != "plate":
                continue
            if s.key not in r.rows:
                lines.append(f"- {r.scene.name}: not run ({r.notes.get(s.key, 'not requested')}).")
                continue
            miss = target_misses(r.rows[s.key], r.rows.get("mle"), r.scene.snr)
            lines.append(f"- {r.scene.name} (SNR {r.scene.snr:.0f}): " +
                         ("meets every target." if not miss else f"**misses** {len(miss)}: " + "; ".join(miss) + "."))
        md += [f"### {s.label}", "", *lines, ""]
    # short T1
    md += ["## Short T1", "",
           "Every plate ROI below 0.4 s, with its CRLB/T1; where that is above 10 % the number is not a measurement.", ""]
    keys = [s for s in specs]
    md += ["| scene | ROI | T1 (ms) | CRLB/T1 | " + " | ".join(s.label for s in keys) + " |",
           "|---|---|---:|---|" + "---|" * len(keys)]
    for r in runs:
        if r.scene.kind != "plate" or not r.rows:
            continue
        first = next(iter(r.rows.values()))
        for row0 in first:
            if row0["band"] not in (BANDS[0][0], BANDS[1][0]):
                continue
            note = "" if row0["determined"] else f" **{NOT_DETERMINED}**"
            cells = [r.scene.name, row0["roi"], f"{1000 * row0['reference']:.0f}", f"{row0['crlb_pct']:.1f} %{note}"]
            for s in keys:
                x = {y["roi"]: y for y in r.rows.get(s.key, [])}.get(row0["roi"])
                cells.append("-" if x is None else f"{_f(x['bias_pct'])} %")
            md.append("| " + " | ".join(cells) + " |")
    md.append("")
    # uncertainty
    md += _uncertainty_section(runs, specs, meta)
    # timing
    md += ["## Time per slice", "",
           f"Seconds per slice (one slice per scene, model loading included for the learned methods), on {meta['machine']}.", "",
           "| method | scenes | mean (s) | min (s) | max (s) |", "|---|---|---|---|---|"]
    for s in specs:
        t = [r.results[s.key].seconds for r in runs if s.key in r.results]
        if t:
            md.append(f"| {s.label} | {len(t)} | {np.mean(t):.1f} | {np.min(t):.1f} | {np.max(t):.1f} |")
    md.append("")
    # figures
    if figs:
        md += ["## Figures", ""]
        for f in figs:
            md += [f"![{f['title']}]({f['file']})", "", f"{f['title']}. Made by `{meta['command']}`.", ""]
    # per scene
    md += ["## Scene by scene", "",
           "Cells: bias of the ROI mean (%) ± within-ROI std (ms), NRMSE over the ROI.", ""]
    for r in runs:
        md += [f"### {r.scene.name}", "", f"{r.scene.noise}, {r.scene.n_coils} coil(s), SNR {r.scene.snr:.1f}.", "",
               *_scene_table(r, specs), ""]
    return md


def _brain_tissue_table(runs: list[SceneRun], specs: list[MethodSpec]) -> list[str]:
    lines = ["### Tissue bias (%) and NRMSE per tissue, averaged over brain scenes", "",
             "Determined tissue ROIs (CRLB/T1 <= 10 %) only; the not-determined ones (e.g. every tissue in the "
             "nist15 protocol, whose TIs end at 0.8 s) are in the scene tables, marked.", "",
             "| method | " + " | ".join(BRAIN_TISSUES) + " |", "|---|" + "---|" * len(BRAIN_TISSUES)]
    any_brain = False
    for s in specs:
        cells = []
        for t in BRAIN_TISSUES:
            v = [x for r in runs if r.scene.kind == "brain" and s.key in r.rows for x in r.rows[s.key]
                 if x["roi"] == t and x["determined"]]
            if v:
                any_brain = True
            cells.append("-" if not v else f"{np.mean([x['bias_pct'] for x in v]):+.1f} %, {np.mean([x['nrmse'] for x in v]):.3f} ({len(v)})")
        lines.append(f"| {s.label} | " + " | ".join(cells) + " |")
    return (lines + ["", "(n): brain scenes with that tissue ROI, determined.", ""]) if any_brain else []


def _uncertainty_section(runs: list[SceneRun], specs: list[MethodSpec], meta: dict) -> list[str]:
    c = meta.get("calibration")
    md = ["## Uncertainty of the Diffusor (brains)", "",
          "T1, voxels of the tissue ROIs. Coverage: fraction of voxels with |error| <= k c std (a calibrated Gaussian "
          f"posterior gives 0.68 / 0.95); c = {c if c is not None else 1} "
          f"({'given to this run, fitted on the validation half' if c is not None else 'no calibration given'}). "
          "Spearman: rank correlation of the std with |error|; its ceiling: the Spearman that errors drawn from a "
          "Gaussian with exactly these stds would give (Monte Carlo, `oracle_spearman`): where the std hardly "
          "varies between voxels, even a perfectly calibrated std cannot rank the errors.", ""]
    rows = []
    for s in specs:
        if not s.key.startswith("diffusor"):
            continue
        samples = [uncertainty_voxels(r.scene, r.results[s.key].maps) for r in runs
                   if r.scene.kind == "brain" and s.key in r.results and "T1_std" in r.results[s.key].maps]
        if not samples:
            continue
        u = uncertainty_scores(samples, c)
        rows.append(f"| {s.label} | {len(samples)} | {u['n']} | {u['coverage_1']:.2f} / {u['coverage_2']:.2f} | "
                    f"{u['spearman']:.2f} | {u['spearman_oracle']:.2f} |")
    if not rows:
        return md + ["No Diffusor result on a brain scene in this run.", ""]
    md += ["| method | brain scenes | voxels | coverage 1 / 2 std | Spearman of std with abs. error | its ceiling for these stds |",
           "|---|---|---|---|---|---|", *rows, ""]
    fc = meta.get("fitted_calibration")
    if fc:
        md += ["Calibration factors fitted on this (validation) half's brains, to give to the test half's run "
               "(`--calibration`): " + ", ".join(f"{METHODS[k][0]}: {v:.3f}" for k, v in fc.items()) + ".", ""]
    return md


# --------------------------------------------------------------------------------------- figures
def write_figures(tmp: Path, runs: list[SceneRun], specs: list[MethodSpec], stem: str, command: str) -> list[dict]:
    """A plate's and a brain's T1 maps per method with error maps, and bias vs reference T1 per
    method, as PNGs in ``tmp`` (moved into OUT/figures by the caller)."""
    figs = []
    for kind in ("plate", "brain"):
        r = next((x for x in runs if x.scene.kind == kind and x.results), None)
        if r is None:
            continue
        f = f"figures/{stem}_{kind}.png"
        title = f"{r.scene.name}: T1 per method, truth and error"
        case = scene_case(r.scene)
        case.mask = case.mask & (r.scene.truth[0] > 0)  # the figure shows errors only where the truth is defined
        map_figure(tmp / f, case, r.results, specs, title, t1_max_s=2.5 if kind == "plate" else 4.5)
        figs.append({"file": f, "title": title})
    if any(r.rows for r in runs if r.scene.kind == "plate"):
        f = f"figures/{stem}_bias.png"
        title = ("Bias of each plate ROI vs its reference T1, per method (hollow: CRLB/T1 > 10 %; "
                 "beyond +-29 % drawn at the edge; grey: 0.4-2 s)")
        _bias_figure(tmp / f, runs, specs, title)
        figs.append({"file": f, "title": title})
    return figs


def _bias_figure(path: Path, runs: list[SceneRun], specs: list[MethodSpec], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(specs)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.0), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], specs):
        x, y, d = [], [], []
        for r in runs:
            if r.scene.kind == "plate":
                for row in r.rows.get(s.key, []):
                    x.append(row["reference"])
                    y.append(row["bias_pct"])
                    d.append(row["determined"])
        x, y, d = np.array(x), np.clip(np.array(y), -29.0, 29.0), np.array(d, bool)  # beyond +-29 %: drawn at the edge
        if x.size:
            ax.scatter(x[d], y[d], s=8, c="C0")
            ax.scatter(x[~d], y[~d], s=8, facecolors="none", edgecolors="C3")
        ax.set_xscale("log")
        ax.axhline(0, color="k", lw=0.5)
        for v in (2, -2):
            ax.axhline(v, color="gray", lw=0.5, ls="--")
        ax.axvspan(0.4, 2.0, color="0.9", zorder=-1)
        ax.set_ylim(-30, 30)
        ax.set_title(s.label, fontsize=7)
        ax.set_xlabel("reference T1 (s)", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("bias of the ROI mean (%)", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["METHODS", "BANDS", "CRLB_LIMIT", "NOT_DETERMINED", "method_specs", "band_of", "roi_scores", "roi_crlb",
           "effective_sigma", "determined", "target_pct", "within_bias_target", "target_sphere_rows", "target_misses", "score_scene", "uncertainty_voxels",
           "calibration_factor", "mean_standard_error_pct", "oracle_spearman", "uncertainty_scores", "std_calibration_entries", "validation_runs", "SceneRun", "scene_case", "run_scene", "run_robustness",
           "report_markdown", "report_json"]
